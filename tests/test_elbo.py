"""Tests for vdm.elbo: closed forms for Gaussian data, quadrature, invariants.

Gaussian data f ~ N(MU, S2 I) (D dims) makes the Bayes-optimal denoiser and
its error available in closed form. With `alpha^2 = sigmoid(-g)`, `sigma^2 =
sigmoid(g)` and `z = alpha f + sigma eps`:
  eps_hat(z, g) = E[eps | z] = sigma (z - alpha MU) / (alpha^2 S2 + sigma^2),
  mse(g) = E||eps - eps_hat||^2 / D = Var(eps | z) = S2 / (S2 + e^g)
(divide alpha^2 S2 / (alpha^2 S2 + sigma^2) by sigma^2, using
alpha^2 / sigma^2 = e^-g). Hence, for a schedule from g0 to g1:
  continuous: E[L] = 0.5 D int_{g0}^{g1} S2 / (S2 + e^g) dg
                   = 0.5 D [g - log(S2 + e^g)]_{g0}^{g1}
  (d/dg (g - log(S2 + e^g)) = 1 - e^g / (S2 + e^g) = S2 / (S2 + e^g));
  discrete, T steps on g_i = gamma(i / T):
              E[L_T] = 0.5 D sum_{i=1}^T expm1(g_i - g_{i-1}) mse(g_i)
  (t uniform on the grid: the factor T cancels the 1/T of the average);
  weighted:   E[L_w] = 0.5 D int_{lam_1}^{lam_0} w(lam) mse(-lam) dlam.
"""
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import elbo
from vdm import weighting

G0, G1 = -13.3, 5.0          # the paper's fixed linear schedule endpoints
MU, S2 = 0.3, 0.25           # Gaussian data: mean, variance per dimension
D = 8                        # dims per example in the Monte Carlo tests
N = 65536                    # Monte Carlo examples


def gamma_linear(t):
  return G0 + (G1 - G0) * t


def eps_optimal(z_t, gamma_t):
  """Bayes-optimal eps_hat for f ~ N(MU, S2 I); z_t [B, D], gamma_t [B]."""
  gamma = gamma_t[:, None]
  var_alpha = jax.nn.sigmoid(-gamma)
  var_sigma = jax.nn.sigmoid(gamma)
  return (jnp.sqrt(var_sigma) * (z_t - jnp.sqrt(var_alpha) * MU)
          / (var_alpha * S2 + var_sigma))


def mse_of_gamma(gamma):
  return S2 / (S2 + np.exp(gamma))


def continuous_closed_form(num_dims, g0=G0, g1=G1):
  antiderivative = lambda g: g - np.log(S2 + np.exp(g))
  return 0.5 * num_dims * (antiderivative(g1) - antiderivative(g0))


def discrete_closed_form(num_steps, num_dims):
  g = G0 + (G1 - G0) * np.arange(num_steps + 1) / num_steps
  return 0.5 * num_dims * np.sum(np.expm1(np.diff(g)) * mse_of_gamma(g[1:]))


def weighted_quadrature(w, lam_lo, lam_hi, num_dims):
  """0.5 D int w(lam) mse(-lam) dlam, Gauss-Legendre in float64."""
  x, wx = np.polynomial.legendre.leggauss(200)
  half = 0.5 * (lam_hi - lam_lo)
  lam = half * x + 0.5 * (lam_hi + lam_lo)
  return 0.5 * num_dims * half * np.sum(wx * w(lam) * mse_of_gamma(-lam))


# numpy float64 weightings, written independently of vdm.weighting.
NUMPY_WEIGHTINGS = {
    "sigmoid": lambda lam: 1.0 / (1.0 + np.exp(lam - 2.0)),
    "edm": lambda lam: (np.exp(-0.5 * ((lam - 2.4) / 2.4)**2)
                        / (2.4 * np.sqrt(2 * np.pi))
                        * (np.exp(-lam) + 0.25) / 0.25),
    "v_cosine": lambda lam: np.exp(-lam / 2),
    "eps_cosine": lambda lam: 1.0 / np.cosh(lam / 2),
}


