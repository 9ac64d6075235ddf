"""Tests for vdm.sampling: samplers on Gaussian data with the exact denoiser.

For data f ~ N(mu, std^2) per dimension, z_t = alpha_t f + sigma_t eps is
Gaussian and the Bayes-optimal noise prediction is linear in z_t:
  eps_hat(z_t) = E[eps | z_t] = sigma_t (z_t - alpha_t mu) / var_z_t,
  var_z_t = alpha_t^2 std^2 + sigma_t^2.
Every sampler step is then affine in z_t plus Gaussian noise, so the exact
mean and variance of the z_0 a sampler produces in T steps follow from a
float64 recursion (`reference_moments`, written from the VDM paper's
posterior q(z_s | z_t, x) and the DDIM paper's update, independently of the
module's expm1 form). The true marginal is q(z_0) = N(alpha_0 mu, alpha_0^2
std^2 + sigma_0^2).

Schedule: linear gamma on [-6, 12] (not DESIGN's [-13.3, 5]). gamma_max = 12
makes the prior N(0, I) match q(z_1) to alpha_1 = 2.5e-3, so what the tests
see is the samplers' own discretisation error: with gamma_max = 5, q(z_1) has
mean alpha_1 mu = 0.08 mu, which the deterministic DDIM map carries to z_0
(a 0.04-sd shift of the mean at any number of steps, 5 standard errors at the
sample size here; ancestral sampling forgets it). gamma_min = -6 instead of
-13.3 drops steps at SNR > 400 where the Gaussian's x_hat is already exact,
so the O(1/T) variance bias is ~30% smaller (measured with the recursion,
ancestral, T = 3000: -0.29% vs -0.42% of the variance).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import elbo
from vdm import sampling

GAMMA_MIN, GAMMA_MAX = -6.0, 12.0
DATA_MEAN = np.array([0.5, -0.4])  # mu per dimension
DATA_STD = np.array([0.3, 0.7])  # std per dimension
NUM_MC = 16384  # examples per Monte Carlo run (per dimension)
MANY_STEPS = 3000
FEW_STEPS = 20


def gamma_fn(t):
  return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def gaussian_eps_fn(mean, std):
  """Bayes-optimal eps_hat for data N(mean, std^2) per trailing dimension."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def eps_fn(z_t, gamma_t):
    assert gamma_t.shape == z_t.shape[:1]  # the API: gamma_t is [B]
    gamma_t = gamma_t.reshape((-1,) + (1,) * (z_t.ndim - 1))
    var_t = jax.nn.sigmoid(gamma_t)  # sigma_t^2
    alpha_t = jnp.sqrt(jax.nn.sigmoid(-gamma_t))
    var_z = alpha_t**2 * std**2 + var_t
    return jnp.sqrt(var_t) * (z_t - alpha_t * mean) / var_z

  return eps_fn


EPS_FN = gaussian_eps_fn(DATA_MEAN, DATA_STD)


