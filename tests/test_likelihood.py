"""Tests for vdm.likelihood: the PF-ODE log density against closed forms.

Gaussian data x ~ N(MU, SIGMA) (a correlated SIGMA) has the Bayes-optimal
eps_hat(z, g) = sigma Cov_g^{-1} (z - alpha MU), Cov_g = alpha^2 SIGMA +
sigma^2 I. With it the probability-flow ODE maps the marginals exactly: in
SIGMA's eigenbasis y = U^T (z - alpha_0 MU) every coordinate is scaled by
sqrt(v_1 / v_0) (v = alpha^2 s + sigma^2), so z_1 and the divergence
integral log q_0(z) - log q_1(z_1) are analytic, and the model's density
(prior N(0, I) at t1) is log q_0(z) - log q_1(z_1) + log N(z_1; 0, I).
A diagonal-only divergence would miss SIGMA's off-diagonal terms.
"""
import math

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vdm import likelihood
from vdm import process
from vdm import schedules

D = 3
_RNG = np.random.default_rng(0)
_A = _RNG.normal(size=(D, D))
SIGMA = _A @ _A.T / D + 0.1 * np.eye(D)
MU = np.array([0.5, -0.3, 0.2])
Z = (_RNG.normal(size=(5, D)) * 0.8).astype(np.float32)


def linear(t):
  return schedules.fixed_linear(t, gamma_min=-13.3, gamma_max=5.0)


def make_eps_fn(mu, sigma_data):
  mu = jnp.asarray(mu, jnp.float32)
  cov_data = jnp.asarray(sigma_data, jnp.float32)
  dims = mu.shape[0]

  def eps_fn(z, gamma):
    alpha, sigma = process.alpha_sigma(gamma)
    cov = (alpha[:, None, None] ** 2 * cov_data
           + sigma[:, None, None] ** 2 * jnp.eye(dims))
    resid = z - alpha[:, None] * mu
    return sigma[:, None] * jnp.linalg.solve(cov, resid[..., None])[..., 0]

  return eps_fn


EPS_FN = make_eps_fn(MU, SIGMA)


def exact_log_density(z, gamma_0, gamma_1, mu=MU, sigma_data=SIGMA):
  s, u = np.linalg.eigh(sigma_data)
  (a0, s0), (a1, s1) = [[float(v) for v in process.alpha_sigma(g)]
                        for g in (gamma_0, gamma_1)]
  y = (np.asarray(z, np.float64) - a0 * mu) @ u
  v0, v1 = a0 ** 2 * s + s0 ** 2, a1 ** 2 * s + s1 ** 2
  y1 = y * np.sqrt(v1 / v0)
  z1 = a1 * mu + y1 @ u.T
  log_q0 = -0.5 * np.sum(y ** 2 / v0, 1) - 0.5 * np.sum(np.log(2 * np.pi * v0))
  log_q1 = -0.5 * np.sum(y1 ** 2 / v1, 1) - 0.5 * np.sum(np.log(2 * np.pi * v1))
  return (log_q0 - log_q1 - 0.5 * np.sum(z1 ** 2, 1)
          - 0.5 * mu.shape[0] * np.log(2 * np.pi))