@pytest.fixture(scope="module")
def gaussian_batch():
  """f ~ N(MU, S2 I) [N, D], eps [N, D], t ~ U(0, 1) i.i.d. [N]."""
  rng = np.random.default_rng(0)
  f = (MU + math.sqrt(S2) * rng.standard_normal((N, D))).astype(np.float32)
  eps = rng.standard_normal((N, D)).astype(np.float32)
  # i.i.d. times, so the sample standard error below is honest.
  t = elbo.sample_times(jax.random.key(0), N, antithetic=False)
  return f, eps, t


def assert_mc_close(losses, expected):
  losses = np.asarray(losses, np.float64)
  mean, se = losses.mean(), losses.std() / np.sqrt(losses.size)
  assert se < 0.01 * abs(expected), "the check would be too loose"
  # 4 standard errors: a false alarm has probability ~6e-5 (fixed key).
  assert abs(mean - expected) < 4 * se, (mean, expected, se)


# ---------------------------------------------------------------------------
# Diffusion loss: exact expectations and Monte Carlo vs closed forms.


def _hermite_batch(times):
  """Batch over (f, eps) Gauss-Hermite nodes x times; D = 1.

  ||eps - eps_hat||^2 is quadratic in (f, eps) at fixed t, so 3 nodes each
  give the Gaussian expectation exactly.
  """
  nodes, weights = np.polynomial.hermite_e.hermegauss(3)
  weights = weights / weights.sum()
  node_f, node_eps = np.meshgrid(nodes, nodes, indexing="ij")
  node_w = np.outer(weights, weights).ravel()                  # [9]
  n = len(times)
  f = np.repeat(MU + np.sqrt(S2) * node_f.ravel(), n)[:, None]  # [9 n, 1]
  eps = np.repeat(node_eps.ravel(), n)[:, None]
  t = np.tile(times, 9)
  return f, eps, t, node_w


def _exact_expectation(losses, node_w, time_weights):
  losses = np.asarray(losses, np.float64).reshape(9, -1)
  return float(node_w @ (losses @ time_weights))


def test_exact_expected_continuous_loss_matches_closed_form():
  x, wx = np.polynomial.legendre.leggauss(64)
  f, eps, t, node_w = _hermite_batch(0.5 * (x + 1))
  losses = elbo.diffusion_loss(eps_optimal, gamma_linear, f, t, eps)
  # rtol: float32 losses, quadrature error ~1e-8.
  np.testing.assert_allclose(_exact_expectation(losses, node_w, 0.5 * wx),
                             continuous_closed_form(1), rtol=1e-5)


def test_exact_discrete_loss_matches_closed_form_and_decreases_to_continuous():
  expected_cont = continuous_closed_form(1)
  previous = np.inf
  # 1024 midpoints hit each point of every T-grid (T | 1024) equally often,
  # so one batch (and one set of compiled shapes) serves every T.
  f, eps, t, node_w = _hermite_batch((np.arange(1024) + 0.5) / 1024)
  for num_steps in [1, 2, 4, 8, 32, 128, 1024]:
    losses = elbo.diffusion_loss(eps_optimal, gamma_linear, f, t, eps,
                                 num_steps=num_steps)
    value = _exact_expectation(losses, node_w, np.full(1024, 1 / 1024))
    # rtol: float32 losses; a wrong factor or grid is off by >1e-2.
    np.testing.assert_allclose(value, discrete_closed_form(num_steps, 1),
                               rtol=2e-5)
    assert expected_cont < value < previous   # more steps, lower loss
    previous = value
  # The gap closes like 1/T (0.049 nats at T = 1024).
  assert value - expected_cont < 0.06
  gap_512 = discrete_closed_form(512, 1) - expected_cont
  np.testing.assert_allclose((value - expected_cont) / gap_512, 0.5, atol=0.01)


@pytest.mark.parametrize("num_steps", [0, 1, 4, 16, 256])
def test_monte_carlo_diffusion_loss_matches_closed_form(gaussian_batch,
                                                       num_steps):
  f, eps, t = gaussian_batch
  losses = elbo.diffusion_loss(eps_optimal, gamma_linear, f, t, eps,
                               num_steps=num_steps)
  assert losses.shape == (N,) and losses.dtype == jnp.float32
  expected = (continuous_closed_form(D) if num_steps == 0 else
              discrete_closed_form(num_steps, D))
  assert_mc_close(losses, expected)