def reference_moments(num_steps, sampler, eta=0.0):
  """Exact (float64) mean, variance and affine map z_1 -> z_0 of a sampler.

  Returns (mean [D], var [D], a [D], b [D]) where, for deterministic DDIM,
  z_0 = a z_1 + b; mean and var are over z_1 ~ N(0, I) and the step noise.
  """
  mean, var = np.zeros(2), np.ones(2)
  a, b = np.ones(2), np.zeros(2)
  for i in range(num_steps, 0, -1):
    gamma_t = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * i / num_steps
    gamma_s = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * (i - 1) / num_steps
    var_t, var_s = _sigmoid(gamma_t), _sigmoid(gamma_s)
    alpha_t, alpha_s = np.sqrt(1 - var_t), np.sqrt(1 - var_s)
    sigma_t = np.sqrt(var_t)
    k = sigma_t / (alpha_t**2 * DATA_STD**2 + var_t)  # eps_hat = k (z - a_t mu)
    x_slope = (1 - sigma_t * k) / alpha_t  # x_hat = x_slope z + x_offset
    x_offset = sigma_t * k * DATA_MEAN
    # VDM appendix "Distribution details": q(z_s | z_t, x).
    alpha_ts = alpha_t / alpha_s
    var_ts = var_t - alpha_ts**2 * var_s
    var_q = var_ts * var_s / var_t
    if sampler == "ancestral":
      slope = alpha_ts * var_s / var_t + alpha_s * var_ts / var_t * x_slope
      offset = alpha_s * var_ts / var_t * x_offset
      noise_var = var_q
    else:  # DDIM: z_s = alpha_s x_hat + sqrt(var_s - var_eta) eps_hat + ...
      var_eta = eta**2 * var_q
      coef = np.sqrt(var_s - var_eta)
      slope = alpha_s * x_slope + coef * k
      offset = alpha_s * x_offset - coef * k * alpha_t * DATA_MEAN
      noise_var = var_eta
    mean, var = slope * mean + offset, slope**2 * var + noise_var
    a, b = slope * a, slope * b + offset
  return mean, var, a, b


def target_moments():
  var_0 = _sigmoid(GAMMA_MIN)
  alpha_0 = np.sqrt(1 - var_0)
  return alpha_0 * DATA_MEAN, alpha_0**2 * DATA_STD**2 + var_0


def standard_errors(var, n):
  """Standard errors of the sample mean and variance of n Gaussian draws."""
  return np.sqrt(var / n), var * np.sqrt(2.0 / (n - 1))


@functools.lru_cache(maxsize=None)
def jitted(sampler, num_steps, shape, eta=0.0, clip_x=False, eps_fn=EPS_FN):
  """One compiled sampler per configuration, shared by the tests."""
  if sampler == "ancestral":
    fn = functools.partial(sampling.ancestral, clip_x=clip_x)
  else:
    fn = functools.partial(sampling.ddim, eta=eta, clip_x=clip_x)
  return jax.jit(lambda key: fn(key, eps_fn, gamma_fn, shape,
                                num_steps=num_steps))


def mc_moments(sampler, num_steps, eta=0.0, seed=0):
  z_0 = jitted(sampler, num_steps, (NUM_MC, 2), eta)(jax.random.key(seed))
  z_0 = np.asarray(z_0, np.float64)
  return z_0.mean(axis=0), z_0.var(axis=0, ddof=1)


SAMPLERS = [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5)]


# ------------------------------------------------- moments of Gaussian data


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_enough_steps_match_the_true_marginal(sampler, eta):
  target_mean, target_var = target_moments()
  se_mean, se_var = standard_errors(target_var, NUM_MC)
  # "Enough" steps: the exact residual bias of T = 3000 steps is below 0.3
  # standard errors (float64 recursion: variance -0.30% ancestral, -0.15%
  # DDIM, -0.19% eta=0.5, i.e. 0.27, 0.13, 0.17 SE; DDIM mean 0.16 SE, the
  # prior mismatch left at gamma_max = 12).
  ref_mean, ref_var, _, _ = reference_moments(MANY_STEPS, sampler, eta)
  np.testing.assert_array_less(np.abs(ref_mean - target_mean), 0.3 * se_mean)
  np.testing.assert_array_less(np.abs(ref_var - target_var), 0.3 * se_var)
  # The sampler itself: within 4 standard errors of the true marginal.
  mean, var = mc_moments(sampler, MANY_STEPS, eta)
  np.testing.assert_array_less(np.abs(mean - target_mean), 4 * se_mean)
  np.testing.assert_array_less(np.abs(var - target_var), 4 * se_var)


