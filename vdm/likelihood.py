"""Log densities by the probability-flow ODE, and image bits/dim from them.

The VP process (alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t))
has the deterministic probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through SDEs", section 4.3)

  dz/dt = -0.5 gamma'(t) (sigma_t^2 z - sigma_t eps_hat(z, gamma_t)),

whose marginals are those of the diffusion. Along a solution,
d log p_t(z_t) / dt = -div(drift), so the density of z at t0 is

  log p_t0(z) = log N(z_t1; 0, I) + int_t0^t1 div(drift)(z_t, t) dt.

`ode_log_density` integrates z and that integral together with an adaptive
Runge-Kutta solver of diffrax, on the device, for the whole batch at once.
The solver integrates in t by default: on the Gaussian test case it needs
fewer evaluations than in gamma (the log-SNR up to sign), 105 vs 117 with a
linear schedule and 57 vs 135 with the cosine one, whose gamma spends most
of its range where the marginals barely move (docs/likelihood.md).

The error norm: the answer is the integral, one number per example next to
z's D coordinates. scipy's solver (score_sde's) takes one RMS over the whole
state, where the integral weighs 1/(D+1): on an image model its error then
runs free and the figure comes out low (MNIST-size model, 20 images against
a solve at 1e-6: -0.139 bits/dim at rtol 1e-4, rms 0.19 per image). The
default 'separate' holds z's RMS and the integral's error each below the
tolerance (docs/likelihood.md, "Solver error").

Image bits/dim (`dequantized_log_likelihood`): a discrete image x has
P(x) = the model's probability mass of the bin of x. For any dequantising
q(z | x) supported inside the bin, log P(x) >= E_q[log p(z) - log q(z | x)],
and with K draws the importance-weighted bound log mean_k exp(log p(z_k) -
log q(z_k | x)) is tighter (Ho et al. 2019, Flow++, section 3.1). Two q:

* 'uniform': z = f + u, u ~ U(-1/V, 1/V)^D in the model's space f = 2 (x +
  0.5) / V - 1 (bins of width 2/V), evaluated at t0; log q = D log(V/2),
  i.e. the log-Jacobian D log(2/V) of [0, V) -> (-1, 1);
* 'truncated_normal': z = alpha_t0 f + sigma_t0 eps, eps ~ N(0, I)
  truncated to |eps| <= tau = alpha_t0 / (V sigma_t0), the diffusion's own
  noise at t0 kept inside the bin (Zheng et al. 2023, i-DODE, the
  training-free truncated-normal dequantisation).

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative
  Modeling through Stochastic Differential Equations. 2021,
  arXiv:2011.13456.
  Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. FFJORD. 2019,
  arXiv:1810.01367 (Hutchinson's trace estimator in a CNF).
  Zheng, Lu, Chen, Zhu. Improved Techniques for Maximum Likelihood
  Estimation for Diffusion ODEs. 2023, arXiv:2305.03935.
"""

from __future__ import annotations

import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

from vdm import checks
from vdm import process

DIVERGENCES = ("exact", "hutchinson")
TIME_VARIABLES = ("gamma", "t")
DEQUANTIZATIONS = ("uniform", "truncated_normal")
# Exact divergence costs D vector-Jacobian products per evaluation.
MAX_EXACT_DIMS = 4096
# Tsit5: 7 stages, first-same-as-last, so 6 new evaluations per step
# (accepted or rejected) after the one at the start; counted with a callback
# in tests/test_likelihood.py.
_EVALS_PER_STEP = 6


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of "
                     f"{', '.join(map(repr, choices))}.")


def _check_tolerance(name: str, value) -> None:
  if not (isinstance(value, (int, float)) and 0 < value < 1):
    raise ValueError(f"{name}={value!r}: pass a float in (0, 1), e.g. 1e-5.")


def _per_example_rms(leaf: jax.Array) -> jax.Array:
  leaf = jnp.reshape(leaf, (leaf.shape[0], -1))
  return jnp.sqrt(jnp.mean(jnp.square(leaf), axis=1))


