"""The VDM model: a noise schedule and a score network, composed with `elbo`.

Flax modules hold parameters only (the learned schedule, the network); this
module turns parameters into the closures `gamma_fn(t)` and
`eps_fn(z_t, gamma_t)` and calls the pure loss terms of `vdm.elbo`. All ELBO
algebra lives in `elbo`; nothing here draws randomness except from explicit
keys. Names in the config are resolved to functions once, when the `Model`
is built; `model_options` holds the registries and every rule on the options
(`config_lib.validate` applies the same rules before the dataset is opened).

Two losses are computed from the same pieces:

* the **training objective** (`training_loss`): reconstruction + prior + one
  diffusion objective, chosen when the model is built; each reads as
  NVlabs/edm's `training/loss.py` (draw the noise level, weight, denoise,
  weighted square):
  - `elbo_loss`: the VDM bound with the model's schedule, continuous or
    T-step;
  - `weighted_loss`: Kingma & Gao's weighted loss, its noise levels drawn
    from the training p(lambda) (a fixed cosine / EDM schedule, the adaptive
    one, or the model's own);
  - `variance_minimizing_loss`: the continuous ELBO whose gradient to a
    learned schedule's shape minimises the estimator's variance;
* the **ELBO** (`elbo_terms`): always the unweighted continuous-time (or
  T-step) VDM bound with the model's own schedule, so bits per dim are
  comparable across weightings.

References:
  Kingma, Salimans, Poole, Ho. Variational Diffusion Models. 2021,
  arXiv:2107.00630.
  Kingma, Gao. Understanding Diffusion Objectives as the ELBO with Simple
  Data Augmentation. 2023, arXiv:2303.00848.
  Karras, Aittala, Aila, Laine. Elucidating the Design Space of
  Diffusion-Based Generative Models. 2022, arXiv:2206.00364.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm import elbo
from vdm import model_options
from vdm import nets
from vdm import process
from vdm import schedules
from vdm import weighting as weighting_lib

Params = Mapping[str, Any]
Labels = jax.Array | None                            # [B] int32 or None
# An objective's (L_diff [B], gamma_t [B], gamma'(t) [B]).
LossAndLevels = tuple[jax.Array, jax.Array, jax.Array]


def _derived():
  """A field set in `__post_init__` from the options (not in ==, hash)."""
  return dataclasses.field(init=False, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Model:
  """A VDM: schedule + network + loss settings. Immutable and hashable.

  Attributes:
    net: the score network (a Flax module following the `vdm.nets` API).
    schedule: a name in `model_options.MODEL_SCHEDULES`.
    gamma_min, gamma_max: the schedule's (initial) endpoints gamma(0), gamma(1).
    vocab_size: number of data levels (256 for 8-bit images).
    data_shape: per-example shape, e.g. (28, 28, 1).
    num_steps: 0 for continuous time, T > 0 for the T-step loss.
    weighting: name in `vdm.weighting` (`'elbo'` = the plain ELBO).
    weighting_kwargs: its parameters, as sorted (name, value) pairs.
    noise_schedule: the training p(lambda), a name in
      `model_options.NOISE_SCHEDULES` ('model': the model's own schedule).
    noise_schedule_kwargs: its parameters, as sorted (name, value) pairs.
    parameterization: what the network predicts: `'eps'`, `'x'` or `'v'`.
    variance_minimization: learn the schedule's shape by minimising the
      variance of the diffusion loss (VDM paper, section on learning the
      noise schedule); only with a learned schedule in continuous time.
    antithetic: low-discrepancy times t_i = mod(u + i/B, 1).
    num_classes: 0 for an unconditional model.
    p_uncond: probability of dropping a label to the null label in training
      (classifier-free guidance).
  Derived once from these: `schedule_module` (None for 'fixed_linear') and
  the training noise schedule, weighting and diffusion objective.
  """
  net: nn.Module
  schedule: str = "learned_linear"
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  vocab_size: int = 256
  data_shape: tuple[int, ...] = (28, 28, 1)
  num_steps: int = 0
  weighting: str = "elbo"
  weighting_kwargs: tuple[tuple[str, Any], ...] = ()
  noise_schedule: str = "model"
  noise_schedule_kwargs: tuple[tuple[str, Any], ...] = ()
  parameterization: str = "eps"
  variance_minimization: bool = False
  antithetic: bool = True
  num_classes: int = 0
  p_uncond: float = 0.0
  schedule_module: nn.Module | None = _derived()
  _noise_fn: model_options.NoiseFn = _derived()
  _weighting_fn: Callable[[jax.Array], jax.Array] | None = _derived()
  _objective: Callable[..., LossAndLevels] = _derived()

  def __post_init__(self):
    model_options.check(
        schedule=self.schedule, gamma_min=self.gamma_min,
        gamma_max=self.gamma_max, vocab_size=self.vocab_size,
        num_steps=self.num_steps, weighting=self.weighting,
        weighting_kwargs=dict(self.weighting_kwargs),
        noise_schedule=self.noise_schedule,
        noise_schedule_kwargs=dict(self.noise_schedule_kwargs),
        parameterization=self.parameterization,
        variance_minimization=self.variance_minimization,
        conditional=self.num_classes > 0, p_uncond=self.p_uncond)
    # Names -> functions, here and nowhere else (the dataclass is frozen).
    setattr_ = functools.partial(object.__setattr__, self)
    module = model_options.MODEL_SCHEDULES[self.schedule]
    setattr_("schedule_module", None if module is None else module(
        gamma_min=self.gamma_min, gamma_max=self.gamma_max))
    setattr_("_noise_fn", model_options.NOISE_SCHEDULES[self.noise_schedule](
        dict(self.noise_schedule_kwargs), resolution=self.data_shape[0],
        model_gamma_fn=self.gamma_fn))
    setattr_("_weighting_fn", None if self.weighting == "elbo" else
             weighting_lib.get(self.weighting, **dict(self.weighting_kwargs)))
    if self.variance_minimization:
      setattr_("_objective", self.variance_minimizing_loss)
    elif self.weighting == "elbo" and self.noise_schedule == "model":
      setattr_("_objective", self.elbo_loss)
    else:
      setattr_("_objective", self.weighted_loss)

  @property
  def num_dims(self) -> int:
    return math.prod(self.data_shape)

  def init(self, key: jax.Array) -> dict[str, Any]:
    """Initial parameters {'net': ..., 'schedule': ...} (no allocation in
    `jax.eval_shape`)."""
    key_net, key_schedule = jax.random.split(key)
    z = jnp.zeros((1, *self.data_shape), jnp.float32)
    gamma = jnp.zeros((1,), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    params = {"net": self.net.init(
        {"params": key_net}, z, gamma, labels, train=False)["params"]}
    if self.schedule_module is not None:
      params["schedule"] = self.schedule_module.init(
          key_schedule, jnp.zeros((1,)))["params"]
    return params

  # -------------------------------------------------------------- closures

  def gamma_fn(self, params: Params) -> process.GammaFn:
    """The model's schedule gamma(t) = -log SNR(t) as a closure."""
    if self.schedule_module is None:
      return functools.partial(schedules.fixed_linear,
                               gamma_min=self.gamma_min,
                               gamma_max=self.gamma_max)
    variables = {"params": params["schedule"]}
    return lambda t: self.schedule_module.apply(variables, t)

  def endpoints(self, params: Params) -> tuple[jax.Array, jax.Array]:
    """(gamma_0, gamma_1), each [] float32."""
    gamma_fn = self.gamma_fn(params)
    gamma = gamma_fn(jnp.array([0.0, 1.0]))
    return gamma[0], gamma[1]

  def eps_fn(self, params: Params, labels: jax.Array | None = None, *,
             train: bool = False,
             key_dropout: jax.Array | None = None) -> process.EpsFn:
    """eps_hat(z_t, gamma_t) as a closure over the network's parameters."""
    variables = {"params": params["net"]}
    rngs = {"dropout": key_dropout} if (train and key_dropout is not None) \
        else {}

    def eps_fn(z_t, gamma_t):
      gamma_t = jnp.broadcast_to(gamma_t, z_t.shape[:1])
      out = self.net.apply(variables, z_t, gamma_t, labels, train=train,
                           rngs=rngs)
      return process.to_eps(
          out, z_t, gamma_t, parameterization=self.parameterization)

    return eps_fn

  def noise_gamma_fn(self, params: Params,
                     adaptive_state=None) -> process.GammaFn:
    """The training noise schedule: t ~ U(0, 1) -> gamma, i.e. p(lambda)."""
    return self._noise_fn(params, adaptive_state)

  def init_adaptive(self):
    """Initial adaptive-schedule state, or None when not used."""
    if self.noise_schedule != "adaptive":
      return None
    return schedules.adaptive_init(**dict(self.noise_schedule_kwargs))

  # ------------------------------------------------------------ objectives
  # One per objective, chosen in __post_init__. Each takes f [B, ...] (the
  # encoded data) and draws t ~ U(0, 1) and eps from its keys; it returns
  # (L_diff [B], gamma_t [B], gamma'(t) [B]): the loss, the noise levels
  # drawn and 1 / p(lambda) at them.

  def _draw(self, f, key_t, key_eps):
    t = elbo.sample_times(key_t, f.shape[0], antithetic=self.antithetic)
    return t, jax.random.normal(key_eps, f.shape)         # [B], [B, ...]

  def elbo_loss(self, params: Params, f: jax.Array, labels: Labels,
                key_t: jax.Array, key_eps: jax.Array, key_dropout: jax.Array,
                adaptive_state=None) -> LossAndLevels:
    """The VDM bound's diffusion term with the model's schedule gamma(t).

    Continuous: 0.5 gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2; T steps:
    0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2 with t on the grid,
    s = t - 1/T (Kingma et al. 2021, "Continuous-time model: T -> infinity"
    and "Discrete-time model").
    """
    del adaptive_state
    gamma_fn = self.gamma_fn(params)
    t, eps = self._draw(f, key_t, key_eps)                # t ~ U(0, 1)
    gamma_t, dgamma_dt = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    eps_fn = self.eps_fn(params, labels, train=True, key_dropout=key_dropout)
    if self.num_steps == 0:   # 0.5 * gamma'(t) * ||eps - eps_hat||^2
      loss = elbo.continuous_diffusion_loss(eps_fn, f, gamma_t, dgamma_dt, eps)
    else:                     # on the grid t_i = i / T, s = t - 1/T
      loss = elbo.diffusion_loss(eps_fn, gamma_fn, f, t, eps,
                                 num_steps=self.num_steps)
    return loss, gamma_t, dgamma_dt

  def weighted_loss(self, params: Params, f: jax.Array, labels: Labels,
                    key_t: jax.Array, key_eps: jax.Array,
                    key_dropout: jax.Array,
                    adaptive_state=None) -> LossAndLevels:
    """Kingma & Gao's weighted loss, importance-sampled from p(lambda).

    0.5 w(lambda) / p(lambda) ||eps - eps_hat(z_t, gamma_t)||^2 with
    gamma_t = gamma(t) of the training noise schedule, lambda = -gamma_t,
    so that p(lambda) = 1 / gamma'(t) (Kingma & Gao 2023, sections on the
    weighted loss and on importance sampling). w = 1 ('elbo') is the ELBO
    estimated with another p(lambda).
    """
    gamma_fn = self.noise_gamma_fn(params, adaptive_state)
    t, eps = self._draw(f, key_t, key_eps)                # t ~ U(0, 1)
    # lambda = -gamma_t ~ p(lambda), and gamma'(t) = 1 / p(lambda).
    gamma_t, dgamma_dt = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
    eps_fn = self.eps_fn(params, labels, train=True, key_dropout=key_dropout)
    # 0.5 * w(lambda) * gamma'(t) * ||eps - eps_fn(z_t, gamma_t)||^2.
    loss = elbo.continuous_diffusion_loss(eps_fn, f, gamma_t, dgamma_dt, eps,
                                          weighting=self._weighting_fn)
    return loss, gamma_t, dgamma_dt

  def variance_minimizing_loss(self, params: Params, f: jax.Array,
                               labels: Labels, key_t: jax.Array,
                               key_eps: jax.Array, key_dropout: jax.Array,
                               adaptive_state=None) -> LossAndLevels:
    """The continuous ELBO term whose gradient to the schedule's *shape*
    parameters is that of E[L_diff^2] (VDM paper, section on learning the
    noise schedule); the endpoints and the network get the ELBO gradient.

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) * shape(t); the per-example pair
    (shape(t_i), shape'(t_i)) carries all of the shape parameters' influence,
    and `schedules.variance_minimizing` scales its cotangent by 2 L_i.
    """
    del adaptive_state
    t, eps = self._draw(f, key_t, key_eps)
    gamma_t, dgamma_dt = jax.jvp(self.gamma_fn(params), (t,),
                                 (jnp.ones_like(t),))     # returned only
    module = self.schedule_module
    p_schedule = params["schedule"]
    p_shape_only = {k: v for k, v in p_schedule.items() if "shape" in k}
    p_endpoints = {k: v for k, v in p_schedule.items() if "shape" not in k}

    def shape_fn(t_):
      variables = {"params": {**p_endpoints, **p_shape_only}}
      return module.apply(variables, t_, method="shape")

    # shape(t) depends on the shape parameters only, never the endpoints.
    shape_t, dshape_dt = jax.jvp(shape_fn, (t,), (jnp.ones_like(t),))

    def per_example_loss(per_example, args):
      s_t, ds_t = per_example
      p_end, p_net = args
      gamma_0, gamma_1 = module.apply({"params": p_end}, method="endpoints")
      eps_fn = self.eps_fn({"net": p_net}, labels, train=True,
                           key_dropout=key_dropout)
      return elbo.continuous_diffusion_loss(
          eps_fn, f, gamma_0 + (gamma_1 - gamma_0) * s_t,
          (gamma_1 - gamma_0) * ds_t, eps)

    loss = schedules.variance_minimizing(per_example_loss)(
        (shape_t, dshape_dt), (p_endpoints, params["net"]))
    return loss, gamma_t, dgamma_dt

  # ---------------------------------------------------------------- losses

  def _recon_prior(self, params, x, f, key):
    gamma_0, gamma_1 = self.endpoints(params)
    eps_0 = jax.random.normal(key, f.shape)
    z_0 = elbo.diffuse(f, jnp.broadcast_to(gamma_0, f.shape[:1]), eps_0)
    loss_recon = elbo.reconstruction_loss(x, z_0, gamma_0, self.vocab_size)
    loss_prior = elbo.prior_loss(f, gamma_1)
    return loss_recon, loss_prior  # [B] nats each

  def elbo_terms(self, params: Params, x: jax.Array, labels, key: jax.Array,
                 t: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-example ELBO terms in nats (unweighted, the model's schedule).

    Args:
      params: {'net', 'schedule'} parameters (EMA ones for evaluation).
      x: [B, ...] integer data in [0, vocab_size).
      labels: [B] int32 or None.
      key: consumed for t, eps and eps_0.
      t: [B] diffusion times to use instead of the ones `key` draws
        (`elbo_times(key, B)`), e.g. stratified over several draws.
    Returns:
      {'recon', 'prior', 'diff', 'total'}: each [B] nats.
    """
    key_recon, key_t, key_eps = jax.random.split(key, 3)
    f = elbo.encode(x, self.vocab_size)
    loss_recon, loss_prior = self._recon_prior(params, x, f, key_recon)
    drawn, eps = self._draw(f, key_t, key_eps)
    t = drawn if t is None else t
    loss_diff = elbo.diffusion_loss(
        self.eps_fn(params, labels), self.gamma_fn(params), f, t, eps,
        num_steps=self.num_steps)
    return {"recon": loss_recon, "prior": loss_prior, "diff": loss_diff,
            "total": loss_recon + loss_prior + loss_diff}

  def elbo_times(self, key: jax.Array, batch_size: int) -> jax.Array:
    """[B] the diffusion times `elbo_terms(..., key)` draws."""
    _, key_t, _ = jax.random.split(key, 3)
    return elbo.sample_times(key_t, batch_size, antithetic=self.antithetic)

  def training_loss(self, params: Params, x: jax.Array, labels, key: jax.Array,
                    adaptive_state=None) -> tuple[jax.Array, dict]:
    """The training objective (mean over the batch) and per-example extras.

    Returns:
      (loss [] nats per example, aux) with aux = {'recon', 'prior', 'diff'
      ([B] nats; 'diff' is the weighted diffusion loss), 'logsnr' ([B], the
      noise levels drawn), 'weighted_mse' ([B], w(lambda) ||eps - eps_hat||^2
      per dimension, what the adaptive schedule's histogram tracks)}.
    """
    key_recon, key_t, key_eps, key_dropout, key_label = jax.random.split(
        key, 5)
    if self.num_classes and self.p_uncond > 0:
      drop = jax.random.bernoulli(key_label, self.p_uncond, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)  # null label
    f = elbo.encode(x, self.vocab_size)
    loss_recon, loss_prior = self._recon_prior(params, x, f, key_recon)
    loss_diff, gamma_t, dgamma_dt = self._objective(
        params, f, labels, key_t, key_eps, key_dropout, adaptive_state)
    # Extras for the adaptive histogram: lambda and w * mse (per dimension);
    # dividing out gamma'(t) = 1/p(lambda) undoes the importance weight.
    gamma_t = jax.lax.stop_gradient(gamma_t)
    dgamma_dt = jax.lax.stop_gradient(dgamma_dt)
    weighted_mse = jax.lax.stop_gradient(loss_diff) * 2.0 / (
        jnp.maximum(dgamma_dt, 1e-12) * self.num_dims)
    if self.num_steps > 0:
      weighted_mse = jnp.zeros_like(weighted_mse)
    total = loss_recon + loss_prior + loss_diff
    aux = {"recon": loss_recon, "prior": loss_prior, "diff": loss_diff,
           "logsnr": -gamma_t, "weighted_mse": weighted_mse}
    return jnp.mean(total), aux


def build(model_config, data_shape: tuple[int, ...], vocab_size: int,
          num_classes: int) -> Model:
  """The one factory from `config.model` (+ dataset facts) to a `Model`."""
  net_kwargs = dict(model_config.net_kwargs)
  num_classes = num_classes if model_config.conditional else 0
  net = nets.get(model_config.net, num_classes=num_classes,
                 gamma_min=model_config.gamma_min,
                 gamma_max=model_config.gamma_max, **net_kwargs)
  return Model(
      net=net,
      schedule=model_config.schedule,
      gamma_min=float(model_config.gamma_min),
      gamma_max=float(model_config.gamma_max),
      vocab_size=int(vocab_size),
      data_shape=tuple(int(d) for d in data_shape),
      num_steps=int(model_config.num_steps),
      weighting=model_config.weighting,
      weighting_kwargs=tuple(sorted(dict(model_config.weighting_kwargs)
                                    .items())),
      noise_schedule=model_config.noise_schedule,
      noise_schedule_kwargs=tuple(sorted(
          dict(model_config.noise_schedule_kwargs).items())),
      parameterization=model_config.parameterization,
      variance_minimization=bool(model_config.variance_minimization),
      antithetic=bool(model_config.antithetic),
      num_classes=num_classes,
      p_uncond=float(model_config.p_uncond),
  )