@pytest.mark.parametrize("sampler,eta", SAMPLERS)
def test_few_steps_bias_is_real_and_as_predicted(sampler, eta):
  # With T = 20 steps every sampler shrinks the variance of z_0: a step with
  # the posterior mean x_hat drops Var[x | z_t] (ancestral) or takes a
  # too-coarse Euler step of the ODE (DDIM). Exact relative variance bias of
  # T = 20 (float64 recursion): ancestral -33% / -34% (dims 0 / 1), DDIM
  # eta=0 -20% / -20%, eta=0.5 -23% / -23%: 18 to 31 standard errors of the
  # variance at NUM_MC examples. The means stay unbiased (< 0.15 SE).
  # Measured here (seed 1): -35% / -33%, -20% / -22%, -23% / -24%, each
  # within 2.5 SE of the prediction.
  target_mean, target_var = target_moments()
  ref_mean, ref_var, _, _ = reference_moments(FEW_STEPS, sampler, eta)
  se_mean, se_var = standard_errors(ref_var, NUM_MC)
  mean, var = mc_moments(sampler, FEW_STEPS, eta, seed=1)
  # The bias is real: far beyond Monte Carlo error ...
  assert np.all(target_var - var > 10 * standard_errors(target_var,
                                                        NUM_MC)[1])
  # ... and is the one the exact recursion predicts.
  np.testing.assert_array_less(np.abs(var - ref_var), 4 * se_var)
  np.testing.assert_array_less(np.abs(mean - ref_mean), 4 * se_mean)
  np.testing.assert_array_less(np.abs(mean - target_mean), 4 * se_mean)