@pytest.mark.parametrize("name", ["sigmoid", "edm"])
def test_monte_carlo_weighted_loss_matches_quadrature(gaussian_batch, name):
  f, eps, t = gaussian_batch
  losses = elbo.diffusion_loss(eps_optimal, gamma_linear, f, t, eps,
                               weighting=weighting.get(name))
  assert_mc_close(losses, weighted_quadrature(NUMPY_WEIGHTINGS[name], -G1,
                                              -G0, D))


LAM_MIN, LAM_MAX = -10.0, 10.0
T_MIN = 2 / np.pi * np.arctan(np.exp(-LAM_MAX / 2))   # lam(T_MIN) = LAM_MAX
T_MAX = 2 / np.pi * np.arctan(np.exp(-LAM_MIN / 2))   # lam(T_MAX) = LAM_MIN


def gamma_cosine(t):
  """Truncated cosine schedule: lam = -2 log tan(pi t' / 2) in [-10, 10]."""
  t_prime = T_MIN + t * (T_MAX - T_MIN)
  return 2.0 * jnp.log(jnp.tan(jnp.pi * t_prime / 2))


@pytest.mark.parametrize("name", ["sigmoid", "edm", "v_cosine",
                                  "eps_cosine"])
def test_importance_sampled_cosine_schedule_matches_quadrature(
    gaussian_batch, name):
  # t ~ U(0, 1) through the cosine schedule draws lam with p(lam) ~ sech(lam
  # / 2); the estimator 0.5 w gamma' ||.||^2 = 0.5 w / p ||.||^2 must
  # integrate the weighted loss over lam directly.
  f, eps, t = gaussian_batch
  losses = elbo.diffusion_loss(eps_optimal, gamma_cosine, f, t, eps,
                               weighting=name)
  assert_mc_close(losses, weighted_quadrature(NUMPY_WEIGHTINGS[name],
                                              LAM_MIN, LAM_MAX, D))


def test_weighted_loss_is_elbo_loss_times_weight():
  rng = np.random.default_rng(1)
  f = rng.uniform(-1, 1, (5, 3))
  eps = rng.standard_normal((5, 3))
  t = jnp.linspace(0.05, 0.95, 5)
  eps_fn = lambda z_t, gamma_t: 0.5 * z_t
  plain = elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps)
  weighted = elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps,
                                 weighting="sigmoid")
  lam = -np.asarray(gamma_linear(t), np.float64)
  np.testing.assert_allclose(weighted / plain, 1 / (1 + np.exp(lam - 2)),
                             rtol=1e-5)
  for w in ["elbo", weighting.elbo, weighting.get("elbo")]:
    np.testing.assert_array_equal(
        elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps, weighting=w),
        plain)
  # w = 1 is the ELBO, so it is accepted in discrete time too.
  np.testing.assert_array_equal(
      elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps, num_steps=10,
                          weighting="elbo"),
      elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps, num_steps=10))


def test_jvp_derivative_matches_finite_differences():
  # Nonlinear, increasing: gamma'(t) = 15 + 6 cos(2t) + 3 t^2 >= 9.
  gamma_np = lambda t: -10.0 + 15.0 * t + 3.0 * np.sin(2.0 * t) + t**3
  gamma_fn = lambda t: -10.0 + 15.0 * t + 3.0 * jnp.sin(2.0 * t) + t**3
  t = np.linspace(0.0, 0.99, 12)
  eps = np.ones((12, 2))   # eps_hat = 0, so loss = 0.5 * gamma' * 2
  losses = elbo.diffusion_loss(lambda z, g: jnp.zeros_like(z), gamma_fn,
                               np.zeros((12, 2)), t, eps)
  h = 1e-3   # 4th-order central difference in float64: error ~h^4
  fd = (-gamma_np(t + 2 * h) + 8 * gamma_np(t + h) - 8 * gamma_np(t - h)
        + gamma_np(t - 2 * h)) / (12 * h)
  np.testing.assert_allclose(losses, fd, rtol=1e-6)