def _joint_norm(tree) -> jax.Array:
  """'joint': max over examples of one RMS over each example's whole state,
  z's D coordinates and the log-density integral together (scipy's and so
  score_sde's norm, there over the whole batch). The integral then weighs
  1/(D+1) in the mean square."""
  z_err, logp_err = tree
  z_err = jnp.reshape(z_err, (z_err.shape[0], -1))
  sq_sum = jnp.sum(jnp.square(z_err), axis=1) + jnp.square(logp_err)
  return jnp.max(jnp.sqrt(sq_sum / (z_err.shape[1] + 1)))


def _separate_norm(tree) -> jax.Array:
  """'separate': z's RMS and the integral's error each meet the tolerance
  on their own, in every example (the max of the two, over examples)."""
  z_err, logp_err = tree
  return jnp.maximum(jnp.max(_per_example_rms(z_err)),
                     jnp.max(jnp.abs(logp_err)))


# The solver's error norm (`ode_log_density`'s error_norm). Both take the
# max over examples, so a batch's answer does not loosen as the batch grows
# (diffrax's default RMS over the whole state averages the examples).
_ERROR_NORMS = {"joint": _joint_norm, "separate": _separate_norm}
ERROR_NORMS = tuple(_ERROR_NORMS)


def _rademacher(key, shape) -> jax.Array:
  return jax.random.rademacher(key, shape, dtype=jnp.float32)


