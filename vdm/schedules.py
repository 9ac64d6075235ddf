"""Noise schedules gamma(t) = -logsnr(t) and their log-SNR densities.

Every schedule maps t in [0, 1] to gamma_t, strictly increasing, elementwise
(`[B] -> [B]`, `[] -> []`), float32. Drawing `t ~ U(0, 1)` makes the log-SNR
`lam = -gamma(t)` a random variable with density `p(lam) = 1 / |dlam/dt|`
(Kingma & Gao 2023, arXiv:2303.00848, section on weighted losses / importance
sampling), which the `*_density` functions give in closed form.

- Fixed: `fixed_linear` (VDM, Kingma et al. 2021, arXiv:2107.00630), `cosine`
  (optionally shifted), `edm` (Karras et al. 2022, arXiv:2206.00364); `get`.
- Learned (Flax): `LearnedLinear`, `MonotoneNet`, and `variance_minimizing`
  for the VDM variance-minimising gradient of the schedule's shape (defined
  in `vdm.learned_schedules`).
- Adaptive: `AdaptiveState`, `adaptive_init`, `adaptive_update`,
  `adaptive_density`, `adaptive_gamma` (`vdm.adaptive`'s `init`, `update`,
  `density` and `gamma`).

Truncated schedules (`cosine`, `edm`) map t affinely onto the quantile range
[u(lam_max), u(lam_min)] of the untruncated schedule instead of clipping
gamma: the log-SNR density is then the untruncated one restricted to
[lam_min, lam_max] and renormalised (no point masses at the ends), and
gamma(0) = -lam_max, gamma(1) = -lam_min are finite.
"""
import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy import special

from vdm import adaptive
from vdm import learned_schedules
from vdm import process

# p(logsnr [...]) -> [...] density of the log-SNR.
DensityFn = Callable[[jax.Array], jax.Array]

AdaptiveState = adaptive.AdaptiveState
adaptive_init = adaptive.init
adaptive_update = adaptive.update
adaptive_density = adaptive.density
adaptive_gamma = adaptive.gamma

LearnedLinear = learned_schedules.LearnedLinear
MonotoneNet = learned_schedules.MonotoneNet
variance_minimizing = learned_schedules.variance_minimizing


def _check_positive(name: str, value) -> None:
  if process.is_concrete(value) and not float(value) > 0:
    raise ValueError(f"{name}={float(value)!r} must be > 0.")


def _opaque(values):
  """Hides constants from XLA's algebraic simplifier.

  With Python-float options the quantile bounds are compile-time constants,
  and XLA reassociates `w_lo + (1 - t) * 1.0` into `(w_lo + 1) - t`, which is
  0 at t = 1 (measured: edm gamma(1) = inf under jit, jax 0.10.2 CPU).
  """
  return jax.lax.optimization_barrier(values)


def _in_range(logsnr, lam_min, lam_max):
  return (logsnr >= lam_min) & (logsnr <= lam_max)


# ----------------------------------------------------------------- fixed_linear
def fixed_linear(t: jax.typing.ArrayLike, gamma_min: float = -13.3,
                 gamma_max: float = 5.0) -> jax.Array:
  """gamma(t) = gamma_min + (gamma_max - gamma_min) t; VDM's fixed schedule.

  Kingma et al. 2021 (arXiv:2107.00630); -13.3 and 5.0 are the defaults of
  the official VDM code. Written as `(1 - t) gamma_min + t gamma_max`, so
  both endpoints are exact.

  Args:
    t: [B] or [] times in [0, 1].
    gamma_min: gamma at t = 0 (-logsnr_max).
    gamma_max: gamma at t = 1 (-logsnr_min); must exceed gamma_min.
  Returns:
    gamma_t, same shape as t, float32.
  """
  process.check_gamma_range(gamma_min, gamma_max)
  t = jnp.asarray(t, jnp.float32)
  return (1.0 - t) * gamma_min + t * gamma_max


def fixed_linear_density(logsnr: jax.typing.ArrayLike, *,
                         gamma_min: float = -13.3,
                         gamma_max: float = 5.0) -> jax.Array:
  """p(lam) of `fixed_linear`: uniform on [-gamma_max, -gamma_min]."""
  process.check_gamma_range(gamma_min, gamma_max)
  logsnr = jnp.asarray(logsnr, jnp.float32)
  inside = _in_range(logsnr, -gamma_max, -gamma_min)
  return jnp.where(inside, 1.0 / (gamma_max - gamma_min), 0.0)