@pytest.mark.parametrize("num_steps", [5, FEW_STEPS, 500])
def test_ddim_map_matches_float64_recursion(num_steps):
  # Deterministic DDIM with a linear eps_hat is affine: z_0 = a z_1 + b.
  # Recover a and b from z_1 = 0 and z_1 = 1; no Monte Carlo involved.
  # (Not T = 1: x_hat = (z_t - sigma_t eps_hat) / alpha_t at gamma = 12
  # cancels below float32 resolution, in any eps-parameterised model.)
  _, _, a, b = reference_moments(num_steps, "ddim", 0.0)
  z_1 = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  z_0 = np.asarray(sampling.ddim_from(z_1, EPS_FN, gamma_fn,
                                      num_steps=num_steps), np.float64)
  # float32 rounding accumulates over the steps: ~1e-6 per step, relative.
  np.testing.assert_allclose(z_0[0], b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(z_0[1] - z_0[0], a, rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_one_is_the_ancestral_sampler():
  # Same key, so the same z_1 and step noise; the two updates are written
  # differently (x_hat form vs the expm1 eps form) and agree to rounding.
  shape = (64, 2)
  key = jax.random.key(3)
  z_anc = jitted("ancestral", 50, shape)(key)
  z_ddim = jitted("ddim", 50, shape, 1.0)(key)
  np.testing.assert_allclose(z_ddim, z_anc, rtol=1e-4, atol=1e-5)
  z_det = jitted("ddim", 50, shape, 0.0)(key)
  assert np.max(np.abs(z_det - z_anc)) > 0.1  # eta matters


# --------------------------------------------------- DDIM: determinism, ODE


def test_ddim_is_deterministic_given_z_1():
  shape = (8, 2)
  key = jax.random.key(4)
  z_1 = sampling.draw_z_1(key, shape)
  from_z = jax.jit(functools.partial(sampling.ddim_from, eps_fn=EPS_FN,
                                     gamma_fn=gamma_fn, num_steps=30))
  z_0 = jitted("ddim", 30, shape)(key)
  np.testing.assert_array_equal(jitted("ddim", 30, shape)(key), z_0)
  np.testing.assert_array_equal(from_z(z_1), z_0)  # ddim == ddim_from(z_1)
  # Repeated rows of z_1 give repeated rows of z_0, to the bit.
  z_0_rep = from_z(jnp.concatenate([z_1[:2], z_1[:2]]))
  np.testing.assert_array_equal(z_0_rep[:2], z_0_rep[2:])
  np.testing.assert_array_equal(z_0_rep[:2], z_0[:2])
  assert not np.allclose(jitted("ddim", 30, shape)(jax.random.key(5)), z_0)


@pytest.fixture(scope="module")
def ddim_round_trip():
  z_1 = sampling.draw_z_1(jax.random.key(6), (256, 2))

  def run(num_steps, num_fixed_point_iters):
    z_0 = sampling.ddim_from(z_1, EPS_FN, gamma_fn, num_steps=num_steps)
    back = sampling.ddim_invert(z_0, EPS_FN, gamma_fn, num_steps=num_steps,
                                num_fixed_point_iters=num_fixed_point_iters)
    return jnp.max(jnp.abs(back - z_1))

  run = jax.jit(run, static_argnums=(0, 1))
  return lambda *args: float(run(*args))


@pytest.mark.parametrize("num_steps", [25, 200])
def test_ddim_inverts_to_float_tolerance(ddim_round_trip, num_steps):
  # Solving each implicit step by fixed-point iteration inverts the sampler
  # exactly; measured max |z_1 - invert(ddim(z_1))|: 5e-6 (25 steps),
  # 8e-6 (200 steps) with 8 iterations: float32 rounding over 2 T steps.
  assert ddim_round_trip(num_steps, 8) < 3e-5


def test_ddim_plain_inversion_is_first_order(ddim_round_trip):
  # The DDIM paper's encoder (eps_hat at the known end of each step) is an
  # Euler step of the ODE: its round-trip error halves when T doubles
  # (measured 0.143 at T = 100, 0.072 at T = 200).
  err_100, err_200 = ddim_round_trip(100, 0), ddim_round_trip(200, 0)
  assert 0.05 < err_200 < 0.1
  assert 1.8 < err_100 / err_200 < 2.2


def test_ddim_invert_then_sample_round_trip():
  z_0 = sampling.draw_z_1(jax.random.key(7), (16, 2)) * DATA_STD + DATA_MEAN
  z_1 = sampling.ddim_invert(z_0, EPS_FN, gamma_fn, num_steps=40,
                             num_fixed_point_iters=8)
  back = sampling.ddim_from(z_1, EPS_FN, gamma_fn, num_steps=40)
  np.testing.assert_allclose(back, z_0, atol=2e-5)
  # Latents of data look like N(0, 1): the ODE standardises the marginal.
  assert np.abs(np.asarray(z_1)).max() < 5


def test_ddim_sub_interval_composes():
  # ddim_from over [0.5, 1] then [0, 0.5] equals one run over [0, 1] with
  # the same grid (t_i = i / 20, bit-identical times).
  z_1 = sampling.draw_z_1(jax.random.key(8), (4, 2))
  z_half = sampling.ddim_from(z_1, EPS_FN, gamma_fn, num_steps=10,
                              t_start=1.0, t_end=0.5)
  z_0 = sampling.ddim_from(z_half, EPS_FN, gamma_fn, num_steps=10,
                           t_start=0.5, t_end=0.0)
  np.testing.assert_allclose(
      z_0, sampling.ddim_from(z_1, EPS_FN, gamma_fn, num_steps=20),
      rtol=1e-5, atol=1e-6)


# -------------------------------------------------------- keys and batches


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.5)])
def test_sample_does_not_depend_on_batch_mates(sampler, eta):
  key = jax.random.key(9)
  big = jitted(sampler, 10, (6, 3), eta, eps_fn=EPS_3)(key)
  small = jitted(sampler, 10, (2, 3), eta, eps_fn=EPS_3)(key)
  np.testing.assert_array_equal(big[:2], small)
  # Different examples get different noise (no key reused across the batch).
  assert len(np.unique(np.asarray(big[:, 0]))) == 6
  np.testing.assert_array_equal(
      sampling.draw_z_1(key, (6, 3))[:2], sampling.draw_z_1(key, (2, 3)))


# ------------------------------------------------------------------ guided


