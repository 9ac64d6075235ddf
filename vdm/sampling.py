"""Samplers for a trained VDM: ancestral, DDIM, guidance, decoding, x_hat grids.

Every sampler walks `t` from 1 to 0 on the uniform grid `t_i = i / num_steps`,
starting from `z_1 ~ N(0, I)` drawn from `key`, and returns `z_0`; `decode`
turns `z_0` into integers through the discrete decoder `elbo.decode_logits`.
The network enters only as `eps_fn(z_t, gamma_t) -> eps_hat` (with `gamma_t`
of shape `[B]`) and the schedule as `gamma_fn(t) -> gamma_t`, so the samplers
are pure functions, traceable under `jax.jit` with `shape`, `num_steps` and the
other options static.

Notation (DESIGN.md): `sigma_t^2 = sigmoid(gamma_t)`, `alpha_t^2 =
sigmoid(-gamma_t)`, `x_hat = (z_t - sigma_t eps_hat) / alpha_t` (model space,
about (-1, 1)).

Randomness: example `b` of a batch uses only `fold_in(key, b)`, so a sample
does not depend on its batch-mates or on the batch size.

References:
  Kingma, Salimans, Poole, Ho. Variational Diffusion Models. 2021.
    arXiv:2107.00630 (VDM).
  Song, Meng, Ermon. Denoising Diffusion Implicit Models. 2020.
    arXiv:2010.02502 (DDIM).
  Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. arXiv:2207.12598.
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. 2020.
    arXiv:2006.11239 (DDPM).
"""
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm import checks
from vdm import elbo
from vdm import process

SAMPLERS = ("ancestral", "ddim")
DECODE_MODES = ("argmax", "sample")


# --------------------------------------------------------------------------
# Argument checks (plain Python, run at trace time).


def _check_num_steps(num_steps) -> None:
  checks.check_int(
      "num_steps", num_steps, minimum=1,
      hint="Pass it as a static argument under jax.jit, e.g. num_steps=1000 "
      "for ancestral sampling.")


def _check_shape(shape) -> tuple:
  shape = tuple(int(d) for d in shape)
  if len(shape) < 1 or min(shape) < 1:
    raise ValueError(f"shape must be [B, ...] with positive sizes; got "
                     f"{shape}.")
  return shape


def _check_eta(eta) -> float:
  eta = float(eta)
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: "
                     f"ancestral-like); got {eta}.")
  return eta


def _check_times(t_start, t_end) -> None:
  for name, t in (("t_start", t_start), ("t_end", t_end)):
    if not 0.0 <= float(t) <= 1.0:
      raise ValueError(f"{name} must be in [0, 1]; got {t}.")


# --------------------------------------------------------------------------
# Building blocks.


def _gamma_at(gamma_fn: process.GammaFn, t: jax.Array,
              batch_size: int) -> jax.Array:
  """gamma(t) for a scalar t, as [B] (what eps_fn expects)."""
  t_b = jnp.full((batch_size,), t, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(gamma_fn(t_b), jnp.float32),
                          (batch_size,))


def _predict(eps_fn: process.EpsFn, z_t: jax.Array, gamma_t: jax.Array,
             clip_x: bool):
  """eps_hat and x_hat at (z_t, gamma_t); with clip_x, x_hat in [-1, 1].

  Args:
    eps_fn: the noise prediction model.
    z_t: [B, ...] latent.
    gamma_t: [B] gamma at t.
    clip_x: clip x_hat to [-1, 1] and recompute eps_hat from it, so that the
      step below uses the clipped prediction (VDM, section "Noise prediction
      model and Fourier features": x_hat = (z_t - sigma_t eps_hat) / alpha_t).
  Returns:
    (eps_hat, x_hat), each [B, ...] float32.
  """
  eps_hat = jnp.asarray(eps_fn(z_t, gamma_t), jnp.float32)
  if eps_hat.shape != z_t.shape:
    raise ValueError(f"eps_fn returned shape {eps_hat.shape}; expected "
                     f"{z_t.shape} (the shape of z_t). eps_fn(z_t, gamma_t) "
                     "must predict one eps per element of z_t.")
  x_hat = process.eps_to_x(eps_hat, z_t, gamma_t)
  if clip_x:
    x_hat = jnp.clip(x_hat, -1.0, 1.0)
    eps_hat = process.x_to_eps(x_hat, z_t, gamma_t)
  return eps_hat, x_hat


