"""Tests for vdm.process: alpha/sigma, diffuse, the eps/x/v conversions and
the shared argument checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import process


# ------------------------------------------------------------ alpha, sigma
def test_alpha_sigma_matches_float64_closed_form():
  gamma = np.linspace(-30.0, 30.0, 61)
  alpha, sigma = process.alpha_sigma(gamma)
  assert alpha.dtype == sigma.dtype == jnp.float32
  # rtol: a few float32 ulps of exp and log1p.
  np.testing.assert_allclose(alpha, np.sqrt(1 / (1 + np.exp(gamma))),
                             rtol=1e-6)
  np.testing.assert_allclose(sigma, np.sqrt(1 / (1 + np.exp(-gamma))),
                             rtol=1e-6)


def test_alpha_sigma_stable_in_tails():
  alpha, sigma = process.alpha_sigma(jnp.array([-80.0, 0.0, 80.0]))
  np.testing.assert_allclose(alpha, [1.0, np.sqrt(0.5), np.exp(-40.0)],
                             rtol=1e-6)
  np.testing.assert_allclose(sigma, [np.exp(-40.0), np.sqrt(0.5), 1.0],
                             rtol=1e-6)


def test_log_alpha_sigma_is_the_log_of_alpha_sigma():
  gamma = jnp.linspace(-20.0, 20.0, 41)
  log_alpha, log_sigma = process.log_alpha_sigma(gamma)
  alpha, sigma = process.alpha_sigma(gamma)
  np.testing.assert_array_equal(jnp.exp(log_alpha), alpha)
  np.testing.assert_array_equal(jnp.exp(log_sigma), sigma)


def test_diffuse_per_example_gamma_and_scalar_gamma():
  f = jnp.full((2, 3), 0.5)
  eps = jnp.ones((2, 3))
  gamma = jnp.array([-2.0, 4.0])
  z = process.diffuse(f, gamma, eps)
  alpha, sigma = (np.sqrt(1 / (1 + np.exp(g))) for g in (gamma, -gamma))
  np.testing.assert_allclose(z, (0.5 * alpha + sigma)[:, None] * np.ones(3),
                             rtol=1e-6)
  np.testing.assert_array_equal(process.diffuse(f, 4.0, eps)[1], z[1])


def test_per_example_broadcast():
  assert process.per_example(jnp.zeros(()), 4).shape == ()
  assert process.per_example(jnp.zeros(3), 4).shape == (3, 1, 1, 1)
  assert process.per_example(jnp.zeros((3, 2)), 3).shape == (3, 2, 1)
  with pytest.raises(ValueError, match=r"shape \(3, 2\) has more axes"):
    process.per_example(jnp.zeros((3, 2)), 1)


# --------------------------------------------------------- parameterisation
GAMMAS = np.linspace(-10.0, 10.0, 11)


def _data(seed=0):
  """float64 x, eps, z_t, v per gamma in GAMMAS: [11, 5]."""
  rs = np.random.RandomState(seed)
  x = rs.uniform(-1, 1, (11, 5))
  eps = rs.normal(size=(11, 5))
  alpha = np.sqrt(1 / (1 + np.exp(GAMMAS)))[:, None]
  sigma = np.sqrt(1 / (1 + np.exp(-GAMMAS)))[:, None]
  return x, eps, alpha * x + sigma * eps, alpha * eps - sigma * x


def _tol(amplification):
  # float32 inputs (rel. 6e-8) amplified by alpha/sigma or sigma/alpha.
  return np.broadcast_to(4e-7 * (1 + amplification)[:, None], (11, 5))


def test_to_eps_and_to_x_match_float64_closed_forms():
  x, eps, z, v = _data()
  ratio = np.exp(np.abs(GAMMAS) / 2)            # worst of alpha/sigma, inverse
  for name, pred in [("eps", eps), ("x", x), ("v", v)]:
    eps_hat = process.to_eps(pred.astype(np.float32), z.astype(np.float32),
                             GAMMAS, parameterization=name)
    assert eps_hat.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(eps_hat - eps), 4 * _tol(ratio))
    x_hat = process.to_x(pred.astype(np.float32), z.astype(np.float32),
                         GAMMAS, parameterization=name)
    np.testing.assert_array_less(np.abs(x_hat - x), 4 * _tol(ratio))
    target = process.from_eps(eps.astype(np.float32), z.astype(np.float32),
                              GAMMAS, parameterization=name)
    np.testing.assert_array_less(np.abs(target - pred), 4 * _tol(ratio))


@pytest.mark.parametrize("forward,backward", [
    (process.eps_to_x, process.x_to_eps), (process.x_to_eps, process.eps_to_x),
    (process.eps_to_v, process.v_to_eps), (process.v_to_eps, process.eps_to_v),
    (process.x_to_v, process.v_to_x), (process.v_to_x, process.x_to_v),
])
def test_round_trips(forward, backward):
  x, eps, z, v = _data(1)
  start = {"eps_to_x": eps, "x_to_eps": x, "eps_to_v": eps, "v_to_eps": v,
           "x_to_v": x, "v_to_x": v}[forward.__name__]
  z32, start32 = z.astype(np.float32), start.astype(np.float32)
  back = backward(forward(start32, z32, GAMMAS), z32, GAMMAS)
  ratio = np.exp(np.abs(GAMMAS) / 2)
  np.testing.assert_array_less(np.abs(back - start32), 8 * _tol(ratio))


def test_diffuse_then_eps_to_x_recovers_x():
  x, eps, _, _ = _data(2)
  z = process.diffuse(x.astype(np.float32), GAMMAS, eps.astype(np.float32))
  x_hat = process.eps_to_x(eps.astype(np.float32), z, GAMMAS)
  ratio = np.exp(np.abs(GAMMAS) / 2)
  np.testing.assert_array_less(np.abs(x_hat - x), 4 * _tol(ratio))


def test_unknown_parameterization():
  with pytest.raises(ValueError, match=r"unknown parameterization 'score'; "
                     r"known: eps, x, v"):
    process.to_eps(jnp.zeros(2), jnp.zeros(2), 0.0, parameterization="score")
  with pytest.raises(ValueError, match=r"prediction has shape \(3,\)"):
    process.to_eps(jnp.zeros(3), jnp.zeros(2), 0.0, parameterization="v")


# ------------------------------------------------------------------ checks
def test_check_per_example_and_same_shape():
  f = jnp.zeros((4, 3))
  process.check_per_example("gamma_t", jnp.zeros(()), f)
  process.check_per_example("gamma_t", jnp.zeros(4), f)
  with pytest.raises(ValueError, match=r"gamma_t must have shape \[B\] = "
                     r"\(4,\) to match z_0 of shape \(4, 3\); got shape \(2,\)"):
    process.check_per_example("gamma_t", jnp.zeros(2), f, f_name="z_0")
  with pytest.raises(ValueError, match=r"f must have a leading batch axis"):
    process.check_per_example("gamma_t", jnp.zeros(()), jnp.zeros(()))
  with pytest.raises(ValueError, match=r"eps has shape \(4, 2\) but f has "
                     r"shape \(4, 3\)"):
    process.check_same_shape("eps", jnp.zeros((4, 2)), "f", f)


def test_check_ranges_and_is_concrete():
  process.check_logsnr_range(-1.0, 1.0)
  with pytest.raises(ValueError, match=r"lam_min=2\.0 must be < lam_max=1\.0"):
    process.check_logsnr_range(2.0, 1.0)
  process.check_gamma_range(-13.3, 5.0)
  with pytest.raises(ValueError, match=r"gamma_min=5\.0 must be < gamma_max="
                     r"1\.0 .*swap them"):
    process.check_gamma_range(5.0, 1.0)
  assert process.is_concrete(1.0, jnp.ones(2))
  seen = []
  jax.jit(lambda x: seen.append(process.is_concrete(x)) or x)(1.0)
  assert seen == [False]