def ode_log_density(eps_fn: process.EpsFn, gamma_fn: process.GammaFn,
                    z: jax.typing.ArrayLike, *, t0: float = 0.0,
                    t1: float = 1.0, key: jax.Array | None = None,
                    divergence: str = "exact", num_probes: int = 1,
                    rtol: float = 1e-5, atol: float = 1e-5,
                    time_variable: str = "t", max_steps: int = 4096,
                    error_norm: str = "separate"
                    ) -> tuple[jax.Array, jax.Array]:
  """log p_t0(z) under the model, by the probability-flow ODE.

  Each right-hand-side evaluation is one forward pass of `eps_fn` and one
  vector-Jacobian product through it (`jax.vjp`): the drift and the
  divergence from the same linearisation. 'exact' takes the full Jacobian
  trace (D products, vmapped: small D and tests); 'hutchinson' estimates it
  by v^T J v with `num_probes` Rademacher probes v drawn once from `key` and
  held fixed over the solve (FFJORD), an unbiased estimate of log p.

  Args:
    eps_fn: eps_hat(z_t [B, ...], gamma_t [B]) -> [B, ...]; examples must
      not interact (no batch statistics).
    gamma_fn: gamma(t) [B] -> [B], increasing.
    z: [B, ...] points at time t0 (float32).
    t0, t1: the time of `z` and of the prior N(0, I), 0 <= t0 < t1 <= 1.
    key: a `jax.random.key` for the probes; required for 'hutchinson'.
    divergence: 'exact' or 'hutchinson'.
    num_probes: probes per example for 'hutchinson' (their mean is used).
    rtol, atol: the adaptive solver's tolerances (Tsit5, PID controller),
      applied per example.
    time_variable: 't' or 'gamma' (log-SNR): the variable integrated over;
      with 'gamma' only gamma(t0) and gamma(t1) are evaluated.
    max_steps: solver steps before it gives up with an error.
    error_norm: how a step's error estimate, scaled by atol + rtol |y|, is
      reduced to the one number the controller holds below 1: 'joint' (one
      RMS over z and the log-density integral) or 'separate' (each on its
      own). Both per example, the worst example deciding.
  Returns:
    (logp [B] float32 nats, nfe [] int32: evaluations of the right-hand
    side, each one forward and one vjp of `eps_fn` for the whole batch).
  Raises:
    ValueError: an option out of its range, 'hutchinson' without a key, or
      'exact' on more than MAX_EXACT_DIMS dimensions.
  """
  _check_choice("divergence", divergence, DIVERGENCES)
  _check_choice("time_variable", time_variable, TIME_VARIABLES)
  _check_choice("error_norm", error_norm, ERROR_NORMS)
  _check_tolerance("rtol", rtol)
  _check_tolerance("atol", atol)
  num_probes = checks.check_int("num_probes", num_probes, minimum=1)
  max_steps = checks.check_int("max_steps", max_steps, minimum=1)
  if not (0.0 <= float(t0) < float(t1) <= 1.0):
    raise ValueError(f"need 0 <= t0 < t1 <= 1; got t0={t0}, t1={t1}.")
  z = jnp.asarray(z, jnp.float32)
  if z.ndim < 2:
    raise ValueError(f"z must be [B, ...] with at least one data axis; got "
                     f"shape {z.shape}.")
  batch, num_dims = z.shape[0], math.prod(z.shape[1:])
  if divergence == "hutchinson":
    if key is None:
      raise ValueError("divergence='hutchinson' needs key=jax.random.key(...)"
                       " for its probes.")
    probes = _rademacher(key, (num_probes, *z.shape))
  else:
    if num_dims > MAX_EXACT_DIMS:
      raise ValueError(
          f"divergence='exact' costs {num_dims} vjps per evaluation on "
          f"{num_dims} dims (limit {MAX_EXACT_DIMS}); use "
          "divergence='hutchinson' with a key.")
    # One-hot basis e_i for every example at once: examples do not
    # interact, so (e_i^T J)_i is each example's i-th diagonal entry.
    probes = jnp.broadcast_to(
        jnp.eye(num_dims, dtype=jnp.float32).reshape(
            (num_dims, 1, *z.shape[1:])), (num_dims, *z.shape))

  def rhs(s, state, args):
    del args
    z_s = state[0]
    if time_variable == "gamma":
      gamma = jnp.full((batch,), s, jnp.float32)
      dgamma = jnp.ones((batch,), jnp.float32)
    else:
      gamma, dgamma = jax.jvp(gamma_fn, (jnp.full((batch,), s, jnp.float32),),
                              (jnp.ones((batch,), jnp.float32),))
    _, sigma = process.alpha_sigma(gamma)
    sigma = process.per_example(sigma, z_s.ndim)
    scale = process.per_example(-0.5 * dgamma, z_s.ndim)

    def drift_fn(z_in):
      return scale * (jnp.square(sigma) * z_in - sigma * eps_fn(z_in, gamma))

    drift, vjp_fn = jax.vjp(drift_fn, z_s)
    v_j = jax.vmap(lambda v: vjp_fn(v)[0])(probes)
    axes = tuple(range(2, probes.ndim))
    div = jnp.sum(v_j * probes, axis=axes)                # [P, B]
    div = jnp.sum(div, axis=0) if divergence == "exact" else \
        jnp.mean(div, axis=0)
    return drift, div

  if time_variable == "gamma":
    ends = gamma_fn(jnp.array([t0, t1], jnp.float32))
    s0, s1 = ends[0], ends[1]
  else:
    s0, s1 = jnp.float32(t0), jnp.float32(t1)
  state0 = (z, jnp.zeros((batch,), jnp.float32))
  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(rhs), diffrax.Tsit5(), s0, s1, dt0=None, y0=state0,
      stepsize_controller=diffrax.PIDController(
          rtol=rtol, atol=atol, norm=_ERROR_NORMS[error_norm]),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  z_1 = solution.ys[0][0]
  integral = solution.ys[1][0]
  log_prior = -0.5 * jnp.sum(jnp.reshape(jnp.square(z_1), (batch, -1)),
                             axis=1) - 0.5 * num_dims * math.log(2 * math.pi)
  nfe = 1 + _EVALS_PER_STEP * solution.stats["num_steps"]
  return log_prior + integral, jnp.asarray(nfe, jnp.int32)