# ----------------------------------------------------------------------- cosine
def cosine_shift(resolution: float, *, base: float = 64.0) -> float:
  """Log-SNR shift 2 log(base / resolution) of the shifted cosine schedule.

  Hoogeboom et al. 2023 ("simple diffusion", arXiv:2301.11093), section on
  adjusting the noise schedule; used by Kingma & Gao 2023. A resolution above
  `base` gives a negative shift (more noise at every t).
  """
  _check_positive("resolution", resolution)
  _check_positive("base", base)
  return 2.0 * math.log(base / resolution)


def _cosine_quantiles(lam_min, lam_max, shift):
  """u(lam_max), 1 - u(lam_min) and their gap, u(lam) = 2/pi atan(e^-(l/2))."""
  process.check_logsnr_range(lam_min, lam_max)
  u_lo = 2 / jnp.pi * jnp.arctan(jnp.exp(-0.5 * (lam_max - shift)))
  w_lo = 2 / jnp.pi * jnp.arctan(jnp.exp(0.5 * (lam_min - shift)))
  return u_lo, w_lo, 1.0 - (u_lo + w_lo)


def cosine(t: jax.typing.ArrayLike, *, lam_min: float = -15.0,
           lam_max: float = 15.0, shift: float = 0.0) -> jax.Array:
  """Truncated (shifted) cosine schedule, lam = -2 log tan(pi u / 2) + shift.

  Nichol & Dhariwal 2021 (arXiv:2102.09672) cosine schedule in log-SNR form,
  as used (shifted) by Kingma & Gao 2023; `shift` as in `cosine_shift`.
  `u = u_lo + t (u_hi - u_lo)` where u_lo, u_hi solve lam(u) = lam_max, lam_min,
  so the returned log-SNR spans exactly [lam_min, lam_max] *after* the shift
  (simple diffusion truncates before shifting; here the bounds are what you
  get). For float32 accuracy near u = 1 the formula is evaluated as
  `gamma = 2 log sin(pi u / 2) - 2 log sin(pi (1 - u) / 2) - shift`, with
  1 - u formed from its own small endpoint.

  Args:
    t: [B] or [] times in [0, 1].
    lam_min: log-SNR at t = 1.
    lam_max: log-SNR at t = 0; must exceed lam_min.
    shift: added to the log-SNR, e.g. `cosine_shift(resolution)`.
  Returns:
    gamma_t, same shape as t, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  u_lo, w_lo, mass = _opaque(_cosine_quantiles(lam_min, lam_max, shift))
  u = u_lo + t * mass                   # increasing, u(0) = u_lo
  w = w_lo + (1.0 - t) * mass           # = 1 - u, accurate where u ~ 1
  half_pi = 0.5 * jnp.pi
  return (2.0 * (jnp.log(jnp.sin(half_pi * u)) - jnp.log(jnp.sin(half_pi * w)))
          - shift)


def cosine_density(logsnr: jax.typing.ArrayLike, *, lam_min: float = -15.0,
                   lam_max: float = 15.0, shift: float = 0.0) -> jax.Array:
  """p(lam) of `cosine`: sech((lam - shift) / 2) / (2 pi (u_hi - u_lo)).

  From |du/dlam| = sech((lam - shift) / 2) / (2 pi) for the untruncated
  schedule, renormalised by the kept quantile mass; 0 outside the support.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  _, _, mass = _cosine_quantiles(lam_min, lam_max, shift)
  half = 0.5 * jnp.abs(logsnr - shift)
  sech = 2.0 * jnp.exp(-half) / (1.0 + jnp.exp(-2.0 * half))
  density = sech / (2.0 * jnp.pi * mass)
  return jnp.where(_in_range(logsnr, lam_min, lam_max), density, 0.0)


# -------------------------------------------------------------------------- edm
def _edm_quantiles(mean, std, lam_min, lam_max):
  """Standard-normal bounds z_lo, z_hi, Phi(z_lo), 1 - Phi(z_hi), kept mass."""
  process.check_logsnr_range(lam_min, lam_max)
  _check_positive("std", std)
  z_lo = (-0.5 * lam_max - mean) / std       # log sigma = -lam / 2
  z_hi = (-0.5 * lam_min - mean) / std
  u_lo, w_lo = special.ndtr(z_lo), special.ndtr(-z_hi)
  # Difference of the two tails on the side where it does not cancel.
  mass = jnp.where(z_lo > 0, special.ndtr(-z_lo) - w_lo,
                   special.ndtr(z_hi) - u_lo)
  return u_lo, w_lo, mass


