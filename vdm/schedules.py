"""Noise schedules gamma(t) = -logsnr(t) and their log-SNR densities.

Every schedule maps t in [0, 1] to gamma_t, strictly increasing, elementwise
(`[B] -> [B]`, `[] -> []`), float32. Drawing `t ~ U(0, 1)` makes the log-SNR
`lam = -gamma(t)` a random variable with density `p(lam) = 1 / |dlam/dt|`
(Kingma & Gao 2023, arXiv:2303.00848, section on weighted losses / importance
sampling), which the `*_density` functions give in closed form.

- Fixed: `fixed_linear` (VDM, Kingma et al. 2021, arXiv:2107.00630), `cosine`
  (optionally shifted), `edm` (Karras et al. 2022, arXiv:2206.00364); `get`.
- Learned (Flax): `LearnedLinear`, `MonotoneNet`, and `variance_minimizing`
  for the VDM variance-minimising gradient of the schedule's shape.
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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy import special

from vdm import adaptive
from vdm import process

# p(logsnr [...]) -> [...] density of the log-SNR.
DensityFn = Callable[[jax.Array], jax.Array]

AdaptiveState = adaptive.AdaptiveState
adaptive_init = adaptive.init
adaptive_update = adaptive.update
adaptive_density = adaptive.density
adaptive_gamma = adaptive.gamma


def _check_gamma_range(gamma_min, gamma_max) -> None:
  if (process.is_concrete(gamma_min, gamma_max)
      and not float(gamma_min) < float(gamma_max)):
    raise ValueError(
        f"gamma_min={float(gamma_min)!r} must be < gamma_max="
        f"{float(gamma_max)!r} (gamma = -logsnr increases from t=0 to t=1); "
        "swap them or pick e.g. gamma_min=-13.3, gamma_max=5.0.")


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
  _check_gamma_range(gamma_min, gamma_max)
  t = jnp.asarray(t, jnp.float32)
  return (1.0 - t) * gamma_min + t * gamma_max


def fixed_linear_density(logsnr: jax.typing.ArrayLike, *,
                         gamma_min: float = -13.3,
                         gamma_max: float = 5.0) -> jax.Array:
  """p(lam) of `fixed_linear`: uniform on [-gamma_max, -gamma_min]."""
  _check_gamma_range(gamma_min, gamma_max)
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


# ------------------------------------------------------------ learned schedules
def _inverse_softplus(y: float) -> float:
  return y + math.log(-math.expm1(-y))


class _Normalised(nn.Module):
  """gamma(t) = gamma_0 + (gamma_1 - gamma_0) shape(t), learned endpoints.

  Parameters (top level): `gamma_0` [] and `span_raw` [], with
  `gamma_1 = gamma_0 + softplus(span_raw)`, so gamma_1 > gamma_0 for every
  parameter value (in float32 while the span exceeds ~1e-7 |gamma_0|).
  Shape parameters, if any, live under `params['shape']`, so a caller splits
  the tree into endpoint and shape parameters by that key.
  """
  gamma_min: float = -13.3   # initial gamma_0
  gamma_max: float = 5.0     # initial gamma_1

  def _endpoint_params(self):
    _check_gamma_range(self.gamma_min, self.gamma_max)
    span = _inverse_softplus(self.gamma_max - self.gamma_min)
    gamma_0 = self.param("gamma_0", nn.initializers.constant(self.gamma_min),
                         (), jnp.float32)
    span_raw = self.param("span_raw", nn.initializers.constant(span), (),
                          jnp.float32)
    return gamma_0, span_raw

  def endpoints(self) -> tuple[jax.Array, jax.Array]:
    """(gamma_0, gamma_1), float32 scalars; `self(0)`, `self(1)` are these."""
    span = jax.nn.softplus(self.span_raw)
    return self.gamma_0, self.gamma_0 + span

  def __call__(self, t: jax.typing.ArrayLike) -> jax.Array:
    """gamma_t, same shape as t ([B] or []), float32."""
    span = jax.nn.softplus(self.span_raw)
    # gamma_0 + span * 1 is the same float operation as endpoints()[1].
    return self.gamma_0 + span * self.shape(t)


class LearnedLinear(_Normalised):
  """Linear schedule with learned endpoints: shape(t) = t.

  Kingma et al. 2021 (arXiv:2107.00630), learned noise schedule. Params:
  `gamma_0`, `span_raw` (top level, see `_Normalised`); no shape parameters.
  """

  def setup(self):
    self.gamma_0, self.span_raw = self._endpoint_params()

  def shape(self, t: jax.typing.ArrayLike) -> jax.Array:
    """Normalised shape in [0, 1]: t itself."""
    return jnp.asarray(t, jnp.float32)


class _PositiveDense(nn.Module):
  """Dense layer with weights softplus(kernel) > 0: increasing in its input."""
  features: int
  kernel_init: Callable[..., Any]
  bias_init: Callable[..., Any] = nn.initializers.zeros
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (x.shape[-1], self.features), jnp.float32)
    y = x @ jax.nn.softplus(kernel)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,),
                         jnp.float32)
    return y


class _MonotoneShapeNet(nn.Module):
  """g(t) = l1(t) + l3(sigmoid(l2(l1(t)))), all weights positive; [N] -> [N].

  Initialised as l1(t) = t, l2 with random slopes softplus(N(0, 1)) and
  offsets N(0, 1), l3 weights 1 / num_features: over t in [0, 1] the sigmoid
  branch changes by about a fifth as much as l1, and nearly linearly, so the
  normalised shape starts within ~0.5% of t (measured 0.44% at 16 and 0.39%
  at 1024 features).
  """
  num_features: int

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    one = nn.initializers.constant(_inverse_softplus(1.0))
    l1 = _PositiveDense(1, kernel_init=one, name="l1")
    normal = nn.initializers.normal(1.0)
    l2 = _PositiveDense(self.num_features, normal, normal, name="l2")
    small = nn.initializers.constant(_inverse_softplus(1 / self.num_features))
    l3 = _PositiveDense(1, kernel_init=small, use_bias=False, name="l3")
    h = l1(t[:, None])                                       # [N, 1]
    return (h + l3(jax.nn.sigmoid(l2(h))))[:, 0]            # [N]


class MonotoneNet(_Normalised):
  """VDM's learned monotone schedule with exact, separately learned endpoints.

  Kingma et al. 2021 (arXiv:2107.00630), learned noise schedule (continuous-
  time model) and the appendix on the monotonic network: l1 = linear(1), l2 =
  linear(num_features) with sigmoid, l3 = linear(1), positive weights,
  g(t) = l1(t) + l3(sigmoid(l2(l1(t)))). Here g only gives the shape,
  `shape(t) = (g(t) - g(0)) / (g(1) - g(0))`, and `gamma = gamma_0 +
  (gamma_1 - gamma_0) shape(t)`, so the endpoints are exactly the learned
  `gamma_0`, `gamma_1` and the shape cannot move them. Weights are
  softplus(kernel) rather than |kernel|: strictly positive for every
  parameter value, so g is strictly increasing and g(1) - g(0) > 0 always
  (|kernel| can hit 0 and has a kink there); l1 has a weight too, so the
  shape is strictly increasing even if the sigmoid branch vanishes. l3 has no
  bias (it cancels in the normalisation).

  Params: `gamma_0`, `span_raw` (top level); `shape/l1/{kernel,bias}`,
  `shape/l2/{kernel,bias}`, `shape/l3/kernel`.
  """
  num_features: int = 1024

  def setup(self):
    if self.num_features < 1:
      raise ValueError(f"num_features={self.num_features!r} must be >= 1.")
    self.gamma_0, self.span_raw = self._endpoint_params()
    self.shape_net = _MonotoneShapeNet(self.num_features, name="shape")

  def shape(self, t: jax.typing.ArrayLike) -> jax.Array:
    """Normalised shape in [0, 1], strictly increasing; exact at 0 and 1.

    Args:
      t: [B] or [] times in [0, 1].
    Returns:
      Same shape as t. shape(0) == 0 and shape(1) == 1 exactly: the rounding
      residue there (g(t) and g(0) may differ in the last bit when computed at
      other batch positions) is removed by a stop-gradient correction, which
      leaves the derivative, dshape/dt = g'(t) / (g(1) - g(0)), untouched.
    """
    t = jnp.asarray(t, jnp.float32)
    flat = t.reshape(-1)
    g = self.shape_net(jnp.concatenate([flat, jnp.array([0.0, 1.0])]))
    ratio = (g[:-2] - g[-2]) / (g[-1] - g[-2])
    residue = jnp.where(flat == 0, -ratio, jnp.where(flat == 1, 1 - ratio, 0))
    return (ratio + jax.lax.stop_gradient(residue)).reshape(t.shape)


# ---------------------------------------------------------- variance minimising
def variance_minimizing(loss_fn: Callable[[Any, Any], jax.Array]
                        ) -> Callable[[Any, Any], jax.Array]:
  """Wraps loss_fn so gradients via `per_example` are those of E[L^2].

  VDM (Kingma et al. 2021, arXiv:2107.00630), learning the noise schedule by
  variance minimisation (continuous-time model and its appendix): the shape
  of gamma between its endpoints leaves the continuous-time ELBO unchanged,
  so its parameters are trained to minimise the variance of the diffusion
  loss estimator, i.e. with the gradient of E[L^2] (the mean is fixed), while
  everything else keeps the ELBO gradient.

  `wrapped(per_example, args)` returns `loss_fn(per_example, args)` unchanged.
  Its VJP to `args` is the ordinary one; the cotangent to row i of every leaf
  of `per_example` is multiplied by `2 L_i`, since
  d/dtheta mean_i L_i^2 = mean_i 2 L_i dL_i/dtheta. One backward pass:
  `jax.custom_vjp` whose forward keeps `jax.vjp`'s function and L as
  residuals. This is valid only if example i's loss depends on row i of
  `per_example` alone (true for a per-example schedule evaluation), so that
  each row's cotangent is g_i dL_i/d(row i).

  Usage (the model switches it on from config): per_example =
  `jax.jvp(shape_fn, (t,), (ones,))`, i.e. (shape_t, dshape_dt), with the
  shape parameters closed over by `shape_fn`; everything else that needs a
  gradient (network and endpoint params, data) goes in `args`. `loss_fn` must
  not close over traced values that need gradients: pass them in `args`.

  Args:
    loss_fn: (per_example, args) -> L [B]; per_example is a pytree whose
      leaves have leading dimension B, args any pytree.
  Returns:
    wrapped_loss_fn with the same signature and values.
  """

  def check(loss, per_example):
    for leaf in jax.tree_util.tree_leaves(per_example):
      if loss.ndim != 1 or jnp.shape(leaf)[:1] != loss.shape:
        raise ValueError(
            "loss_fn must return [B] and every per_example leaf must have "
            f"leading dimension B; got loss {loss.shape} and a leaf "
            f"{jnp.shape(leaf)}.")

  @jax.custom_vjp
  def wrapped(per_example, args):
    loss = loss_fn(per_example, args)
    check(loss, per_example)
    return loss

  def forward(per_example, args):
    loss, vjp_fn = jax.vjp(loss_fn, per_example, args)
    check(loss, per_example)
    return loss, (loss, vjp_fn)

  def backward(residuals, cotangent):
    loss, vjp_fn = residuals
    ct_per_example, ct_args = vjp_fn(cotangent)
    scale = 2.0 * loss                                       # [B]

    def rescale(ct):
      if ct.dtype == jax.dtypes.float0:
        return ct
      return ct * scale.reshape((-1,) + (1,) * (ct.ndim - 1)).astype(ct.dtype)

    return jax.tree_util.tree_map(rescale, ct_per_example), ct_args

  wrapped.defvjp(forward, backward)
  return wrapped
