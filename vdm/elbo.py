"""The VDM evidence lower bound: pure loss terms in nats, per example.

  -log p(x) <= L_recon + L_prior + L_diff

Every function takes arrays (and, for the diffusion loss, the two closures
`eps_fn` and `gamma_fn`) and returns arrays; randomness enters as arrays (`t`,
`eps`) or an explicit key. All functions are jit- and vmap-friendly; argument
checks run in Python on static shapes at trace time.

Conventions (Kingma et al. 2021, arXiv:2107.00630, section "Model"): `gamma`
is -log SNR, `logsnr = -gamma`, `alpha_t^2 = sigmoid(-gamma_t)`,
`sigma_t^2 = sigmoid(gamma_t)` (variance preserving) and
`z_t = alpha_t f + sigma_t eps`. Everything is float32-safe for gamma in
[-30, 30], gradients included: square roots and logs of sigmoids go through
`log_sigmoid`/`softplus`, ratios of SNRs through `expm1`.

References:
  Kingma, Salimans, Poole, Ho. Variational Diffusion Models.
    https://arxiv.org/abs/2107.00630, 2021.
  Kingma, Gao. Understanding Diffusion Objectives as the ELBO with Simple Data
    Augmentation. https://arxiv.org/abs/2303.00848, 2023.
"""
import math
from typing import Union

import jax
import jax.numpy as jnp

from vdm import checks
from vdm import decoder
from vdm import process
from vdm import weighting as weighting_lib

# None (the ELBO), a name for `weighting.get`, or w(logsnr).
WeightingArg = Union[None, str, weighting_lib.WeightFn]

# The forward process lives in `vdm.process`; `elbo.diffuse` is its name in
# DESIGN's API.
diffuse = process.diffuse


# ----------------------------------------------------------------------------
# Argument checks (plain Python on static shapes; free at run time).


def _check_vocab_size(vocab_size) -> None:
  checks.check_int(
      "vocab_size", vocab_size, minimum=2,
      hint="Pass the number of values a data element can take (256 for "
      "uint8 images).")


def _check_num_steps(num_steps) -> None:
  checks.check_int(
      "num_steps", num_steps, minimum=0,
      hint="Use 0 for the continuous-time loss or T > 0 for the discrete "
      "T-step loss.")


def _check_gamma_shape(gamma_t, t) -> None:
  shape = getattr(gamma_t, "shape", None)
  if shape != t.shape:
    raise ValueError(
        f"gamma_fn(t) must return one gamma per time, shape {t.shape}; got "
        f"shape {shape}. Make gamma_fn elementwise.")


def _resolve_weighting(weighting: WeightingArg):
  """None / name / callable -> None (the ELBO) or a callable w(logsnr)."""
  if weighting is None:
    return None
  if isinstance(weighting, str):
    weighting = weighting_lib.get(weighting)   # raises on unknown names
  if not callable(weighting):
    raise ValueError(
        f"weighting must be None, a registered name or a callable "
        f"w(logsnr); got {weighting!r}. Use vdm.weighting.get(name).")
  if getattr(weighting, "func", weighting) is weighting_lib.elbo:
    return None                                 # w = 1 is the ELBO itself
  return weighting


def _sum_per_example(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).sum(axis=-1)


# ----------------------------------------------------------------------------
# Encoder / decoder and the two endpoint terms.


def encode(x: jax.typing.ArrayLike, vocab_size: int) -> jax.Array:
  """Maps integer data to the centres of `vocab_size` bins in (-1, 1).

  `f = 2 * (x + 0.5) / vocab_size - 1`; Kingma et al. 2021, appendix on the
  discrete data likelihood (decoder).

  Args:
    x: [B, ...] integers in [0, vocab_size).
    vocab_size: number of values (256 for uint8 images), a Python int >= 2.
  Returns:
    [B, ...] float32 f in (-1, 1).

  Example:
    >>> from vdm import elbo
    >>> elbo.encode(jnp.array([0, 1]), 2).tolist()
    [-0.5, 0.5]
  """
  _check_vocab_size(vocab_size)
  x = jnp.asarray(x).astype(jnp.float32)
  return 2.0 * (x + 0.5) / vocab_size - 1.0