@pytest.mark.parametrize("time_variable", ["t", "gamma"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_exact_divergence_matches_gaussian_density(time_variable, schedule):
  gamma_fn = linear if schedule == "linear" else schedules.get("cosine")
  logp, nfe = jax.jit(lambda z: likelihood.ode_log_density(
      EPS_FN, gamma_fn, z, time_variable=time_variable))(Z)
  ends = gamma_fn(jnp.array([0.0, 1.0]))
  want = exact_log_density(Z, float(ends[0]), float(ends[1]))
  assert logp.shape == (5,)
  # Tolerances 1e-5: measured errors 1e-4 to 9e-4 nats on log p ~ -3.
  np.testing.assert_allclose(np.asarray(logp), want, atol=2e-3)
  assert 20 < int(nfe) < 400


def test_diagonal_covariance_would_be_detectably_wrong():
  # The check above can fail: the same z under a model that ignores
  # SIGMA's off-diagonal entries is off by far more than its tolerance.
  diag = np.diag(np.diag(SIGMA))
  logp, _ = likelihood.ode_log_density(make_eps_fn(MU, diag), linear, Z,
                                      rtol=1e-3, atol=1e-3)
  want = exact_log_density(Z, -13.3, 5.0)
  assert np.max(np.abs(np.asarray(logp) - want)) > 0.1


def test_nfe_counts_every_evaluation():
  count = [0]

  def counted(z, gamma):
    tick = jax.experimental.io_callback(
        lambda: (count.__setitem__(0, count[0] + 1), np.float32(0))[1],
        jax.ShapeDtypeStruct((), jnp.float32))
    return EPS_FN(z + tick, gamma)

  logp, nfe = likelihood.ode_log_density(counted, linear, Z)
  jax.block_until_ready(logp)
  assert count[0] == int(nfe)


def test_hutchinson_mean_matches_exact_within_standard_error():
  z = jnp.broadcast_to(jnp.asarray(Z[:1]), (128, D))
  exact, _ = likelihood.ode_log_density(EPS_FN, linear, z[:1])
  est, _ = likelihood.ode_log_density(
      EPS_FN, linear, z, divergence="hutchinson", key=jax.random.key(3))
  est = np.asarray(est, np.float64)
  se = est.std(ddof=1) / math.sqrt(est.size)
  assert se > 1e-3          # the probes do vary
  assert abs(est.mean() - float(exact[0])) < 3.5 * se
  # P probes average P independent estimates: the variance falls as 1 / P
  # (4 probes: 0.25 of one probe's; 127 degrees of freedom each side).
  est_4, _ = likelihood.ode_log_density(
      EPS_FN, linear, z, divergence="hutchinson", key=jax.random.key(4),
      num_probes=4)
  est_4 = np.asarray(est_4, np.float64)
  assert 0.12 < est_4.var(ddof=1) / est.var(ddof=1) < 0.5
  assert abs(est_4.mean() - float(exact[0])) < 3.5 * se


# Image-like data: 784 independent pixels, each a point mass on one of 256
# levels (MNIST-like: most mass at the two ends). The Bayes-optimal eps is a
# softmax over the levels, so the model is exact and sharp near t = 0, as a
# trained image model is; the density of z at t0 is the mixture q_0 in
# closed form. gamma(1) = 16 makes q_1 = N(0, I) to ~1e-7 nats per dim, so
# the ODE's log p(z) must equal log q_0(z).
PIXELS, LEVELS = 784, 256
_LEVEL_LOGITS = np.random.default_rng(1).normal(size=(PIXELS, LEVELS))
_LEVEL_LOGITS[:, 0] += 4.0
_LEVEL_LOGITS[:, -1] += 3.0
LOG_PI = _LEVEL_LOGITS - np.log(np.sum(np.exp(_LEVEL_LOGITS), 1, keepdims=True))
CENTRES = 2 * (np.arange(LEVELS) + 0.5) / LEVELS - 1


def wide_linear(t):
  return schedules.fixed_linear(t, gamma_min=-13.3, gamma_max=16.0)


def pixel_eps_fn(z, gamma):
  alpha, sigma = process.alpha_sigma(gamma)
  alpha, sigma = alpha[:, None, None], sigma[:, None, None]
  centres = jnp.asarray(CENTRES, jnp.float32)
  logits = (jnp.asarray(LOG_PI, jnp.float32)
            - 0.5 * jnp.square((z[..., None] - alpha * centres) / sigma))
  x_hat = jnp.sum(jax.nn.softmax(logits, -1) * centres, -1)
  return (z - alpha[..., 0] * x_hat) / sigma[..., 0]


def pixel_log_q0(z):
  a0, s0 = [float(v) for v in process.alpha_sigma(jnp.float32(-13.3))]
  z = np.asarray(z, np.float64)[..., None]
  log_n = LOG_PI - 0.5 * ((z - a0 * CENTRES) / s0) ** 2 - math.log(
      s0 * math.sqrt(2 * math.pi))
  peak = log_n.max(-1, keepdims=True)
  return np.sum(peak[..., 0] + np.log(np.sum(np.exp(log_n - peak), -1)), -1)


def test_error_norm_separate_bounds_the_log_density_on_sharp_data():
  # Measured errors (nats, 4 images, log p ~ -770 to -800): 'separate'
  # 0.003-0.012 at 1e-5 (0.009-0.011 at 1e-6: float32's floor), up to 0.08
  # at 1e-4; 'joint' (one RMS over z and the integral, which weighs 1/785
  # there) up to 0.23 at 1e-5 and -2.7 to -4.7 at 1e-4, all low.
  rng = np.random.default_rng(2)
  levels = rng.choice(LEVELS, size=(4, PIXELS))
  a0, s0 = [float(v) for v in process.alpha_sigma(jnp.float32(-13.3))]
  z = (a0 * CENTRES[levels] + s0 * rng.normal(size=levels.shape)).astype(
      np.float32)
  want = pixel_log_q0(z)

  def error(norm, tol):
    logp, _ = jax.jit(lambda z: likelihood.ode_log_density(
        pixel_eps_fn, wide_linear, z, divergence="hutchinson",
        key=jax.random.key(0), rtol=tol, atol=tol, error_norm=norm))(z)
    return np.asarray(logp, np.float64) - want

  # A Rademacher probe on a diagonal Jacobian is exact: no probe noise.
  assert np.max(np.abs(error("separate", 1e-5))) < 0.05
  joint = error("joint", 1e-4)
  assert np.all(joint < -1.0), joint


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="needs key"):
    likelihood.ode_log_density(EPS_FN, linear, Z, divergence="hutchinson")
  with pytest.raises(ValueError, match="divergence"):
    likelihood.ode_log_density(EPS_FN, linear, Z, divergence="diag")
  with pytest.raises(ValueError, match="error_norm='rms'.*'separate'"):
    likelihood.ode_log_density(EPS_FN, linear, Z, error_norm="rms")
  with pytest.raises(ValueError, match="t0 < t1"):
    likelihood.ode_log_density(EPS_FN, linear, Z, t0=0.5, t1=0.5)
  with pytest.raises(ValueError, match="hutchinson"):
    likelihood.ode_log_density(
        EPS_FN, linear, jnp.zeros((1, likelihood.MAX_EXACT_DIMS + 1)))
  with pytest.raises(TypeError, match="integer"):
    likelihood.dequantized_log_likelihood(
        EPS_FN, linear, Z, 16, jax.random.key(0))


# Discrete data: V levels per dim, bins of width 2/V in (-1, 1). With a
# diagonal data covariance the model's mass of a bin is a product of normal
# CDF differences (the ODE's density at t0 is q_0 exactly).
V = 16
DIAG = np.diag([0.3, 0.15, 0.2])
G0_TN, G1_TN = -7.0, 16.0    # sigma_0 ~ 1 / (2 V): tau ~ 2 for V = 16


def log_bin_mass(x, scale, gamma_0):
  a0, s0 = [float(v) for v in process.alpha_sigma(gamma_0)]
  f = 2 * (x + 0.5) / V - 1
  sd = np.sqrt(a0 ** 2 * np.diag(DIAG) + s0 ** 2)
  lo = (scale * (f - 1 / V) - a0 * MU) / sd
  hi = (scale * (f + 1 / V) - a0 * MU) / sd
  return np.sum(np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)), axis=1)