EPS_3 = gaussian_eps_fn([0.5, -0.4, 0.1], [0.3, 0.7, 0.2])
EPS_3_OTHER = gaussian_eps_fn([-0.5, 0.2, 0.3], [0.3, 0.1, 0.5])


def test_guided_formula():
  z = sampling.draw_z_1(jax.random.key(10), (4, 3))
  gamma = jnp.full((4,), 1.5)
  got = sampling.guided(EPS_3, EPS_3_OTHER, 2.0)(z, gamma)
  want = 3.0 * np.asarray(EPS_3(z, gamma), np.float64) - 2.0 * np.asarray(
      EPS_3_OTHER(z, gamma), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0)])
def test_guidance_scale_zero_is_the_conditional_sampler(sampler, eta):
  key = jax.random.key(11)
  cond = jitted(sampler, 10, (4, 3), eta, eps_fn=EPS_3)(key)
  zero = sampling.guided(EPS_3, EPS_3_OTHER, 0.0)
  np.testing.assert_array_equal(
      jitted(sampler, 10, (4, 3), eta, eps_fn=zero)(key), cond)
  # Equal predictions (two separate but identical functions): no effect at
  # any scale. Separately compiled graphs may fuse (and round) differently,
  # hence a 1-ulp-level tolerance here; the eps-level test below is exact.
  same = gaussian_eps_fn([0.5, -0.4, 0.1], [0.3, 0.7, 0.2])
  eps_fn = sampling.guided(EPS_3, same, 3.0)
  np.testing.assert_allclose(
      jitted(sampler, 10, (4, 3), eta, eps_fn=eps_fn)(key), cond,
      rtol=1e-6, atol=1e-6)
  # A real guidance scale with a different unconditional model does change it.
  other = sampling.guided(EPS_3, EPS_3_OTHER, 1.0)
  assert np.max(np.abs(
      jitted(sampler, 10, (4, 3), eta, eps_fn=other)(key) - cond)) > 0.01


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_guided_with_equal_models_is_exact(scale):
  # Op by op (no fusion), eps_cond + scale (eps_cond - eps_uncond) is exactly
  # eps_cond when both agree, also for a traced scale; (1 + s) e - s e is not
  # always (e.g. 4e - 3e rounds).
  z = sampling.draw_z_1(jax.random.key(20), (64, 3))
  gamma = jnp.linspace(-5.0, 10.0, 64)
  same = gaussian_eps_fn([0.5, -0.4, 0.1], [0.3, 0.7, 0.2])
  want = EPS_3(z, gamma)
  for s in (scale, jnp.float32(scale)):
    np.testing.assert_array_equal(sampling.guided(EPS_3, same, s)(z, gamma),
                                  want)


# ------------------------------------------------------------------ decode


def test_argmax_decoding_recovers_x_at_small_gamma_0():
  vocab_size = 256
  x = jax.random.randint(jax.random.key(12), (8, 4, 4, 3), 0, vocab_size)
  f = elbo.encode(x, vocab_size)
  # Exactly at the value (alpha_0 ~ 1 - 6e-8 at gamma_0 = -16) ...
  gamma_0 = -16.0
  alpha_0 = np.sqrt(_sigmoid(-gamma_0))
  np.testing.assert_array_equal(
      sampling.decode(None, alpha_0 * f, gamma_0, vocab_size), x)
  # ... and with the forward noise: sigma_0 = 3.4e-4 is 1/11 of half the
  # spacing between values (1/256), so rounding is off with prob ~1e-28.
  eps = jax.random.normal(jax.random.key(13), f.shape)
  z_0 = alpha_0 * f + np.sqrt(_sigmoid(gamma_0)) * eps
  x_dec = sampling.decode(None, z_0, gamma_0, vocab_size, mode="argmax")
  assert x_dec.dtype == jnp.int32
  np.testing.assert_array_equal(x_dec, x)