def _ancestral_update(z_t, eps_hat, x_hat, gamma_t, gamma_s, noise, eta):
  """One draw z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat), s < t.

  VDM, section "Reverse time generative model" and appendix "Distribution
  details" give q(z_s | z_t, x) = N(mu_Q, var_Q) with alpha_{t|s} = alpha_t /
  alpha_s, var_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 and
    mu_Q  = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t
            + alpha_s var_{t|s} / sigma_t^2 x,
    var_Q = var_{t|s} sigma_s^2 / sigma_t^2.
  With SNR = exp(-gamma): alpha_{t|s}^2 sigma_s^2 / sigma_t^2 = SNR_t / SNR_s
  = exp(gamma_s - gamma_t), so var_{t|s} / sigma_t^2 = c with
    c = 1 - exp(gamma_s - gamma_t) = -expm1(gamma_s - gamma_t)  in (0, 1],
  and alpha_{t|s} sigma_s^2 / sigma_t^2 = (1 - c) alpha_s / alpha_t. Hence
    mu_Q  = alpha_s / alpha_t [(1 - c) z_t + c alpha_t x],
    var_Q = c sigma_s^2.
  Putting x = x_hat = (z_t - sigma_t eps_hat) / alpha_t gives the form used
  here (the appendix's "further simplification of p(z_s | z_t)"):
    z_s = alpha_s / alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise.
  `expm1` keeps c accurate when gamma_s ~ gamma_t (many steps), where
  1 - exp(.) cancels; alpha_s / alpha_t is a ratio of sigmoids in log space.
  """
  del x_hat, eta  # the eps form above needs neither
  ndim = z_t.ndim
  gamma_t = process.per_example(gamma_t, ndim)
  gamma_s = process.per_example(gamma_s, ndim)
  c = -jnp.expm1(gamma_s - gamma_t)
  log_alpha_t, log_sigma_t = process.log_alpha_sigma(gamma_t)
  log_alpha_s, log_sigma_s = process.log_alpha_sigma(gamma_s)
  ratio = jnp.exp(log_alpha_s - log_alpha_t)                # alpha_s / alpha_t
  sigma_t, sigma_s = jnp.exp(log_sigma_t), jnp.exp(log_sigma_s)
  mean = ratio * (z_t - sigma_t * c * eps_hat)
  return mean + sigma_s * jnp.sqrt(c) * noise


def _ddim_update(z_t, eps_hat, x_hat, gamma_t, gamma_s, noise, eta):
  """One DDIM step t -> s; DDIM, section "Sampling from generalized
  generative processes":
    z_s = alpha_s x_hat + sqrt(sigma_s^2 - var_eta) eps_hat + sqrt(var_eta) n,
    var_eta = eta^2 var_Q = eta^2 c sigma_s^2   (c as in `_ancestral_update`),
  i.e. the paper's sigma_t(eta) in VDM notation. eta = 0 is the deterministic
  sampler (z_s = alpha_s x_hat + sigma_s eps_hat, the first-order solution of
  the probability-flow ODE); eta = 1 has the ancestral sampler's mean and
  variance (the DDPM posterior), so it matches `ancestral` given the same
  noise (tested).
  """
  ndim = z_t.ndim
  gamma_t = process.per_example(gamma_t, ndim)
  gamma_s = process.per_example(gamma_s, ndim)
  alpha_s, sigma_s = process.alpha_sigma(gamma_s)
  if eta == 0.0:
    return alpha_s * x_hat + sigma_s * eps_hat
  c = -jnp.expm1(gamma_s - gamma_t)
  var_eta_frac = eta**2 * c  # var_eta / sigma_s^2, in [0, 1]
  return (alpha_s * x_hat + sigma_s * jnp.sqrt(1.0 - var_eta_frac) * eps_hat
          + sigma_s * jnp.sqrt(var_eta_frac) * noise)