def decode_logits(z_0: jax.typing.ArrayLike, gamma_0: jax.typing.ArrayLike,
                  vocab_size: int) -> jax.Array:
  """Logits of the factorised discrete decoder p(x | z_0).

  `z0_rescaled = z_0 / alpha_0`, `logits_v = -0.5 (z0_rescaled - f_v)^2 /
  exp(gamma_0)` for every value v; Kingma et al. 2021, appendix on the
  discrete data likelihood.

  Args:
    z_0: [B, ...] latent at t = 0.
    gamma_0: [] or [B] gamma at t = 0 (= -logsnr_0).
    vocab_size: number of values, a Python int >= 2.
  Returns:
    [B, ..., vocab_size] float32 logits (unnormalised log-probabilities).
  """
  _check_vocab_size(vocab_size)
  z_0 = jnp.asarray(z_0, jnp.float32)
  gamma_0 = jnp.asarray(gamma_0, jnp.float32)
  if gamma_0.ndim:
    process.check_per_example("gamma_0", gamma_0, z_0, f_name="z_0")
  gamma_0 = process.per_example(gamma_0, z_0.ndim)
  log_alpha_0, _ = process.log_alpha_sigma(gamma_0)
  z0_rescaled = z_0 * jnp.exp(-log_alpha_0)                 # z_0 / alpha_0
  f_values = encode(jnp.arange(vocab_size), vocab_size)     # [V]
  diff = z0_rescaled[..., None] - f_values                  # [B, ..., V]
  return -0.5 * jnp.square(diff) * jnp.exp(-gamma_0)[..., None]


def reconstruction_loss(x: jax.typing.ArrayLike, z_0: jax.typing.ArrayLike,
                        gamma_0: jax.typing.ArrayLike,
                        vocab_size: int) -> jax.Array:
  """-log p(x | z_0) under the factorised discrete decoder.

  Kingma et al. 2021, reconstruction term of the ELBO: `-sum(log_softmax(
  decode_logits(z_0, gamma_0))[x])` over all elements of one example.

  Computed by `vdm.decoder.log_prob` without the [B, ..., vocab_size]
  logits (a window of levels around z_0 where that is exact in float32) and
  with its gradient in closed form.

  Args:
    x: [B, ...] integers in [0, vocab_size).
    z_0: [B, ...] latent at t = 0, `alpha_0 f + sigma_0 eps_0`.
    gamma_0: [] or [B] gamma at t = 0.
    vocab_size: number of values, a Python int >= 2.
  Returns:
    [B] nats.
  """
  _check_vocab_size(vocab_size)
  x = jnp.asarray(x)
  z_0 = jnp.asarray(z_0, jnp.float32)
  process.check_same_shape("x", x, "z_0", z_0)
  gamma_0 = jnp.asarray(gamma_0, jnp.float32)
  if gamma_0.ndim:
    process.check_per_example("gamma_0", gamma_0, z_0, f_name="z_0")
  gamma_0 = process.per_example(gamma_0, z_0.ndim)
  log_alpha_0, _ = process.log_alpha_sigma(gamma_0)
  u = z_0 * jnp.exp(-log_alpha_0)              # z_0 / alpha_0
  s = jnp.exp(-gamma_0)                        # [] or [B, 1, ...]
  log_p = decoder.log_prob(x.astype(jnp.int32), u, s, vocab_size)
  return -_sum_per_example(log_p)