def test_discrete_time_grid_mapping():
  # t in [0, 1) -> (floor(t T) + 1) / T; record the gammas eps_fn sees.
  seen = []
  def eps_fn(z_t, gamma_t):
    seen.append(gamma_t)
    return jnp.zeros_like(z_t)
  t = jnp.array([0.0, 0.24, 0.25, 0.5, 0.999999])
  losses = elbo.diffusion_loss(eps_fn, lambda t: t, jnp.zeros((5, 1)), t,
                               jnp.ones((5, 1)), num_steps=4)
  np.testing.assert_allclose(seen[0], [0.25, 0.25, 0.5, 0.75, 1.0])
  # 0.5 * T * expm1(gamma_t - gamma_s) * ||eps||^2 with gamma_t - gamma_s = 1/4
  np.testing.assert_allclose(losses, np.full(5, 2 * np.expm1(0.25)),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Reconstruction, prior, encode / decode.


def test_encode_centres_of_bins():
  f = elbo.encode(jnp.array([0, 127, 128, 255]), 256)
  np.testing.assert_allclose(f, [-255 / 256, -1 / 256, 1 / 256, 255 / 256],
                             rtol=1e-6)


def test_reconstruction_loss_small_at_gamma_min():
  # At gamma_0 = -13.3 the rescaled noise std is exp(-6.65) = 1.29e-3 against
  # bins 2/256 = 7.8e-3 apart: an interior value's expected loss is 7.25e-3
  # nats per dim (0.0105 bits; numpy float64 Gauss-Hermite, computed below).
  vocab_size, gamma_0 = 256, -13.3
  rng = np.random.default_rng(2)
  x = rng.integers(1, 255, (8192, 4))   # interior values
  f = elbo.encode(x, vocab_size)
  z_0 = elbo.diffuse(f, jnp.full((8192,), gamma_0),
                     rng.standard_normal(x.shape))
  per_dim = elbo.reconstruction_loss(x, z_0, gamma_0, vocab_size) / 4
  nodes, weights = np.polynomial.hermite_e.hermegauss(200)
  step = 2 / vocab_size * np.exp(-gamma_0 / 2)  # bin spacing / std = 6.06
  logits = -0.5 * (nodes[:, None] + step * np.arange(-3, 4))**2
  expected = (weights / weights.sum()) @ (
      np.logaddexp.reduce(logits, axis=1) + 0.5 * nodes**2)
  assert 0.007 < expected < 0.0075
  per_dim = np.asarray(per_dim, np.float64)
  se = per_dim.std() / np.sqrt(per_dim.size)
  assert se < 0.001
  assert abs(per_dim.mean() - expected) < 4 * se
  assert per_dim.mean() < 0.01   # the bound: < 0.01 nats (0.0144 bits)/dim


def test_reconstruction_loss_matches_numpy_softmax():
  vocab_size = 7
  rng = np.random.default_rng(0)
  x = rng.integers(0, vocab_size, size=(3, 4, 2))
  z_0 = rng.normal(size=(3, 4, 2))
  gamma_0 = np.array([-3.0, 0.0, 2.5])
  got = elbo.reconstruction_loss(x, z_0, gamma_0, vocab_size)
  # float64 reference from the definition.
  f_values = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
  alpha_0 = np.sqrt(1 / (1 + np.exp(gamma_0)))[:, None, None]
  var_0 = np.exp(gamma_0)[:, None, None]
  logits = -0.5 * (z_0[..., None] / alpha_0[..., None] - f_values)**2
  logits = logits / var_0[..., None]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_p, x[..., None], -1).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # decode_logits agrees with the same logits (up to float32).
  np.testing.assert_allclose(
      elbo.decode_logits(z_0, gamma_0, vocab_size), logits, rtol=1e-5,
      atol=1e-5)


def _recon_float64(x, z_0, gamma_0, vocab_size):
  """-sum log_softmax(logits)[x] in float64 numpy, with d/dz_0, d/dgamma_0.

  Derivatives from the definition: with u = z_0 / alpha_0, s = e^-gamma_0,
  d log p / du = s (f_x - E_p f), d log p / ds = 0.5 (E_p (u - f)^2 -
  (u - f_x)^2), du / dgamma_0 = 0.5 u sigmoid(gamma_0), ds / dgamma_0 = -s.
  """
  x, z_0, g = (np.asarray(a, np.float64) for a in (x, z_0, gamma_0))
  g = g.reshape(g.shape + (1,) * (z_0.ndim - 1))
  f_v = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
  f_x = 2 * (x + 0.5) / vocab_size - 1
  inv_alpha, s = np.sqrt(1 + np.exp(g)), np.exp(-g)
  u = z_0 * inv_alpha
  logits = -0.5 * s[..., None] * (u[..., None] - f_v)**2
  logits -= logits.max(-1, keepdims=True)
  log_norm = np.log(np.exp(logits).sum(-1, keepdims=True))
  p = np.exp(logits - log_norm)
  log_p = np.take_along_axis(logits - log_norm, x[..., None].astype(int),
                             -1)[..., 0]
  d_du = s * (f_x - p @ f_v)
  d_ds = 0.5 * ((p * (u[..., None] - f_v)**2).sum(-1) - (u - f_x)**2)
  sigmoid_g = 1 / (1 + np.exp(-g))
  d_dg = d_du * 0.5 * u * sigmoid_g - d_ds * s
  axes = tuple(range(1, z_0.ndim))
  return (-log_p.sum(axes), -d_du * inv_alpha, -d_dg.sum(axes))