def _example_keys(key: jax.Array, batch_size: int, first_index=0):
  """Per-example (key_init, key_noise), each a [B] key array.

  Example b uses fold_in(key, first_index + b) only, so it does not depend
  on the batch (nor on how a large sample is cut into chunks).
  """
  def one(b):
    key_b = jax.random.fold_in(key, b)
    key_init, key_noise = jax.random.split(key_b)
    return key_init, key_noise

  return jax.vmap(one)(jnp.arange(batch_size) + first_index)


def _normal(keys: jax.Array, shape: tuple) -> jax.Array:
  """[B] keys -> [B, *shape[1:]] standard normals, one key per example."""
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def _time(i, num_steps: int, t_lo: float, t_hi: float) -> jax.Array:
  """Grid point i in [0, num_steps]: t_lo + (t_hi - t_lo) i / num_steps.

  Shared by the samplers and `ddim_invert`, so both visit bit-identical
  times (and gammas). With t_lo = 0, t_hi = 1 this is t_i = i / num_steps.
  """
  frac = jnp.asarray(i, jnp.float32) / num_steps
  return t_lo + (t_hi - t_lo) * frac


def _frame_slots(num_steps: int, num_frames: int) -> np.ndarray:
  """[num_steps + 1] int32: frame index taken after j steps, or -1."""
  if num_frames == 1:
    steps = np.array([num_steps])
  else:
    k = np.arange(num_frames)
    half = (num_frames - 1) // 2
    steps = (k * num_steps + half) // (num_frames - 1)  # round(k N / (F-1))
  slots = np.full(num_steps + 1, -1, np.int32)
  slots[steps] = np.arange(len(steps), dtype=np.int32)
  return slots


def _chain(z_start, key_noise, eps_fn, gamma_fn, *, num_steps, update, eta,
           clip_x, t_start, t_end, num_frames=0):
  """Runs `num_steps` updates from t_start down to t_end under lax.scan.

  Args:
    z_start: [B, ...] latent at t_start.
    key_noise: [B] keys for the per-step noise, or None (deterministic).
    update: `_ancestral_update` or `_ddim_update`.
    num_frames: 0 for none, else also returns x_hat after the steps chosen
      by `_frame_slots` ([num_frames, B, ...]).
  Returns:
    z at t_end, and the frames (or None).
  """
  batch_size = z_start.shape[0]
  if num_frames:
    slots = jnp.asarray(_frame_slots(num_steps, num_frames))

  def step(carry, i):
    z_t, frames = carry
    gamma_t = _gamma_at(gamma_fn, _time(i, num_steps, t_end, t_start),
                        batch_size)
    gamma_s = _gamma_at(gamma_fn, _time(i - 1, num_steps, t_end, t_start),
                        batch_size)
    eps_hat, x_hat = _predict(eps_fn, z_t, gamma_t, clip_x)
    if key_noise is None:
      noise = None
    else:
      noise = _normal(jax.vmap(lambda k: jax.random.fold_in(k, i))(key_noise),
                      z_t.shape)
    z_s = update(z_t, eps_hat, x_hat, gamma_t, gamma_s, noise, eta)
    if frames is not None:
      slot = slots[num_steps - i]  # x_hat after (num_steps - i) steps
      idx = jnp.maximum(slot, 0)
      frames = frames.at[idx].set(jnp.where(slot >= 0, x_hat, frames[idx]))
    return (z_s, frames), None

  frames = (jnp.zeros((num_frames,) + z_start.shape, jnp.float32)
            if num_frames else None)
  z_start = jnp.asarray(z_start, jnp.float32)
  (z_end, frames), _ = jax.lax.scan(step, (z_start, frames),
                                    jnp.arange(num_steps, 0, -1))
  if num_frames:  # the last frame always is x_hat(z_end) at t_end
    gamma_end = _gamma_at(gamma_fn, _time(0, num_steps, t_end, t_start),
                          batch_size)
    _, x_hat_end = _predict(eps_fn, z_end, gamma_end, clip_x)
    frames = frames.at[num_frames - 1].set(x_hat_end)
  return z_end, frames