def prior_loss(f: jax.typing.ArrayLike,
               gamma_1: jax.typing.ArrayLike) -> jax.Array:
  """KL(q(z_1 | x) || N(0, I)) per example; Kingma et al. 2021, prior term.

  `0.5 * sum(alpha_1^2 f^2 + sigma_1^2 - log sigma_1^2 - 1)`, computed as
  `0.5 * sum(alpha_1^2 (f^2 - 1) + softplus(-gamma_1))` (as sigma^2 - 1 =
  -alpha^2 and -log sigma^2 = softplus(-gamma)) to avoid cancellation.

  Args:
    f: [B, ...] data in (-1, 1), from `encode`.
    gamma_1: [] or [B] gamma at t = 1 (= -logsnr_1).
  Returns:
    [B] nats.

  Example:
    >>> from vdm import elbo
    >>> kl = elbo.prior_loss(jnp.zeros((1, 4)), 0.0)   # 2 (log 2 - 1/2)
    >>> round(float(kl[0]), 4)
    0.3863
  """
  f = jnp.asarray(f, jnp.float32)
  gamma_1 = jnp.asarray(gamma_1, jnp.float32)
  process.check_per_example("gamma_1", gamma_1, f)
  gamma_1 = process.per_example(gamma_1, f.ndim)
  var_alpha = jax.nn.sigmoid(-gamma_1)                      # alpha_1^2
  kl = 0.5 * (var_alpha * (jnp.square(f) - 1.0) + jax.nn.softplus(-gamma_1))
  return _sum_per_example(jnp.broadcast_to(kl, f.shape))


def nats_to_bpd(nats: jax.typing.ArrayLike, num_dims: int) -> jax.Array:
  """Nats per example -> bits per dimension: `nats / (num_dims * ln 2)`.

  Args:
    nats: [...] losses in nats per example.
    num_dims: D, the number of elements of one example (e.g. 32*32*3).
  Returns:
    [...] bits per dimension.

  Example:
    >>> from vdm import elbo
    >>> round(float(elbo.nats_to_bpd(math.log(2.0) * 6, 3)), 6)
    2.0
  """
  checks.check_int("num_dims", num_dims, minimum=1,
                   hint="Pass the number of elements of one example.")
  return jnp.asarray(nats, jnp.float32) / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------
# Time sampling and the forward process.


def sample_times(key: jax.Array, batch_size: int, *,
                 antithetic: bool = True) -> jax.Array:
  """Diffusion times t in [0, 1), one per example.

  Antithetic (low-discrepancy) times `t_i = mod(u + i / B, 1)` with a single
  `u ~ U(0, 1)` cover [0, 1) evenly and lower the variance of the diffusion
  loss estimate; Kingma et al. 2021, section on variance minimisation
  ("low-discrepancy sampler"). Each t_i is marginally U(0, 1).

  Args:
    key: a `jax.random.key`.
    batch_size: B, a Python int >= 1.
    antithetic: if False, B independent uniforms.
  Returns:
    [B] float32 t in [0, 1).
  """
  batch_size = checks.check_int("batch_size", batch_size, minimum=1)
  if not antithetic:
    return jax.random.uniform(key, (batch_size,))
  u = jax.random.uniform(key, ())
  offsets = jnp.arange(batch_size, dtype=jnp.float32) / batch_size
  return jnp.mod(u + offsets, 1.0)


def _eps_sq_error(eps_fn: process.EpsFn, f, gamma_t, eps) -> jax.Array:
  """||eps - eps_fn(z_t, gamma_t)||^2 per example, [B]."""
  z_t = process.diffuse(f, gamma_t, eps)
  gamma_b = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (f.shape[0],))
  eps_hat = eps_fn(z_t, gamma_b)
  if not hasattr(eps_hat, "shape") or eps_hat.shape != z_t.shape:
    raise ValueError(
        f"eps_fn(z_t, gamma_t) must return eps_hat with the shape of z_t "
        f"{z_t.shape}; got {getattr(eps_hat, 'shape', type(eps_hat))}. "
        "Return one prediction per element of z_t (reshape the output).")
  err = eps - eps_hat.astype(jnp.float32)
  return _sum_per_example(jnp.square(err))