@pytest.mark.parametrize("gamma_0", [
    [-13.3, -13.3, -12.0],      # the paper's gamma_0: 17-level window
    [-9.7, -9.7, -9.7],         # just inside the window's bound (-9.63)
    [-13.3, -6.0, -13.3],       # one example far outside it: all levels
    [-5.0, 0.0, 3.0]])          # large noise, all levels
def test_reconstruction_loss_and_gradients_match_float64_softmax(gamma_0):
  # Window and full sums agree with the definition in float64, values and
  # both gradients (the custom JVP), including values at the range's edges.
  rng = np.random.default_rng(11)
  x = rng.integers(0, 256, (3, 6, 5))
  x[:, 0, :] = 0
  x[:, 1, :] = 255
  gamma_0 = np.asarray(gamma_0, np.float32)
  f = elbo.encode(x, 256)
  z_0 = np.array(elbo.diffuse(f, gamma_0, rng.standard_normal(x.shape)))
  z_0[:, 2, 0] = [1.3, -1.2, 1.01]          # u far outside [-1, 1]
  loss_fn = lambda z, g: elbo.reconstruction_loss(x, z, g, 256).sum()
  value, (d_z, d_g) = jax.jit(jax.value_and_grad(loss_fn, (0, 1)))(
      z_0, gamma_0)
  want, want_dz, want_dg = _recon_float64(x, z_0, gamma_0, 256)
  np.testing.assert_allclose(value, want.sum(), rtol=2e-6)
  np.testing.assert_allclose(d_z, want_dz, rtol=2e-4,
                             atol=2e-5 * np.abs(want_dz).max())
  np.testing.assert_allclose(d_g, want_dg, rtol=2e-4,
                             atol=2e-5 * np.abs(want_dg).max())
  # Forward mode gives the same directional derivative.
  direction = rng.standard_normal(z_0.shape).astype(np.float32)
  _, tangent = jax.jvp(lambda z: loss_fn(z, gamma_0), (z_0,), (direction,))
  np.testing.assert_allclose(tangent, (want_dz * direction).sum(), rtol=2e-4)


def test_decode_logits_argmax_recovers_x_at_low_noise():
  # gamma_0 = -20: noise std e^-10 = 4.5e-5 vs half a bin 3.9e-3.
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (4, 6, 6, 3))
  f = elbo.encode(x, 256)
  z_0 = elbo.diffuse(f, jnp.full((4,), -20.0),
                     rng.standard_normal(x.shape))
  logits = elbo.decode_logits(z_0, -20.0, 256)
  assert logits.shape == x.shape + (256,)
  np.testing.assert_array_equal(jnp.argmax(logits, axis=-1), x)


def test_prior_loss_below_0005_nats_per_dim_at_gamma_1_5():
  # Worst case f = +-1: KL per dim = 0.5 (sigmoid(-5) + ...) = 3.36e-3.
  f = jnp.array([[1.0, -1.0, 0.0, 0.5]])
  per_dim = elbo.prior_loss(jnp.ones((1, 4)), 5.0) / 4
  assert 0.003 < float(per_dim[0]) < 0.005
  assert float(elbo.prior_loss(f, 5.0)[0]) / 4 < 0.005