def draw_z_1(key: jax.Array, shape) -> jax.Array:
  """The z_1 ~ N(0, I) that the samplers start from for this key.

  Example b is drawn from `fold_in(key, b)` alone, so `draw_z_1(key, (n,
  ...))[:k]` equals `draw_z_1(key, (k, ...))`; `ddim(key, ...)` equals
  `ddim_from(draw_z_1(key, shape), ...)`.

  Args:
    key: a `jax.random.key`.
    shape: static (B, ...).
  Returns:
    [B, ...] float32.
  """
  shape = _check_shape(shape)
  key_init, _ = _example_keys(key, shape[0])
  return _normal(key_init, shape)


def _sample(key, eps_fn, gamma_fn, shape, *, num_steps, sampler, eta, clip_x,
            num_frames, first_index=0):
  """z_1 ~ N(0, I) per example from `key`, then the chain to t = 0."""
  shape = _check_shape(shape)
  key_init, key_noise = _example_keys(key, shape[0], first_index)
  z_1 = _normal(key_init, shape)  # [B, ...], as draw_z_1
  update = _ancestral_update if sampler == "ancestral" else _ddim_update
  if sampler == "ddim" and eta == 0.0:
    key_noise = None  # deterministic: no noise drawn
  return _chain(z_1, key_noise, eps_fn, gamma_fn, num_steps=num_steps,
                update=update, eta=eta, clip_x=bool(clip_x), t_start=1.0,
                t_end=0.0, num_frames=num_frames)


# --------------------------------------------------------------------------
# Public samplers.


def ancestral(key: jax.Array, eps_fn: process.EpsFn,
              gamma_fn: process.GammaFn, shape, *, num_steps: int,
              clip_x: bool = False,
              first_index: jax.typing.ArrayLike = 0) -> jax.Array:
  """Ancestral sampling of the T-step VDM, T = num_steps.

  z_1 ~ N(0, I); then for i = T, ..., 1 with t = i / T, s = (i - 1) / T:
  z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t; t)) (VDM, section "Reverse
  time generative model"), computed as
    c   = -expm1(gamma_s - gamma_t),
    z_s = alpha_s / alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) noise
  (derivation in `_ancestral_update`; VDM appendix "Distribution details").
  The last step draws z_0 itself; the decoder p(x | z_0) (`decode`) does the
  rest. With the Bayes-optimal eps_hat, too few steps shrink the variance of
  z_0 (each step drops Var[x | z_t]); tests measure it.

  Args:
    key: a `jax.random.key`; example b uses only `fold_in(key, b)`.
    eps_fn: `eps_fn(z_t, gamma_t) -> eps_hat`, z_t [B, ...], gamma_t [B].
    gamma_fn: `gamma_fn(t) -> gamma_t`, t [B] in [0, 1].
    shape: static (B, ...) of the samples.
    num_steps: static T >= 1, the number of network evaluations.
    clip_x: clip x_hat to [-1, 1] each step (image data in [-1, 1]).
    first_index: [] int, the index of the first example (may be traced):
      example b uses fold_in(key, first_index + b), so chunks of a large
      sample (`generation.sample_to_dir`) equal one call over all of it.
  Returns:
    [B, ...] z_0, float32.
  """
  _check_num_steps(num_steps)
  z_0, _ = _sample(key, eps_fn, gamma_fn, shape, num_steps=num_steps,
                   sampler="ancestral", eta=1.0, clip_x=clip_x, num_frames=0,
                   first_index=first_index)
  return z_0