# ----------------------------------------------------------------------------
# The diffusion loss.


def continuous_diffusion_loss(eps_fn: process.EpsFn, f: jax.typing.ArrayLike,
                              gamma_t: jax.typing.ArrayLike,
                              dgamma_dt: jax.typing.ArrayLike,
                              eps: jax.typing.ArrayLike, *,
                              weighting: WeightingArg = None) -> jax.Array:
  """Continuous-time (T = infinity) diffusion loss at given noise levels.

  ELBO (`weighting=None`): `0.5 * gamma'(t) * ||eps - eps_hat||^2`; Kingma et
  al. 2021, section "Continuous-time model: T -> infinity". Weighted:
  `0.5 * w(logsnr_t) * gamma'(t) * ||eps - eps_hat||^2`, `logsnr = -gamma`;
  Kingma & Gao 2023, weighted loss. With t ~ U(0, 1) this is the
  importance-sampled estimate `0.5 * w(lam) / p(lam) * ||eps - eps_hat||^2`
  for the noise-level density `p(lam) = 1 / |dlam/dt|` of the schedule.

  Args:
    eps_fn: eps_fn(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
    f: [B, ...] data in (-1, 1).
    gamma_t: [B] gamma at t.
    dgamma_dt: [B] gamma'(t) (positive for an increasing schedule).
    eps: [B, ...] standard normal noise used to draw z_t.
    weighting: None (the ELBO), a name for `vdm.weighting.get`, or w(logsnr).
  Returns:
    [B] nats (for `weighting=None`; a weighted loss is not a likelihood).
  """
  f = jnp.asarray(f, jnp.float32)
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  dgamma_dt = jnp.asarray(dgamma_dt, jnp.float32)
  process.check_per_example("dgamma_dt", dgamma_dt, f)
  w = _resolve_weighting(weighting)
  sq_err = _eps_sq_error(eps_fn, f, gamma_t, eps)           # [B]
  scale = dgamma_dt
  if w is not None:
    scale = scale * jnp.asarray(w(-gamma_t), jnp.float32)
  return 0.5 * scale * sq_err


def discrete_diffusion_loss(eps_fn: process.EpsFn, f: jax.typing.ArrayLike,
                            gamma_t: jax.typing.ArrayLike,
                            gamma_s: jax.typing.ArrayLike,
                            eps: jax.typing.ArrayLike, *,
                            num_steps: int) -> jax.Array:
  """Discrete-time T-step diffusion loss at given grid points s < t.

  `0.5 * T * expm1(gamma_t - gamma_s) * ||eps - eps_hat(z_t)||^2`, i.e.
  `0.5 * T * (SNR(s) / SNR(t) - 1) * ||eps - eps_hat||^2`, for t uniform on
  {1/T, ..., 1} and s = t - 1/T; Kingma et al. 2021, section "Discrete-time
  model".

  Args:
    eps_fn: eps_fn(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
    f: [B, ...] data in (-1, 1).
    gamma_t: [B] gamma at t.
    gamma_s: [B] gamma at s = t - 1/T.
    eps: [B, ...] standard normal noise used to draw z_t.
    num_steps: T, a Python int >= 1.
  Returns:
    [B] nats.
  """
  _check_num_steps(num_steps)
  if num_steps == 0:
    raise ValueError("discrete_diffusion_loss needs num_steps >= 1; got 0. "
                     "Use continuous_diffusion_loss for continuous time.")
  f = jnp.asarray(f, jnp.float32)
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  gamma_s = jnp.asarray(gamma_s, jnp.float32)
  process.check_per_example("gamma_s", gamma_s, f)
  sq_err = _eps_sq_error(eps_fn, f, gamma_t, eps)           # [B]
  return 0.5 * num_steps * jnp.expm1(gamma_t - gamma_s) * sq_err