@pytest.mark.parametrize("gamma_1", [-30.0, -2.0, 0.0, 5.0, 13.0, 30.0])
def test_prior_loss_matches_gaussian_kl(gamma_1):
  f = np.array([[0.3, -0.9, 0.0], [1.0, 0.5, -0.2]])
  var_1 = 1.0 / (1.0 + np.exp(-gamma_1))            # float64 sigma_1^2
  mean_sq = (1.0 - var_1) * f**2                    # alpha_1^2 f^2
  kl = 0.5 * (mean_sq + var_1 - np.log(var_1) - 1).sum(axis=1)
  # atol: at gamma_1 = 30 the KL is ~1e-13, float32 keeps ~7 digits.
  np.testing.assert_allclose(elbo.prior_loss(f, gamma_1), kl, rtol=1e-5,
                             atol=1e-7)
  # Per-example gamma_1 [B] gives the same.
  np.testing.assert_allclose(elbo.prior_loss(f, np.full(2, gamma_1)), kl,
                             rtol=1e-5, atol=1e-7)


def test_nats_to_bpd():
  np.testing.assert_allclose(elbo.nats_to_bpd(jnp.array([3072.0]), 3072),
                             [1 / np.log(2)], rtol=1e-6)


def test_diffuse_is_variance_preserving():
  f = jnp.array([[2.0], [2.0]])
  gamma = jnp.array([-1.0, 3.0])
  z_f = elbo.diffuse(f, gamma, jnp.zeros_like(f))    # alpha_t f
  z_eps = elbo.diffuse(jnp.zeros_like(f), gamma, jnp.ones_like(f))  # sigma_t
  np.testing.assert_allclose(z_f[:, 0]**2 / 4 + z_eps[:, 0]**2, [1, 1],
                             rtol=1e-6)
  np.testing.assert_allclose(z_eps[:, 0]**2, 1 / (1 + np.exp(-gamma)),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Time sampling.


def test_sample_times_antithetic_spacing():
  t = np.asarray(elbo.sample_times(jax.random.key(5), 64), np.float64)
  assert t.shape == (64,) and np.all(t >= 0) and np.all(t < 1)
  # Consecutive times are 1/B apart modulo 1 (float32 rounding: 1e-6).
  np.testing.assert_allclose(np.mod(np.diff(t), 1.0), 1 / 64, atol=1e-6)
  # One time per stratum [i/B, (i+1)/B).
  np.testing.assert_array_equal(
      np.bincount(np.floor(t * 64).astype(int), minlength=64), np.ones(64))


def _ks_statistic(samples):
  samples = np.sort(samples)
  n = samples.size
  return max(np.max(np.arange(1, n + 1) / n - samples),
             np.max(samples - np.arange(n) / n))


def test_sample_times_are_uniform():
  iid = np.asarray(elbo.sample_times(jax.random.key(6), 8192,
                                     antithetic=False))
  assert np.all(iid >= 0) and np.all(iid < 1)
  # Kolmogorov-Smirnov at the 0.1% level: 1.95 / sqrt(n).
  assert _ks_statistic(iid) < 1.95 / np.sqrt(iid.size)
  # Antithetic times: each one is marginally uniform (across keys).
  keys = jax.random.split(jax.random.key(7), 4096)
  first = jax.vmap(lambda k: elbo.sample_times(k, 8))(keys)
  assert first.shape == (4096, 8)
  assert _ks_statistic(np.asarray(first[:, 3])) < 1.95 / np.sqrt(4096)


# ---------------------------------------------------------------------------
# jit and vmap.


def test_jit_and_vmap_match_a_loop():
  num, batch = 3, 4
  rng = np.random.default_rng(8)
  f = rng.uniform(-1, 1, (num, batch, 5)).astype(np.float32)
  eps = rng.standard_normal((num, batch, 5)).astype(np.float32)
  t = rng.uniform(0, 1, (num, batch)).astype(np.float32)
  x = rng.integers(0, 16, (num, batch, 5))
  eps_fn = lambda z_t, gamma_t: jnp.tanh(z_t) * gamma_t[:, None] / 10

  def all_losses(f, eps, t, x):
    z_0 = elbo.diffuse(f, gamma_linear(jnp.zeros_like(t)), eps)
    return jnp.stack([
        elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps),
        elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps, num_steps=10),
        elbo.diffusion_loss(eps_fn, gamma_linear, f, t, eps,
                            weighting="edm"),
        elbo.reconstruction_loss(x, z_0, G0, 16),
        elbo.prior_loss(f, G1),
    ])

  one = jax.jit(all_losses)   # compiled once, called per slice
  looped = np.stack([one(f[i], eps[i], t[i], x[i]) for i in range(num)])
  np.testing.assert_allclose(jax.jit(jax.vmap(all_losses))(f, eps, t, x),
                             looped, rtol=1e-5)
  keys = jax.random.split(jax.random.key(9), num)
  np.testing.assert_array_equal(
      jax.jit(jax.vmap(lambda k: elbo.sample_times(k, 4)))(keys),
      np.stack([elbo.sample_times(k, 4) for k in keys]))