def ddim(key: jax.Array, eps_fn: process.EpsFn, gamma_fn: process.GammaFn,
         shape, *, num_steps: int, eta: float = 0.0,
         clip_x: bool = False,
         first_index: jax.typing.ArrayLike = 0) -> jax.Array:
  """DDIM sampling (DDIM, section "Sampling from generalized generative
  processes") on the grid t_i = i / num_steps, from z_1 ~ N(0, I).

  Each step is z_s = alpha_s x_hat + sqrt(sigma_s^2 - var_eta) eps_hat +
  sqrt(var_eta) noise with var_eta = eta^2 sigma_s^2 (-expm1(gamma_s -
  gamma_t)), the ancestral posterior variance scaled by eta^2. eta = 0: z_0 is
  a deterministic function of z_1 (`ddim_from`); eta = 1: the ancestral
  sampler (same key, same samples up to float rounding).

  Args:
    key: a `jax.random.key`; draws z_1 exactly as `ancestral` does.
    eps_fn, gamma_fn, shape, num_steps, clip_x, first_index: as in
      `ancestral`.
    eta: static, in [0, 1].
  Returns:
    [B, ...] z_0, float32.
  """
  _check_num_steps(num_steps)
  eta = _check_eta(eta)
  z_0, _ = _sample(key, eps_fn, gamma_fn, shape, num_steps=num_steps,
                   sampler="ddim", eta=eta, clip_x=clip_x, num_frames=0,
                   first_index=first_index)
  return z_0


def ddim_from(z_1: jax.typing.ArrayLike, eps_fn: process.EpsFn,
              gamma_fn: process.GammaFn, *, num_steps: int,
              t_start: float = 1.0, t_end: float = 0.0,
              clip_x: bool = False) -> jax.Array:
  """Deterministic DDIM (eta = 0) from a given latent at t_start to t_end.

  Steps on the grid t_end + (t_start - t_end) i / num_steps, i = num_steps,
  ..., 0; with the defaults this is `ddim(..., eta=0)` started at z_1.

  Args:
    z_1: [B, ...] latent at t_start (z_1 for t_start = 1).
    eps_fn, gamma_fn, num_steps, clip_x: as in `ancestral`.
    t_start: static time of z_1; t_end: static time reached, t_end < t_start.
  Returns:
    [B, ...] z at t_end, float32.
  """
  _check_num_steps(num_steps)
  _check_times(t_start, t_end)
  if not t_start > t_end:
    raise ValueError(f"ddim_from runs t downwards: need t_start > t_end; got "
                     f"t_start={t_start}, t_end={t_end}. Use ddim_invert to "
                     "go from data to noise.")
  z_1 = jnp.asarray(z_1, jnp.float32)
  _check_shape(z_1.shape)
  z_end, _ = _chain(z_1, None, eps_fn, gamma_fn, num_steps=num_steps,
                    update=_ddim_update, eta=0.0, clip_x=bool(clip_x),
                    t_start=float(t_start), t_end=float(t_end))
  return z_end


