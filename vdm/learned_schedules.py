"""Learned noise schedules (Flax) and the variance-minimising gradient.

Kingma et al. 2021 (arXiv:2107.00630), learned noise schedule: the endpoints
gamma_0 = gamma(0) and gamma_1 = gamma(1) are learned by the ELBO, the shape
in between (which leaves the continuous-time ELBO unchanged) by minimising the
variance of the diffusion-loss estimator (`variance_minimizing`).

- `LearnedLinear`: learned endpoints, linear shape.
- `MonotoneNet`: learned endpoints, shape from a monotone network.

Every schedule maps t in [0, 1] to gamma_t, strictly increasing, elementwise,
float32. Re-exported by `vdm.schedules` beside the fixed schedules.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm import checks
from vdm import process


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
    process.check_gamma_range(self.gamma_min, self.gamma_max)
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
    checks.check_int("num_features", self.num_features, minimum=1,
                     hint="Use e.g. 1024 (the VDM paper's width).")
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