# ---------------------------------------------------------------------------
# Float32 safety for gamma in [-30, 30], values and gradients.


def test_float32_safe_for_extreme_gamma_including_gradients():
  gamma = jnp.linspace(-30.0, 30.0, 13)
  num = gamma.shape[0]
  f = jnp.linspace(-0.99, 0.99, num * 4).reshape(num, 4)
  eps = jnp.cos(jnp.arange(num * 4.0)).reshape(num, 4)
  x = jnp.arange(num * 4).reshape(num, 4) % 256
  eps_fn = lambda z_t, gamma_t: 0.5 * z_t + 0.01 * gamma_t[:, None]

  def total(gamma, f):
    terms = [
        elbo.diffuse(f, gamma, eps).sum(),
        elbo.prior_loss(f, gamma).sum(),
        elbo.reconstruction_loss(x, elbo.diffuse(f, gamma, eps), gamma,
                                 256).sum(),
        jax.nn.log_softmax(elbo.decode_logits(f, gamma, 256)).sum(),
        elbo.continuous_diffusion_loss(eps_fn, f, gamma, jnp.ones(num),
                                       eps).sum(),
        elbo.discrete_diffusion_loss(eps_fn, f, gamma, gamma - 1.0, eps,
                                     num_steps=1000).sum(),
    ]
    for name in ["sigmoid", "edm", "edm_monotonic", "v_cosine",
                 "eps_cosine"]:
      terms.append(elbo.continuous_diffusion_loss(
          eps_fn, f, gamma, jnp.ones(num), eps, weighting=name).sum())
    return jnp.stack(terms)

  values = jax.jit(total)(gamma, f)
  assert np.all(np.isfinite(values)), values
  jac_gamma, jac_f = jax.jit(jax.jacrev(total, argnums=(0, 1)))(gamma, f)
  assert np.all(np.isfinite(jac_gamma)) and np.all(np.isfinite(jac_f))
  # A schedule spanning [-30, 30] in one step (T = 1) stays finite too.
  gamma_wide = lambda t: -30.0 + 60.0 * t
  def loss(f):
    return elbo.diffusion_loss(eps_fn, gamma_wide, f, jnp.full(num, 0.5),
                               eps, num_steps=1).sum()
  value, grad = jax.jit(jax.value_and_grad(loss))(f)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------
# Errors.


_F = jnp.zeros((4, 3))
_EPS = jnp.zeros((4, 3))
_T = jnp.full((4,), 0.5)
_ZEROS = lambda z_t, gamma_t: jnp.zeros_like(z_t)