def ddim_invert(z_0: jax.typing.ArrayLike, eps_fn: process.EpsFn,
                gamma_fn: process.GammaFn, *, num_steps: int,
                t_start: float = 0.0, t_end: float = 1.0,
                num_fixed_point_iters: int = 0) -> jax.Array:
  """Deterministic encoding: the DDIM ODE run forward, from t_start up to t_end.

  The DDIM step t -> s, z_s = alpha_s x_hat + sigma_s eps_hat with x_hat =
  (z_t - sigma_t eps_hat) / alpha_t, solves for z_t given eps_hat as
    z_t = alpha_t (z_s - sigma_s eps_hat) / alpha_s + sigma_t eps_hat.
  DDIM (sections "Relevance to neural ODEs" and "Reconstruction from latent
  space") evaluates eps_hat at the known end, eps_hat(z_s, gamma_s): one
  network call per step, and a round trip `ddim_from(ddim_invert(z))` that
  is exact only as num_steps grows (first order). With
  num_fixed_point_iters = k > 0 each step then iterates
  eps_hat <- eps_hat(z_t, gamma_t) and the formula above k times, converging
  to the exact inverse of the `ddim_from` step (when num_steps is large
  enough for the iteration to contract), so the round trip holds to float
  tolerance at k + 1 network calls per step. Uses the same time grid as
  `ddim_from` with t_start and t_end swapped; clipping is not inverted.

  Args:
    z_0: [B, ...] latent at t_start (z_0 for t_start = 0).
    eps_fn, gamma_fn, num_steps: as in `ancestral`.
    t_start: static start time; t_end: static end time, t_end > t_start.
    num_fixed_point_iters: static k >= 0 (0: the DDIM paper's encoder).
  Returns:
    [B, ...] z at t_end (z_1 for t_end = 1), float32.
  """
  _check_num_steps(num_steps)
  _check_times(t_start, t_end)
  if not t_end > t_start:
    raise ValueError(f"ddim_invert runs t upwards: need t_end > t_start; got "
                     f"t_start={t_start}, t_end={t_end}. Use ddim_from to go "
                     "from noise to data.")
  checks.check_int("num_fixed_point_iters", num_fixed_point_iters,
                   minimum=0, hint="Use 0 for the DDIM paper's encoder.")
  z_0 = jnp.asarray(z_0, jnp.float32)
  batch_size, ndim = _check_shape(z_0.shape)[0], z_0.ndim
  t_lo, t_hi = float(t_start), float(t_end)

  def step(z_s, i):
    gamma_s = _gamma_at(gamma_fn, _time(i, num_steps, t_lo, t_hi), batch_size)
    gamma_t = _gamma_at(gamma_fn, _time(i + 1, num_steps, t_lo, t_hi),
                        batch_size)
    alpha_s, sigma_s = process.alpha_sigma(process.per_example(gamma_s, ndim))
    alpha_t, sigma_t = process.alpha_sigma(process.per_example(gamma_t, ndim))

    def up(eps_hat):  # z_t whose DDIM step with this eps_hat lands on z_s
      return alpha_t * ((z_s - sigma_s * eps_hat) / alpha_s) + sigma_t * eps_hat

    z_t = up(_predict(eps_fn, z_s, gamma_s, False)[0])  # the Euler step
    if num_fixed_point_iters:  # a loop, not unrolled: one traced network
      z_t = jax.lax.fori_loop(
          0, num_fixed_point_iters,
          lambda _, z: up(_predict(eps_fn, z, gamma_t, False)[0]), z_t)
    return z_t, None

  z_end, _ = jax.lax.scan(step, z_0, jnp.arange(num_steps))
  return z_end


def guided(eps_cond: process.EpsFn, eps_uncond: process.EpsFn,
           scale: jax.typing.ArrayLike) -> process.EpsFn:
  """Classifier-free guidance: (1 + scale) eps_cond - scale eps_uncond.

  Ho & Salimans 2022, section "Classifier-free guidance". Computed as
  eps_cond + scale (eps_cond - eps_uncond), equal in exact arithmetic and
  exact in float where it matters: when eps_cond and eps_uncond return the
  same values the result is eps_cond to the bit, for any scale (the naive
  form can be off by an ulp). A Python scale of 0 returns eps_cond itself:
  the conditional model, with no unconditional evaluation.

  Args:
    eps_cond: `eps_fn` with the conditioning (labels) closed over.
    eps_uncond: `eps_fn` with the null conditioning.
    scale: [] guidance weight w (0: conditional; the paper's w).
  Returns:
    `eps_fn(z_t, gamma_t) -> eps_hat` for any sampler here.
  """
  for name, fn in (("eps_cond", eps_cond), ("eps_uncond", eps_uncond)):
    if not callable(fn):
      raise TypeError(f"{name} must be a function eps_fn(z_t, gamma_t); got "
                      f"{fn!r}.")

  if isinstance(scale, numbers.Real) and scale == 0:
    return eps_cond  # the conditional model, without the second network call

  def eps_fn(z_t, gamma_t):
    eps_c = eps_cond(z_t, gamma_t)
    return eps_c + scale * (eps_c - eps_uncond(z_t, gamma_t))

  return eps_fn