def reference_bound(x, key, dequantization, num_draws, gamma_0):
  """The importance-weighted bound with the exact density of the model
  (q_0) and the same draws as `dequantized_log_likelihood` (keys split(key,
  K), each split into (noise, probes))."""
  a0, s0 = [float(v) for v in process.alpha_sigma(gamma_0)]
  tau = a0 / (V * s0)
  f = 2 * (x + 0.5) / V - 1
  sd = np.sqrt(a0 ** 2 * np.diag(DIAG) + s0 ** 2)
  log_w = []
  for key_k in jax.random.split(key, num_draws):
    key_noise = jax.random.split(key_k)[0]
    if dequantization == "uniform":
      z = f + np.asarray(jax.random.uniform(key_noise, x.shape,
                                            minval=-1 / V, maxval=1 / V))
      log_q = D * math.log(V / 2)
    else:
      eps = np.asarray(jax.random.truncated_normal(key_noise, -tau, tau,
                                                   x.shape), np.float64)
      z = a0 * f + s0 * eps
      log_q = np.sum(stats.truncnorm(-tau, tau).logpdf(eps) - math.log(s0),
                     axis=1)
    log_w.append(np.sum(stats.norm.logpdf(z, a0 * MU, sd), axis=1) - log_q)
  log_w = np.stack(log_w)
  peak = log_w.max(axis=0)
  return peak + np.log(np.mean(np.exp(log_w - peak), axis=0))