def test_argmax_is_the_nearest_value():
  # At a larger gamma_0 the decoder's argmax is still the value nearest to
  # z_0 / alpha_0: round((z_0 / alpha_0 + 1) V / 2 - 0.5), clipped (float64).
  vocab_size, gamma_0 = 16, -2.0
  alpha_0 = np.sqrt(_sigmoid(-gamma_0))
  z_0 = np.linspace(-1.3, 1.3, 203)[:, None]
  boundary = (z_0 / alpha_0 + 1) * vocab_size / 2  # integer: a tie
  z_0 = z_0[np.abs(boundary - np.round(boundary)) > 1e-3][:, None]
  want = np.clip(np.round((z_0 / alpha_0 + 1) * vocab_size / 2 - 0.5), 0,
                 vocab_size - 1)
  np.testing.assert_array_equal(
      sampling.decode(None, z_0, gamma_0, vocab_size), want)


def test_sample_decoding_is_reproducible_and_follows_the_softmax():
  vocab_size, gamma_0, n = 4, 0.0, 20000
  z_0 = jnp.full((n, 1), 0.1)  # the same z_0 for every example
  key = jax.random.key(14)
  decode = jax.jit(functools.partial(sampling.decode, gamma_0=gamma_0,
                                     vocab_size=vocab_size, mode="sample"))
  x = np.asarray(decode(key, z_0))
  np.testing.assert_array_equal(decode(key, z_0), x)
  np.testing.assert_array_equal(decode(key, z_0[:5]), x[:5])  # per example
  assert not np.array_equal(decode(jax.random.key(15), z_0), x)
  # Frequencies match softmax(logits) within 4 standard errors (float64
  # logits from DESIGN's decoder formula).
  alpha_0 = np.sqrt(_sigmoid(-gamma_0))
  f_values = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
  logits = -0.5 * (0.1 / alpha_0 - f_values)**2 / np.exp(gamma_0)
  prob = np.exp(logits - logits.max())
  prob /= prob.sum()
  freq = np.bincount(x[:, 0], minlength=vocab_size) / n
  np.testing.assert_array_less(np.abs(freq - prob),
                               4 * np.sqrt(prob * (1 - prob) / n))


# ------------------------------------------------------------- progressive


@functools.lru_cache(maxsize=None)
def jitted_progressive(sampler, num_steps, num_frames, eta=0.0, clip_x=False,
                       eps_fn=EPS_3, shape=(3, 3)):
  return jax.jit(lambda key: sampling.progressive(
      key, eps_fn, gamma_fn, shape, num_steps=num_steps,
      num_frames=num_frames, sampler=sampler, eta=eta, clip_x=clip_x))


def x_hat_of(eps_fn, z_t, t):
  gamma_t = jnp.full(z_t.shape[:1], gamma_fn(t))
  eps_hat = np.asarray(eps_fn(z_t, gamma_t), np.float64)
  var_t = _sigmoid(gamma_fn(t))
  return (np.asarray(z_t, np.float64) - np.sqrt(var_t) * eps_hat) / np.sqrt(
      1 - var_t)


@pytest.mark.parametrize("sampler,eta", [("ancestral", 0.0), ("ddim", 0.0),
                                         ("ddim", 0.5)])