def diffusion_loss(eps_fn: process.EpsFn, gamma_fn: process.GammaFn,
                   f: jax.typing.ArrayLike,
                   t: jax.typing.ArrayLike, eps: jax.typing.ArrayLike, *,
                   num_steps: int = 0,
                   weighting: WeightingArg = None) -> jax.Array:
  """Diffusion loss per example, continuous or discrete time.

  `num_steps=0`: `continuous_diffusion_loss` with `gamma'(t)` from `jax.jvp`
  of `gamma_fn` at t (tangent ones; exact, so gamma_fn must act elementwise).
  `num_steps=T > 0`: t in [0, 1) is mapped to the grid point
  `(floor(t T) + 1) / T` (so t ~ U(0, 1) gives t uniform on {1/T, ..., 1}),
  `s = t - 1/T`, then `discrete_diffusion_loss`.

  A `weighting` w(logsnr) gives Kingma & Gao's (2023) weighted loss; since the
  noise levels come from `gamma_fn`, this one code path is the
  importance-sampled estimator `0.5 * w(lam) / p(lam) * ||eps - eps_hat||^2`
  for whatever density `p(lam) = 1 / |dlam/dt|` gamma_fn induces.

  Args:
    eps_fn: eps_fn(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
    gamma_fn: gamma_fn(t [B]) -> gamma_t [B], elementwise, increasing.
    f: [B, ...] data in (-1, 1).
    t: [B] times in [0, 1), e.g. from `sample_times`.
    eps: [B, ...] standard normal noise, the shape of f.
    num_steps: 0 for continuous time, T > 0 for the T-step loss.
    weighting: None (the ELBO), a registered name, or a callable w(logsnr);
      continuous time only.
  Returns:
    [B] nats (a weighted loss is in nats-like units, not a likelihood).

  Example:
    >>> from vdm import elbo
    >>> gamma_fn = lambda t: -10.0 + 20.0 * t       # gamma'(t) = 20
    >>> eps_fn = lambda z_t, gamma_t: jnp.zeros_like(z_t)
    >>> f, eps = jnp.zeros((1, 2)), jnp.ones((1, 2))
    >>> elbo.diffusion_loss(eps_fn, gamma_fn, f, jnp.array([0.3]), eps)
    Array([20.], dtype=float32)
  """
  _check_num_steps(num_steps)
  f = jnp.asarray(f, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  process.check_same_shape("eps", eps, "f", f)
  if f.ndim < 1 or t.shape != (f.shape[0],):
    raise ValueError(
        f"t must have shape [B] = ({f.shape[0] if f.ndim else '?'},) to match "
        f"f of shape {f.shape}; got shape {t.shape}. Draw it with "
        "sample_times(key, f.shape[0]).")
  if num_steps > 0:
    if weighting is not None and _resolve_weighting(weighting) is not None:
      raise ValueError(
          f"weighting={weighting!r} cannot be combined with num_steps="
          f"{num_steps}: a weighting applies to the continuous-time loss "
          "only, the T-step loss is the discrete ELBO. Set num_steps=0 or "
          "weighting=None.")
    step = jnp.floor(t * num_steps)
    step = jnp.clip(step, 0, num_steps - 1)     # guards t rounding up to 1
    t_grid = (step + 1.0) / num_steps
    s_grid = step / num_steps
    gamma_t = gamma_fn(t_grid)
    gamma_s = gamma_fn(s_grid)
    _check_gamma_shape(gamma_t, t)
    return discrete_diffusion_loss(eps_fn, f, gamma_t, gamma_s, eps,
                                   num_steps=num_steps)
  w = _resolve_weighting(weighting)
  gamma_t, dgamma_dt = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
  _check_gamma_shape(gamma_t, t)
  return continuous_diffusion_loss(eps_fn, f, gamma_t, dgamma_dt, eps,
                                   weighting=w)