def edm(t: jax.typing.ArrayLike, *, mean: float = -1.2, std: float = 1.2,
        lam_min: float = -20.0, lam_max: float = 20.0) -> jax.Array:
  """EDM training noise levels: gamma = 2 log sigma, log sigma ~ N(mean, std^2).

  Karras et al. 2022 (arXiv:2206.00364), training section (P_mean = -1.2,
  P_std = 1.2); the variance-exploding sigma maps to gamma = log sigma^2 (SNR
  = 1 / sigma^2). `log sigma = mean + std Phi^{-1}(u)`, u = u_lo + t (u_hi -
  u_lo), truncated so lam in [lam_min, lam_max]. Phi^{-1} of u > 1/2 is
  evaluated as -Phi^{-1}(1 - u) with 1 - u formed from its own small endpoint,
  so the upper tail stays finite in float32.

  Args:
    t: [B] or [] times in [0, 1].
    mean: mean of log sigma.
    std: standard deviation of log sigma (> 0).
    lam_min: log-SNR at t = 1.
    lam_max: log-SNR at t = 0; must exceed lam_min.
  Returns:
    gamma_t, same shape as t, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  u_lo, w_lo, mass = _opaque(_edm_quantiles(mean, std, lam_min, lam_max))
  u = u_lo + t * mass
  w = w_lo + (1.0 - t) * mass           # = 1 - u
  lower = u < 0.5
  # Both branches see safe inputs, so neither leaks inf/nan into gradients.
  z = jnp.where(lower, special.ndtri(jnp.where(lower, u, 0.5)),
                -special.ndtri(jnp.where(lower, 0.5, w)))
  return 2.0 * (mean + std * z)


def edm_density(logsnr: jax.typing.ArrayLike, *, mean: float = -1.2,
                std: float = 1.2, lam_min: float = -20.0,
                lam_max: float = 20.0) -> jax.Array:
  """p(lam) of `edm`: N(-lam / 2; mean, std^2) / (2 * kept mass), 0 outside."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  _, _, mass = _edm_quantiles(mean, std, lam_min, lam_max)
  z = (-0.5 * logsnr - mean) / std
  density = jnp.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * std * 2 * mass)
  return jnp.where(_in_range(logsnr, lam_min, lam_max), density, 0.0)


# ---------------------------------------------------------------------- by name
_SCHEDULES = {"fixed_linear": fixed_linear, "cosine": cosine, "edm": edm}
_DENSITIES = {"fixed_linear": fixed_linear_density, "cosine": cosine_density,
              "edm": edm_density}


def _lookup(table, name: str, kwargs, kind: str):
  if name not in table:
    known = ", ".join(sorted(table))
    raise ValueError(f"unknown {kind} {name!r}; known: {known}. Set "
                     "config.model.schedule to one of them.")
  fn = table[name]
  options = [p for p in inspect.signature(fn).parameters][1:]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise TypeError(f"{kind} {name!r} has no option(s) {unknown}; its options "
                    f"are {options}.")
  fn = functools.partial(fn, **kwargs)
  jax.eval_shape(fn, jax.ShapeDtypeStruct((), jnp.float32))  # checks values
  return fn


def get(name: str, **kwargs) -> process.GammaFn:
  """The parameter-free schedule `name` as `gamma_fn(t)`, options bound.

  Args:
    name: one of 'fixed_linear', 'cosine', 'edm'.
    **kwargs: that schedule's options (checked here, not at first call).
  Returns:
    gamma_fn: [B] -> [B].

  Example:
    >>> gamma_fn = get("cosine", shift=cosine_shift(128))
    >>> gamma_fn(jnp.array([0.0, 1.0])).round(2)
    Array([-15.,  15.], dtype=float32)
  """
  return _lookup(_SCHEDULES, name, kwargs, "schedule")


def get_density(name: str, **kwargs) -> DensityFn:
  """The closed-form log-SNR density of schedule `name`: p(logsnr) [...]."""
  return _lookup(_DENSITIES, name, kwargs, "schedule")