def decode(key: Optional[jax.Array], z_0: jax.typing.ArrayLike,
           gamma_0: jax.typing.ArrayLike, vocab_size: int, *,
           mode: str = "argmax",
           first_index: jax.typing.ArrayLike = 0) -> jax.Array:
  """Integers x from z_0 through the discrete decoder p(x | z_0).

  The decoder is `elbo.decode_logits` (VDM, section "Reverse time generative
  model": a factorised p(x_i | z_0,i) proportional to q(z_0,i | x_i)).

  Args:
    key: a `jax.random.key` for mode 'sample' (example b uses
      `fold_in(key, b)`); ignored (may be None) for 'argmax'.
    z_0: [B, ...] latent at t = 0.
    gamma_0: gamma at t = 0 ([] or as `elbo.decode_logits` accepts).
    vocab_size: number of integer values (256 for uint8 images).
    mode: 'argmax' (the most likely value) or 'sample' (a draw).
    first_index: example b uses fold_in(key, first_index + b) (as the
      samplers).
  Returns:
    [B, ...] int32 in [0, vocab_size).
  """
  if mode not in DECODE_MODES:
    raise ValueError(f"unknown decode mode {mode!r}; known: "
                     f"{', '.join(DECODE_MODES)}.")
  z_0 = jnp.asarray(z_0, jnp.float32)
  logits = elbo.decode_logits(z_0, gamma_0, vocab_size)  # [B, ..., V]
  if mode == "argmax":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("decode(mode='sample') needs a key; got None. Pass "
                     "jax.random.key(seed), or use mode='argmax'.")
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(
      jnp.arange(z_0.shape[0]) + first_index)
  draw = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))
  return draw(keys, logits).astype(jnp.int32)


def progressive(key: jax.Array, eps_fn: process.EpsFn,
                gamma_fn: process.GammaFn, shape, *, num_steps: int,
                num_frames: int, sampler: str = "ancestral",
                eta: float = 0.0, clip_x: bool = False):
  """Samples z_0 and the x_hat predictions along the chain (DDPM, section
  "Progressive coding": progressive generation).

  Runs the same chain as `ancestral` (or `ddim` with `eta`) for the same key,
  so z_0 is bit-identical to theirs, and records x_hat(z_t; t) after j_k =
  round(k num_steps / (num_frames - 1)) steps, k = 0, ..., num_frames - 1:
  frame 0 is x_hat at t = 1 (from z_1), the last is x_hat(z_0; 0), one extra
  network call. num_frames = 1 keeps only the last.

  Args:
    key, eps_fn, gamma_fn, shape, num_steps, clip_x: as in `ancestral`.
    num_frames: static, in [1, num_steps + 1].
    sampler: 'ancestral' or 'ddim'.
    eta: static DDIM eta in [0, 1]; used only by sampler 'ddim'.
  Returns:
    (z_0 [B, ...], x_hat frames [num_frames, B, ...]), float32; frames are in
    model space (about (-1, 1); clipped to [-1, 1] with clip_x).
  """
  _check_num_steps(num_steps)
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; known: "
                     f"{', '.join(SAMPLERS)}.")
  eta = _check_eta(eta)
  num_frames = checks.check_int(
      "num_frames", num_frames, minimum=1, maximum=num_steps + 1,
      hint="Frames are taken between steps: at most num_steps + 1.")
  if sampler == "ancestral":
    eta = 1.0
  return _sample(key, eps_fn, gamma_fn, shape, num_steps=num_steps,
                 sampler=sampler, eta=eta, clip_x=clip_x,
                 num_frames=num_frames)