def dequantize(x: jax.typing.ArrayLike, vocab_size: int,
               gamma_0: jax.typing.ArrayLike, key: jax.Array, *,
               dequantization: str = "truncated_normal"
               ) -> tuple[jax.Array, jax.Array]:
  """One draw z ~ q(z | x) inside the bin of x, and log q(z | x) (module doc).

  Args:
    x: [B, ...] integers in [0, vocab_size).
    vocab_size: V, the number of levels.
    gamma_0: [] the model's gamma(0) ('truncated_normal' noises with the
      diffusion's own alpha_0, sigma_0; 'uniform' ignores it).
    key: a `jax.random.key` for the noise.
    dequantization: 'uniform' or 'truncated_normal'.
  Returns:
    (z [B, ...] float32 in the bins of x, log_q [B] float32 nats).
  """
  _check_choice("dequantization", dequantization, DEQUANTIZATIONS)
  vocab_size = checks.check_int("vocab_size", vocab_size, minimum=2)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"x must hold integer levels in [0, {vocab_size}); got "
                    f"dtype {x.dtype}.")
  f = 2.0 * (x.astype(jnp.float32) + 0.5) / vocab_size - 1.0
  batch, num_dims = f.shape[0], math.prod(f.shape[1:])
  if dequantization == "uniform":
    u = jax.random.uniform(key, f.shape, minval=-1.0 / vocab_size,
                           maxval=1.0 / vocab_size)
    log_q = jnp.full((batch,), num_dims * math.log(vocab_size / 2.0))
    return f + u, log_q
  gamma_0 = jnp.asarray(gamma_0, jnp.float32)
  alpha_0, sigma_0 = process.alpha_sigma(gamma_0)
  log_sigma_0 = process.log_alpha_sigma(gamma_0)[1]
  # Half a bin in z-space is alpha_0 / V: the noise stays inside it.
  tau = alpha_0 / (vocab_size * sigma_0)
  eps = jax.random.truncated_normal(key, -tau, tau, f.shape)
  log_mass = jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0)))
  log_q = (-0.5 * jnp.sum(jnp.reshape(jnp.square(eps), (batch, -1)), axis=1)
           - num_dims * (0.5 * math.log(2 * math.pi) + log_sigma_0
                         + log_mass))
  return alpha_0 * f + sigma_0 * eps, log_q


def dequantized_log_likelihood(eps_fn: process.EpsFn,
                               gamma_fn: process.GammaFn,
                               x: jax.typing.ArrayLike, vocab_size: int,
                               key: jax.Array, *,
                               dequantization: str = "truncated_normal",
                               num_draws: int = 1,
                               divergence: str = "hutchinson",
                               num_probes: int = 1, rtol: float = 1e-5,
                               atol: float = 1e-5, time_variable: str = "t",
                               max_steps: int = 4096,
                               error_norm: str = "separate"
                               ) -> tuple[jax.Array, jax.Array]:
  """A lower bound on log P(x) of discrete data by the ODE (module doc).

  log mean_k exp(log p_t0(z_k) - log q(z_k | x)) over `num_draws` draws z_k
  of the dequantising q (`dequantize`): the importance-weighted bound, in
  nats, the ODE's log density `ode_log_density` with t0 = 0, t1 = 1. Bits
  per dim are -bound / (D log 2). Draws are solved one after another
  (`lax.map`), each for the whole batch.

  Args:
    eps_fn, gamma_fn: the model (see `ode_log_density`).
    x: [B, ...] integers in [0, vocab_size).
    vocab_size: V, the number of levels (bins of width 2/V in (-1, 1)).
    key: a `jax.random.key` for the dequantisation noise and the probes.
    dequantization: 'uniform' or 'truncated_normal'.
    num_draws: K >= 1.
    divergence, num_probes, rtol, atol, time_variable, max_steps,
      error_norm: passed to `ode_log_density`.
  Returns:
    (bound [B] float32 nats, nfe [] int32: the evaluations of all K solves).
  """
  num_draws = checks.check_int("num_draws", num_draws, minimum=1)
  gamma_0 = jnp.reshape(gamma_fn(jnp.zeros((1,), jnp.float32)), ())

  def one_draw(key_k):
    key_noise, key_probe = jax.random.split(key_k)
    z, log_q = dequantize(x, vocab_size, gamma_0, key_noise,
                          dequantization=dequantization)
    logp, nfe = ode_log_density(
        eps_fn, gamma_fn, z, t0=0.0, t1=1.0, key=key_probe,
        divergence=divergence, num_probes=num_probes, rtol=rtol, atol=atol,
        time_variable=time_variable, max_steps=max_steps,
        error_norm=error_norm)
    return logp - log_q, nfe

  log_w, nfe = jax.lax.map(one_draw, jax.random.split(key, num_draws))
  bound = jax.scipy.special.logsumexp(log_w, axis=0) - math.log(num_draws)
  return bound, jnp.sum(nfe)
