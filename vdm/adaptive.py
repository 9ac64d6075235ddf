"""Adaptive noise schedule: a log-SNR density that follows the loss.

Kingma & Gao 2023 ("Understanding Diffusion Objectives as the ELBO with Simple
Data Augmentation", arXiv:2303.00848), section on the adaptive noise schedule:
draw the log-SNR `lam` from `p(lam)` proportional to the expected weighted loss
at `lam`, estimated by a running histogram over `lam` bins, and divide each
example's loss by `p(lam)` (importance sampling), which keeps the objective and
lowers the variance of its estimate.

Pure functions on an `AdaptiveState` (a NamedTuple, so it lives in the train
state and is checkpointed like any pytree): `init`, `update`, `density` and
`gamma`. `gamma(state, t)` is a `gamma_fn`: with `t ~ U(0, 1)`,
`lam = -gamma(state, t)` has density `density(state, lam)` and
`dgamma/dt = 1 / p(lam)` (from `jax.jvp`), so `elbo.diffusion_loss` with it is
the importance-sampled estimator with no extra code. `vdm.schedules`
re-exports them as `adaptive_init`, `adaptive_update`, `adaptive_density` and
`adaptive_gamma`, beside the other schedules.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm import checks
from vdm import process

# A bin's weight is floored at this fraction of the largest one so the inverse
# CDF never divides by a zero-mass bin (a bin with zero loss would otherwise
# never be drawn again, so its estimate could never recover).
_RELATIVE_FLOOR = 1e-6


class AdaptiveState(NamedTuple):
  """Running histogram of the loss over log-SNR bins."""
  edges: jax.Array     # [K + 1] logsnr bin edges, increasing
  loss_ema: jax.Array  # [K] EMA of the per-example loss in each bin
  count: jax.Array     # [K] int32 examples seen in each bin


def init(*, num_bins: int = 100, lam_min: float = -15.0,
         lam_max: float = 15.0) -> AdaptiveState:
  """A uniform density on [lam_min, lam_max] split into `num_bins` bins.

  Args:
    num_bins: K, the number of equal-width log-SNR bins (>= 1).
    lam_min: lower end of the log-SNR support.
    lam_max: upper end of the log-SNR support.
  Returns:
    The state: every `loss_ema` is 1 (a placeholder: the first batch that
    reaches a bin replaces it, see `update`) and every count 0.
  """
  num_bins = checks.check_int("num_bins", num_bins, minimum=1,
                              hint="Use e.g. 100 bins.")
  process.check_logsnr_range(lam_min, lam_max)
  edges = np.linspace(float(lam_min), float(lam_max), num_bins + 1)
  return AdaptiveState(
      edges=jnp.asarray(edges, jnp.float32),
      loss_ema=jnp.ones((num_bins,), jnp.float32),
      count=jnp.zeros((num_bins,), jnp.int32))


def _bin_index(edges: jax.Array, logsnr: jax.Array) -> jax.Array:
  """Bin of each logsnr, clipped to [0, K - 1]; lam_max is in the last bin."""
  num_bins = edges.shape[0] - 1
  index = jnp.searchsorted(edges, logsnr, side="right") - 1
  return jnp.clip(index, 0, num_bins - 1)


def _inside(edges: jax.Array, logsnr: jax.Array) -> jax.Array:
  return (logsnr >= edges[0]) & (logsnr <= edges[-1])


def update(state: AdaptiveState, logsnr: jax.typing.ArrayLike,
           loss: jax.typing.ArrayLike, *, decay: float = 0.99) -> AdaptiveState:
  """Folds one batch of losses into the per-bin EMA; jit-friendly.

  For each bin k that received n_k > 0 examples of this batch, with batch mean
  m_k of their `loss`:
  `loss_ema_k <- decay * loss_ema_k + (1 - decay) * m_k`, except on the bin's
  first visit (count_k == 0), where `loss_ema_k <- m_k`: the initial value is a
  placeholder in no particular unit, and keeping it would starve (or flood) the
  bins not yet visited. Bins without examples are unchanged. Examples outside
  [lam_min, lam_max] or with a non-finite loss are ignored.

  Pass the loss *before* the 1 / p(lam) importance weight, i.e.
  `0.5 * w(lam) * ||eps - eps_hat||^2`, so that p(lam) tracks the weighted loss
  at each noise level (Kingma & Gao 2023, adaptive noise schedule).

  Args:
    state: the current histogram.
    logsnr: [B] log-SNR of each example (= -gamma_t).
    loss: [B] per-example loss (nats), same shape as `logsnr`.
    decay: EMA decay in [0, 1).
  Returns:
    The new state (same edges).
  """
  logsnr = jax.lax.stop_gradient(jnp.asarray(logsnr, jnp.float32))
  loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
  if logsnr.shape != loss.shape or logsnr.ndim != 1:
    raise ValueError(f"logsnr and loss must both have shape [B]; got "
                     f"{logsnr.shape} and {loss.shape}. Flatten them first.")
  if process.is_concrete(decay) and not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"decay={decay!r} must be in [0, 1); e.g. 0.99.")
  num_bins = state.loss_ema.shape[0]
  valid = _inside(state.edges, logsnr) & jnp.isfinite(loss)
  index = _bin_index(state.edges, logsnr)                      # [B]
  sums = jax.ops.segment_sum(jnp.where(valid, loss, 0.0), index,
                             num_segments=num_bins)            # [K]
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), index,
                               num_segments=num_bins)          # [K]
  batch_mean = sums / jnp.maximum(counts, 1).astype(jnp.float32)
  ema = decay * state.loss_ema + (1.0 - decay) * batch_mean
  ema = jnp.where(state.count == 0, batch_mean, ema)
  return AdaptiveState(
      edges=state.edges,
      loss_ema=jnp.where(counts > 0, ema, state.loss_ema),
      count=state.count + counts)


def _bin_masses(state: AdaptiveState):
  """Bin widths [K] and probability masses [K] (sum to 1) of the density."""
  edges = jax.lax.stop_gradient(state.edges)
  weights = jax.lax.stop_gradient(state.loss_ema)
  weights = jnp.where(jnp.isfinite(weights), jnp.maximum(weights, 0.0), 0.0)
  top = jnp.max(weights)
  weights = jnp.where(top > 0, jnp.maximum(weights, _RELATIVE_FLOOR * top), 1.0)
  widths = jnp.diff(edges)
  masses = weights * widths
  return widths, masses / jnp.sum(masses)


def density(state: AdaptiveState, logsnr: jax.typing.ArrayLike) -> jax.Array:
  """p(lam): piecewise constant, proportional to `loss_ema`, integrates to 1.

  Bins whose EMA is below 1e-6 of the largest are raised to that floor.

  Args:
    state: the histogram.
    logsnr: [...] log-SNR values.
  Returns:
    [...] density; 0 outside [lam_min, lam_max].
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  widths, masses = _bin_masses(state)
  edges = jax.lax.stop_gradient(state.edges)
  p = (masses / widths)[_bin_index(edges, logsnr)]
  return jnp.where(_inside(edges, logsnr), p, 0.0)


def gamma(state: AdaptiveState, t: jax.typing.ArrayLike) -> jax.Array:
  """gamma(t): the piecewise-linear inverse CDF of `density`.

  Oriented so gamma increases with t: t = 0 gives gamma = -lam_max (exactly),
  t = 1 gives gamma = -lam_min; t is the probability that the log-SNR exceeds
  -gamma(t). Inside a bin `dgamma/dt = 1 / p(-gamma)`, which `jax.jvp` returns,
  so the continuous-time diffusion loss with this `gamma_fn` is the
  importance-sampled estimator `w / p`. The state gets no gradient.

  Args:
    state: the histogram.
    t: [...] times in [0, 1].
  Returns:
    [...] gamma_t, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  _, masses = _bin_masses(state)
  edges = jax.lax.stop_gradient(state.edges)
  gamma_edges = -edges[::-1]                                   # [K + 1] incr.
  cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(masses[::-1])])
  cdf = cdf / cdf[-1]                                          # cdf[K] == 1
  index = _bin_index(cdf, t)                                   # gamma bin
  lo, hi = cdf[index], cdf[index + 1]
  frac = (t - lo) / (hi - lo)
  start = gamma_edges[index]
  return start + frac * (gamma_edges[index + 1] - start)