def test_progressive_frames(sampler, eta):
  key = jax.random.key(16)
  z_0, frames = jitted_progressive(sampler, 12, 5, eta)(key)
  assert frames.shape == (5, 3, 3)
  # The same chain as the plain sampler, to the bit.
  np.testing.assert_array_equal(z_0, jitted(sampler, 12, (3, 3), eta,
                                            eps_fn=EPS_3)(key))
  # First frame: x_hat at t = 1 from z_1; last: the final x_hat, at z_0.
  z_1 = sampling.draw_z_1(key, (3, 3))
  np.testing.assert_allclose(frames[0], x_hat_of(EPS_3, z_1, 1.0),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(frames[-1], x_hat_of(EPS_3, z_0, 0.0),
                             rtol=1e-5, atol=1e-5)


def test_progressive_middle_frames_follow_the_ddim_chain():
  # Frames k = 1..3 of 5 are x_hat after 3, 6, 9 of 12 steps: recompute them
  # by running ddim_from to t = 1 - j / 12 (same grid up to rounding).
  key = jax.random.key(17)
  z_0, frames = jitted_progressive("ddim", 12, 5)(key)
  z_1 = sampling.draw_z_1(key, (3, 3))
  for k, j in ((1, 3), (2, 6), (3, 9)):
    z_t = sampling.ddim_from(z_1, EPS_3, gamma_fn, num_steps=j,
                             t_start=1.0, t_end=1.0 - j / 12)
    np.testing.assert_allclose(frames[k], x_hat_of(EPS_3, z_t, 1 - j / 12),
                               rtol=1e-4, atol=1e-4)
  # Along the chain x_hat moves from the data mean towards the sample.
  assert np.abs(frames[-1] - frames[0]).max() > 0.1


def test_progressive_frame_counts():
  z_0, one = jitted_progressive("ancestral", 4, 1)(jax.random.key(18))
  _, every = jitted_progressive("ancestral", 4, 5)(jax.random.key(18))
  assert one.shape == (1, 3, 3) and every.shape == (5, 3, 3)
  np.testing.assert_array_equal(one[0], every[-1])
  # num_steps + 1 frames: every state z_1, z_{3/4}, ..., z_0 once, distinct.
  assert len({np.asarray(f).tobytes() for f in every}) == 5


# ------------------------------------------------------------------ clip_x


def test_clip_x_keeps_x_hat_in_range():
  # Data centred at 3, outside [-1, 1]: unclipped x_hat goes there, clipped
  # x_hat and the resulting z_0 / alpha_0 stay within [-1, 1] (+ noise).
  eps_far = gaussian_eps_fn([3.0, 3.0, 3.0], [0.1, 0.1, 0.1])
  key = jax.random.key(19)
  for sampler in ("ancestral", "ddim"):
    z_free, x_free = jitted_progressive(sampler, 10, 11, eps_fn=eps_far)(key)
    z_clip, x_clip = jitted_progressive(sampler, 10, 11, clip_x=True,
                                        eps_fn=eps_far)(key)
    assert np.max(x_free) > 2.5 and np.min(x_free[-1]) > 2.5
    assert np.max(np.abs(x_clip)) <= 1.0
    # z_0 keeps exp(gamma_0 - gamma_{1/10}) = 16% of z_{1/10} / alpha: > 1.
    assert np.max(z_clip) < 1.3 and np.min(z_free) > 2.5
    np.testing.assert_array_equal(
        jitted(sampler, 10, (3, 3), clip_x=True, eps_fn=eps_far)(key), z_clip)


# ---------------------------------------------------------------- jit, errors


def test_samplers_compile_once():
  calls = []

  def counting_eps(z_t, gamma_t):
    calls.append(1)  # runs at trace time only
    return EPS_3(z_t, gamma_t)

  run = jax.jit(lambda key: sampling.ancestral(
      key, counting_eps, gamma_fn, (2, 3), num_steps=50))
  run(jax.random.key(0))
  run(jax.random.key(1))
  assert len(calls) == 1  # one trace of the scan body for 50 steps, once


def _ancestral(**kwargs):
  return sampling.ancestral(jax.random.key(0), EPS_3, gamma_fn, (2, 3),
                            **kwargs)


def _ddim(**kwargs):
  return sampling.ddim(jax.random.key(0), EPS_3, gamma_fn, (2, 3), **kwargs)


def _progressive(**kwargs):
  kwargs.setdefault("num_steps", 4)
  return sampling.progressive(jax.random.key(0), EPS_3, gamma_fn, (2, 3),
                              **kwargs)


ERRORS = [
    ("num_steps_zero", lambda: _ancestral(num_steps=0), ValueError,
     r"num_steps must be >= 1; got 0"),
    ("num_steps_negative", lambda: _ddim(num_steps=-3), ValueError,
     r"got -3"),
    ("num_steps_float", lambda: _ancestral(num_steps=2.5), TypeError,
     r"num_steps must be an int; got 2.5"),
    ("num_steps_ddim_from", lambda: sampling.ddim_from(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=0), ValueError,
     r"got 0"),
    ("eta_above", lambda: _ddim(num_steps=2, eta=1.5), ValueError,
     r"eta must be in \[0, 1\].*got 1.5"),
    ("eta_below", lambda: _ddim(num_steps=2, eta=-0.1), ValueError,
     r"got -0.1"),
    ("eps_shape", lambda: sampling.ancestral(
        jax.random.key(0), lambda z, g: z[:, :1], gamma_fn, (2, 3),
        num_steps=2), ValueError,
     r"eps_fn returned shape \(2, 1\); expected \(2, 3\)"),
    ("eps_shape_invert", lambda: sampling.ddim_invert(
        jnp.zeros((2, 3)), lambda z, g: z[0], gamma_fn, num_steps=2),
     ValueError, r"eps_fn returned shape \(3,\)"),
    ("decode_mode", lambda: sampling.decode(
        None, jnp.zeros((2, 3)), -6.0, 256, mode="mean"), ValueError,
     r"unknown decode mode 'mean'; known: argmax, sample"),
    ("decode_sample_no_key", lambda: sampling.decode(
        None, jnp.zeros((2, 3)), -6.0, 256, mode="sample"), ValueError,
     r"needs a key"),
    ("sampler", lambda: _progressive(num_frames=2, sampler="euler"),
     ValueError, r"unknown sampler 'euler'; known: ancestral, ddim"),
    ("num_frames_zero", lambda: _progressive(num_frames=0), ValueError,
     r"num_frames must be in \[1, 5\]; got 0\. .*"
     r"at most num_steps \+ 1"),
    ("num_frames_big", lambda: _progressive(num_frames=6), ValueError,
     r"got 6"),
    ("ddim_from_direction", lambda: sampling.ddim_from(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=2, t_start=0.2,
        t_end=0.5), ValueError, r"need t_start > t_end; got t_start=0.2"),
    ("ddim_invert_direction", lambda: sampling.ddim_invert(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=2, t_start=1.0,
        t_end=0.0), ValueError, r"need t_end > t_start"),
    ("time_range", lambda: sampling.ddim_from(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=2, t_start=1.5),
     ValueError, r"t_start must be in \[0, 1\]; got 1.5"),
    ("fixed_point_iters", lambda: sampling.ddim_invert(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=2,
        num_fixed_point_iters=-1), ValueError,
     r"num_fixed_point_iters must be >= 0; got -1"),
    ("num_steps_bool", lambda: _ddim(num_steps=True), TypeError,
     r"num_steps must be an int; got True"),
    ("num_frames_float", lambda: _progressive(num_frames=2.0), TypeError,
     r"num_frames must be an int; got 2\.0"),
    ("fixed_point_iters_float", lambda: sampling.ddim_invert(
        jnp.zeros((2, 3)), EPS_3, gamma_fn, num_steps=2,
        num_fixed_point_iters=1.0), TypeError,
     r"num_fixed_point_iters must be an int; got 1\.0"),
    ("guided_not_callable", lambda: sampling.guided(EPS_3, None, 1.0),
     TypeError, r"eps_uncond must be a function"),
    ("empty_shape", lambda: sampling.ancestral(
        jax.random.key(0), EPS_3, gamma_fn, (), num_steps=2), ValueError,
     r"shape must be \[B, \.\.\.\]"),
]


@pytest.mark.parametrize("name,fn,error,match", ERRORS,
                         ids=[e[0] for e in ERRORS])
def test_errors(name, fn, error, match):
  del name
  with pytest.raises(error, match=match):
    fn()