ERROR_CASES = [
    ("vocab_size_1", lambda: elbo.encode(jnp.zeros(2, int), 1),
     r"vocab_size must be >= 2; got 1"),
    ("vocab_size_recon", lambda: elbo.reconstruction_loss(
        jnp.zeros((4, 3), int), _F, 0.0, 0), r"vocab_size .* got 0"),
    ("num_steps_negative", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, num_steps=-1),
     r"num_steps must be >= 0; got -1"),
    ("discrete_num_steps_0", lambda: elbo.discrete_diffusion_loss(
        _ZEROS, _F, _T, _T, _EPS, num_steps=0), r"num_steps >= 1; got 0"),
    ("eps_fn_shape", lambda: elbo.diffusion_loss(
        lambda z_t, gamma_t: z_t[:, :2], gamma_linear, _F, _T, _EPS),
     r"eps_hat with the shape of z_t \(4, 3\); got \(4, 2\)"),
    ("eps_fn_shape_discrete", lambda: elbo.diffusion_loss(
        lambda z_t, gamma_t: z_t.sum(), gamma_linear, _F, _T, _EPS,
        num_steps=5), r"shape of z_t \(4, 3\); got \(\)"),
    ("t_batch", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, jnp.full((5,), 0.5), _EPS),
     r"t must have shape \[B\] = \(4,\) .* got shape \(5,\)"),
    ("t_rank", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, jnp.full((4, 1), 0.5), _EPS),
     r"t must have shape .* got shape \(4, 1\)"),
    ("eps_shape", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, jnp.zeros((4, 2))),
     r"eps has shape \(4, 2\) but f has shape \(4, 3\)"),
    ("eps_shape_diffuse", lambda: elbo.diffuse(_F, _T, jnp.zeros((3, 3))),
     r"eps has shape \(3, 3\) but f has shape \(4, 3\)"),
    ("gamma_batch_diffuse", lambda: elbo.diffuse(_F, jnp.zeros(3), _EPS),
     r"gamma_t must have shape \[B\] = \(4,\) .* got shape \(3,\)"),
    ("gamma_fn_shape", lambda: elbo.diffusion_loss(
        _ZEROS, lambda t: t.sum(), _F, _T, _EPS),
     r"gamma_fn\(t\) must return one gamma per time, shape \(4,\)"),
    ("weighting_not_callable", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, weighting=3.0),
     r"weighting must be None, a registered name or a callable .* got 3\.0"),
    ("weighting_unknown", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, weighting="nope"),
     r"unknown weighting 'nope'; known: edm, edm_monotonic, elbo, "
     r"eps_cosine, sigmoid, v_cosine"),
    ("weighting_with_num_steps", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, num_steps=10,
        weighting="sigmoid"),
     r"weighting='sigmoid' cannot be combined with num_steps=10: .*"
     r"continuous-time loss only"),
    ("recon_shapes", lambda: elbo.reconstruction_loss(
        jnp.zeros((4, 2), int), _F, 0.0, 256),
     r"x has shape \(4, 2\) but z_0 has shape \(4, 3\)"),
    ("prior_gamma_batch", lambda: elbo.prior_loss(_F, jnp.zeros(2)),
     r"gamma_1 must have shape \[B\] = \(4,\)"),
    ("dgamma_batch", lambda: elbo.continuous_diffusion_loss(
        _ZEROS, _F, _T, jnp.ones(2), _EPS),
     r"dgamma_dt must have shape \[B\] = \(4,\)"),
    ("sample_times_batch", lambda: elbo.sample_times(jax.random.key(0), 0),
     r"batch_size must be >= 1; got 0"),
    ("bpd_num_dims", lambda: elbo.nats_to_bpd(1.0, 0),
     r"num_dims must be >= 1; got 0"),
]


# A wrong type (a float or bool where an int is needed) is a TypeError.
TYPE_ERROR_CASES = [
    ("vocab_size_float", lambda: elbo.decode_logits(_F, 0.0, 2.5),
     r"vocab_size must be an int; got 2\.5"),
    ("num_steps_float", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, num_steps=10.0),
     r"num_steps must be an int; got 10\.0"),
    ("num_steps_bool", lambda: elbo.diffusion_loss(
        _ZEROS, gamma_linear, _F, _T, _EPS, num_steps=True),
     r"num_steps must be an int; got True"),
    ("batch_size_float", lambda: elbo.sample_times(jax.random.key(0), 4.0),
     r"batch_size must be an int; got 4\.0"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("call, match", [c[1:] for c in TYPE_ERROR_CASES],
                         ids=[c[0] for c in TYPE_ERROR_CASES])
def test_type_errors(call, match):
  with pytest.raises(TypeError, match=match):
    call()


def test_errors_raise_under_jit():
  # Checks run on static shapes at trace time, inside jit too.
  loss = jax.jit(lambda f, t: elbo.diffusion_loss(_ZEROS, gamma_linear, f, t,
                                                  f))
  with pytest.raises(ValueError, match=r"t must have shape"):
    loss(_F, jnp.zeros(3))


def test_math_modules_import_no_training_or_io():
  code = ("import sys, vdm.elbo, vdm.process, vdm.weighting; print([m for m "
          "in ('flax', 'optax', 'orbax', 'tensorflow', 'tensorflow_datasets') "
          "if m in sys.modules])")
  out = subprocess.check_output([sys.executable, "-c", code], text=True)
  assert out.strip() == "[]"
