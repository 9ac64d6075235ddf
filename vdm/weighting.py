"""Weighting functions w(logsnr) of the weighted diffusion loss.

The weighted loss is `L_w = 0.5 * E_t[w(lam_t) * (-dlam/dt) * ||eps -
eps_hat||^2]` with `lam = logsnr = -gamma`; `w = 1` is the ELBO, and a weighting
that is monotonically non-increasing in lam makes `L_w` the ELBO of
noise-perturbed data (Kingma & Gao 2023, "the weighted loss as the ELBO with
data augmentation"). The table below is DESIGN.md's, from Kingma & Gao 2023,
table 1; `get(name, **kwargs)` returns one by name.

  name           w(lam)                                           monotonic
  elbo           1                                                yes
  sigmoid        sigmoid(bias - lam), bias = 2                    yes
  edm            N(lam; mean, std^2) (e^-lam + sd^2) / sd^2       no
  edm_monotonic  edm(max(lam, lam_star)), lam_star = argmax edm   yes
  v_cosine       exp(-lam / 2)                                    yes
  eps_cosine     sech(lam / 2)                                    no

(`sd` is sigma_data; edm defaults mean = std = 2.4, sigma_data = 0.5.)

References:
  Kingma, Gao. Understanding Diffusion Objectives as the ELBO with Simple Data
    Augmentation. https://arxiv.org/abs/2303.00848, 2023.
  Karras, Aittala, Aila, Laine. Elucidating the Design Space of
    Diffusion-Based Generative Models (EDM). https://arxiv.org/abs/2206.00364,
    2022.
"""
import functools
import inspect
import math
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# w(logsnr [...]) -> [...] weights, elementwise.
WeightFn = Callable[[jax.Array], jax.Array]


def _as_float(logsnr: jax.typing.ArrayLike) -> jax.Array:
  logsnr = jnp.asarray(logsnr)
  if not jnp.issubdtype(logsnr.dtype, jnp.floating):
    logsnr = logsnr.astype(jnp.float32)
  return logsnr