@pytest.mark.parametrize("dequantization", ["uniform", "truncated_normal"])
def test_dequantize_stays_in_the_bin_with_its_density(dequantization):
  # z lies in the bin of x (scaled by alpha_0 for the truncated normal), and
  # log q is the density of z under the law it was drawn from, by scipy.
  x = np.array([[0, 7, 15], [3, 10, 12]] * 50)
  z, log_q = likelihood.dequantize(jnp.asarray(x), V, G0_TN,
                                   jax.random.key(3),
                                   dequantization=dequantization)
  z = np.asarray(z, np.float64)
  a0, s0 = [float(v) for v in process.alpha_sigma(G0_TN)]
  f = 2 * (x + 0.5) / V - 1
  if dequantization == "uniform":
    scale, want = 1.0, np.sum(stats.uniform(f - 1 / V, 2 / V).logpdf(z), 1)
  else:
    tau = a0 / (V * s0)
    scale = a0
    want = np.sum(stats.truncnorm(-tau, tau, loc=a0 * f, scale=s0).logpdf(z),
                  axis=1)
  assert np.all(np.abs(z - scale * f) <= scale / V * (1 + 1e-5))
  assert np.all(np.isfinite(want))
  np.testing.assert_allclose(np.asarray(log_q), want, rtol=1e-5, atol=1e-3)
  with pytest.raises(ValueError, match="dequantization"):
    likelihood.dequantize(jnp.asarray(x), V, G0_TN, jax.random.key(3),
                          dequantization="gaussian")


@pytest.mark.parametrize("dequantization", ["uniform", "truncated_normal"])
def test_dequantized_bound_matches_the_bin_mass_less_its_gap(dequantization):
  # E[log p(z) - log q(z|x)] = log P(x) - KL(q || p(. | bin)), and the
  # model's density is nearly flat over a bin: the gap is ~0 for uniform q
  # and D (log(2 tau) - H(TN(tau))) nats for the truncated normal (the KL
  # to a uniform on [-tau, tau] in units of sigma_0).
  gamma_fn = lambda t: schedules.fixed_linear(t, gamma_min=G0_TN,
                                              gamma_max=G1_TN)
  levels = np.array([[8, 6, 9], [3, 10, 7]])
  reps = 16
  x = np.repeat(levels, reps, 0)
  a0, s0 = [float(v) for v in process.alpha_sigma(G0_TN)]
  tau = a0 / (V * s0)
  if dequantization == "uniform":
    log_p, want_gap = log_bin_mass(levels, 1.0, G0_TN), 0.0
  else:
    log_p = log_bin_mass(levels, a0, G0_TN)     # bins of alpha_0 f
    want_gap = D * (math.log(2 * tau) - stats.truncnorm(-tau, tau).entropy())
  for num_draws in (1, 3):
    key = jax.random.key(num_draws)
    bound, nfe = likelihood.dequantized_log_likelihood(
        make_eps_fn(MU, DIAG), gamma_fn, jnp.asarray(x), V, key,
        dequantization=dequantization, num_draws=num_draws,
        divergence="exact", rtol=1e-4, atol=1e-4)
    assert int(nfe) > 4 * num_draws
    # Same draws, exact density: equal up to the ODE's error.
    np.testing.assert_allclose(
        np.asarray(bound), reference_bound(x, key, dequantization, num_draws,
                                           G0_TN), atol=3e-3)
    bound = np.asarray(bound, np.float64).reshape(len(levels), reps)
    se = bound.std(axis=1, ddof=1) / math.sqrt(reps)
    gap = log_p - bound.mean(axis=1)
    assert np.all(gap > -3 * se), (gap, se)           # a lower bound
    if num_draws == 1:
      assert np.all(np.abs(gap - want_gap) < 3 * se + 0.01), (gap, se)