def elbo(logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`w = 1`: the unweighted ELBO (VDM's continuous-time diffusion loss).

  Args:
    logsnr: [...] log-SNR lam.
  Returns:
    [...] ones.
  """
  return jnp.ones_like(_as_float(logsnr))


def sigmoid(logsnr: jax.typing.ArrayLike, *, bias: float = 2.0) -> jax.Array:
  """`w = sigmoid(bias - lam)`; Kingma & Gao 2023, sigmoid weighting.

  Args:
    logsnr: [...] log-SNR lam.
    bias: shift b; weights fall off for lam > b.
  Returns:
    [...] weights in (0, 1).

  Example:
    >>> from vdm import weighting
    >>> float(weighting.sigmoid(jnp.array(2.0)))
    0.5
  """
  return jax.nn.sigmoid(bias - _as_float(logsnr))


def edm(logsnr: jax.typing.ArrayLike, *, mean: float = 2.4, std: float = 2.4,
        sigma_data: float = 0.5) -> jax.Array:
  """EDM's loss weighting as a function of lam (Karras et al. 2022).

  `w = normal_pdf(lam; mean, std) * (exp(-lam) + sigma_data^2) /
  sigma_data^2`: EDM's log-normal training noise density times its loss
  weight, re-expressed over lam by Kingma & Gao 2023, table 1. Computed in log
  space (`logaddexp`) so it stays finite for any lam.

  Args:
    logsnr: [...] log-SNR lam.
    mean: mean of the Gaussian over lam (EDM: -2 * P_mean = 2.4).
    std: standard deviation of that Gaussian (EDM: 2 * P_std = 2.4), > 0.
    sigma_data: data standard deviation, > 0.
  Returns:
    [...] positive weights.
  """
  logsnr = _as_float(logsnr)
  log_var_data = 2.0 * math.log(sigma_data)
  log_pdf = (-0.5 * jnp.square((logsnr - mean) / std) - math.log(std)
             - 0.5 * math.log(2.0 * math.pi))
  log_ratio = jnp.logaddexp(-logsnr, log_var_data) - log_var_data
  return jnp.exp(log_pdf + log_ratio)


def edm_argmax(*, mean: float = 2.4, std: float = 2.4,
               sigma_data: float = 0.5) -> float:
  """lam_star = argmax_lam of `edm(lam)`, solved in numpy float64.

  The log weight tends to -inf on both sides, and its derivative
  `(mean - lam) / std^2 - sigmoid(-lam - 2 log sigma_data)` is positive at
  `lam = mean - std^2` and negative at `lam = mean`, so the maximum lies in
  between; it is located on a dense grid there and refined by bisection on the
  derivative. Results are cached: solved once per parameter set.

  Args:
    mean, std, sigma_data: as in `edm` (Python floats).
  Returns:
    lam_star, a Python float (about -3.31 for the defaults).
  """
  return _edm_argmax(float(mean), float(std), float(sigma_data))


@functools.lru_cache(maxsize=None)
def _edm_argmax(mean: float, std: float, sigma_data: float) -> float:
  log_var_data = 2.0 * math.log(sigma_data)

  def log_w(lam):
    return -0.5 * ((lam - mean) / std) ** 2 + np.logaddexp(-lam, log_var_data)

  def slope(lam):   # d log_w / d lam
    return (mean - lam) / std**2 - 1.0 / (1.0 + np.exp(lam + log_var_data))

  grid = np.linspace(mean - std**2 - 1.0, mean + 1.0, 20001)
  i = int(np.argmax(log_w(grid)))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
  for _ in range(200):   # slope(lo) >= 0 >= slope(hi) around a maximum
    mid = 0.5 * (lo + hi)
    if slope(mid) > 0:
      lo = mid
    else:
      hi = mid
  return float(0.5 * (lo + hi))


def edm_monotonic(logsnr: jax.typing.ArrayLike, *, mean: float = 2.4,
                  std: float = 2.4, sigma_data: float = 0.5) -> jax.Array:
  """`edm(max(lam, lam_star))`: EDM made monotonic; Kingma & Gao 2023.

  Constant `edm(lam_star)` for lam <= lam_star and equal to `edm` above it,
  with `lam_star = edm_argmax(...)` a fixed number (solved once and cached).

  Args:
    logsnr: [...] log-SNR lam.
    mean, std, sigma_data: as in `edm`; Python floats.
  Returns:
    [...] positive, non-increasing weights.
  """
  lam_star = edm_argmax(mean=mean, std=std, sigma_data=sigma_data)
  return edm(jnp.maximum(_as_float(logsnr), lam_star), mean=mean, std=std,
             sigma_data=sigma_data)


def v_cosine(logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`w = exp(-lam / 2)`: v-prediction MSE with the cosine schedule.

  Also the weighting of flow matching with optimal-transport paths; Kingma &
  Gao 2023, table 1.

  Args:
    logsnr: [...] log-SNR lam.
  Returns:
    [...] positive weights.
  """
  return jnp.exp(-0.5 * _as_float(logsnr))


def eps_cosine(logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`w = sech(lam / 2)`: eps-prediction MSE with the cosine schedule.

  Kingma & Gao 2023, table 1. Computed as `2 e^{-|x|} / (1 + e^{-2|x|})`,
  x = lam / 2, which neither overflows nor loses its gradient.

  Args:
    logsnr: [...] log-SNR lam.
  Returns:
    [...] weights in (0, 1].

  Example:
    >>> from vdm import weighting
    >>> float(weighting.eps_cosine(jnp.array(0.0)))
    1.0
  """
  abs_half = jnp.abs(0.5 * _as_float(logsnr))
  return 2.0 * jnp.exp(-abs_half) / (1.0 + jnp.exp(-2.0 * abs_half))


_WEIGHTINGS = {
    "elbo": elbo,
    "sigmoid": sigmoid,
    "edm": edm,
    "edm_monotonic": edm_monotonic,
    "v_cosine": v_cosine,
    "eps_cosine": eps_cosine,
}

# Whether each registered weighting is non-increasing in lam (DESIGN.md).
MONOTONIC = types.MappingProxyType({
    "elbo": True,
    "sigmoid": True,
    "edm": False,
    "edm_monotonic": True,
    "v_cosine": True,
    "eps_cosine": False,
})


def get(name: str, **kwargs) -> WeightFn:
  """Returns the registered weighting `name` with its options bound.

  Args:
    name: one of `elbo`, `sigmoid`, `edm`, `edm_monotonic`, `v_cosine`,
      `eps_cosine`.
    **kwargs: that weighting's keyword options (e.g. `bias` for `sigmoid`).
  Returns:
    w(logsnr [...]) -> [...], elementwise.

  Example:
    >>> from vdm import weighting
    >>> w = weighting.get("sigmoid", bias=0.0)
    >>> float(w(jnp.array(0.0)))
    0.5
  """
  if name not in _WEIGHTINGS:
    known = ", ".join(sorted(_WEIGHTINGS))
    raise ValueError(f"unknown weighting {name!r}; known: {known}. "
                     "Set config.model.weighting to one of them.")
  fn = _WEIGHTINGS[name]
  options = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(
        f"weighting {name!r} got unknown option(s) {unknown}; it accepts "
        f"{options or 'none'}.")
  for option in ("std", "sigma_data"):
    if option in kwargs and not kwargs[option] > 0:
      raise ValueError(f"weighting {name!r} needs {option} > 0; got "
                       f"{kwargs[option]!r}.")
  if name == "edm_monotonic":   # solve lam_star now, once
    edm_argmax(**kwargs)
  return functools.partial(fn, **kwargs)


def is_monotonic(w: WeightFn, lo: float = -20.0, hi: float = 20.0, *,
                 num_points: int = 4001, rtol: float = 1e-6) -> bool:
  """Whether w is non-increasing on [lo, hi], checked on a dense grid.

  A rise between neighbouring grid points larger than `rtol` times their
  magnitude (float32 rounding) counts as an increase.

  Args:
    w: a weighting w(logsnr [N]) -> [N].
    lo, hi: the lam interval, lo < hi.
    num_points: grid size (spacing (hi - lo) / (num_points - 1)).
    rtol: relative tolerance for rounding noise.
  Returns:
    True if w never increases on the grid (and is finite there).
  """
  if not lo < hi:
    raise ValueError(f"is_monotonic needs lo < hi; got lo={lo!r}, hi={hi!r}.")
  grid = jnp.linspace(lo, hi, num_points, dtype=jnp.float32)
  values = np.asarray(w(grid), np.float64)
  if values.shape != grid.shape:
    raise ValueError(f"w must be elementwise: w(lam) of shape {grid.shape} "
                     f"returned shape {values.shape}.")
  if not np.all(np.isfinite(values)):
    return False
  rise = np.diff(values)
  scale = np.maximum(np.abs(values[:-1]), np.abs(values[1:]))
  return bool(np.all(rise <= rtol * scale))


# ----------------------------------------------------------------------------
# Conversions between prediction errors (Kingma & Gao 2023, table 1 rows for
# x- and v-prediction). With `x_hat = (z_t - sigma eps_hat) / alpha` and
# `v = alpha eps - sigma x`: `x - x_hat = (sigma / alpha) (eps_hat - eps)` and
# `v - v_hat = (eps - eps_hat) / alpha`, while `sigma^2 / alpha^2 = e^-lam`
# and `1 / alpha^2 = 1 + e^-lam`.


def x_mse_from_eps_mse(eps_mse: jax.typing.ArrayLike,
                       logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`||x - x_hat||^2 = exp(-lam) ||eps - eps_hat||^2`.

  Args:
    eps_mse: [...] squared eps-prediction errors.
    logsnr: [...] log-SNR lam (broadcasts against eps_mse).
  Returns:
    [...] squared x-prediction errors.
  """
  return jnp.exp(-_as_float(logsnr)) * eps_mse


def eps_mse_from_x_mse(x_mse: jax.typing.ArrayLike,
                       logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`||eps - eps_hat||^2 = exp(lam) ||x - x_hat||^2` (inverse of above).

  Args:
    x_mse: [...] squared x-prediction errors.
    logsnr: [...] log-SNR lam.
  Returns:
    [...] squared eps-prediction errors.
  """
  return jnp.exp(_as_float(logsnr)) * x_mse


def v_mse_from_eps_mse(eps_mse: jax.typing.ArrayLike,
                       logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`||v - v_hat||^2 = (1 + exp(-lam)) ||eps - eps_hat||^2`.

  Args:
    eps_mse: [...] squared eps-prediction errors.
    logsnr: [...] log-SNR lam.
  Returns:
    [...] squared v-prediction errors.
  """
  return (1.0 + jnp.exp(-_as_float(logsnr))) * eps_mse


def eps_mse_from_v_mse(v_mse: jax.typing.ArrayLike,
                       logsnr: jax.typing.ArrayLike) -> jax.Array:
  """`||eps - eps_hat||^2 = sigmoid(lam) ||v - v_hat||^2` (inverse of above).

  `sigmoid(lam) = 1 / (1 + exp(-lam))` without overflow for very negative lam.

  Args:
    v_mse: [...] squared v-prediction errors.
    logsnr: [...] log-SNR lam.
  Returns:
    [...] squared eps-prediction errors.
  """
  return jax.nn.sigmoid(_as_float(logsnr)) * v_mse
