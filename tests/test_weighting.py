"""Tests for vdm.weighting: the table, monotonicity, lam_star, conversions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import weighting

LAM = np.array([-12.0, -5.0, -1.0, 0.0, 0.5, 3.0, 10.0])


def np_normal_pdf(x, mean, std):
  return np.exp(-0.5 * ((x - mean) / std)**2) / (std * np.sqrt(2 * np.pi))


def np_edm(lam, mean=2.4, std=2.4, sigma_data=0.5):
  return (np_normal_pdf(lam, mean, std) * (np.exp(-lam) + sigma_data**2)
          / sigma_data**2)


# name, kwargs, numpy float64 reference (DESIGN.md's table).
TABLE = [
    ("elbo", {}, lambda lam: np.ones_like(lam)),
    ("sigmoid", {}, lambda lam: 1 / (1 + np.exp(-(2.0 - lam)))),
    ("sigmoid", {"bias": -1.0}, lambda lam: 1 / (1 + np.exp(-(-1.0 - lam)))),
    ("edm", {}, np_edm),
    ("edm", {"mean": 0.0, "std": 1.5, "sigma_data": 1.0},
     lambda lam: np_edm(lam, 0.0, 1.5, 1.0)),
    ("v_cosine", {}, lambda lam: np.exp(-lam / 2)),
    ("eps_cosine", {}, lambda lam: 1 / np.cosh(lam / 2)),
]


@pytest.mark.parametrize("name, kwargs, reference", TABLE,
                         ids=[f"{n}-{k}" for n, k, _ in TABLE])
def test_table_values_match_numpy(name, kwargs, reference):
  w = weighting.get(name, **kwargs)
  got = w(jnp.asarray(LAM, jnp.float32))
  assert got.shape == LAM.shape and got.dtype == jnp.float32
  # rtol: float32; edm sums log-space terms of size ~20 before exp, each
  # off by ~20 * 6e-8 = 1.2e-6, so its relative error reaches a few 1e-6.
  np.testing.assert_allclose(got, reference(LAM), rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(jax.jit(w)(LAM[2]), reference(LAM[2]),
                             rtol=2e-6)


def test_elbo_weighting_is_float_for_int_input():
  out = weighting.elbo(jnp.arange(3))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, [1, 1, 1])


def test_registry_and_monotonic_table_agree():
  assert set(weighting.MONOTONIC) == {
      "elbo", "sigmoid", "edm", "edm_monotonic", "v_cosine", "eps_cosine"}
  for name in weighting.MONOTONIC:
    assert callable(weighting.get(name))


@pytest.mark.parametrize("name", sorted(weighting.MONOTONIC))
def test_is_monotonic_reproduces_design_table(name):
  assert weighting.is_monotonic(weighting.get(name)) is weighting.MONOTONIC[
      name]


def test_is_monotonic_detects_small_bumps():
  assert weighting.is_monotonic(lambda lam: -lam)
  assert not weighting.is_monotonic(lambda lam: lam)
  # Wiggles of relative size 1e-3 (rising where cos(lam) < 0) are caught;
  # on [-1, 1] the same function decreases.
  wiggle = lambda lam: 1.0 - 1e-3 * jnp.sin(lam)
  assert not weighting.is_monotonic(wiggle)
  assert weighting.is_monotonic(wiggle, lo=-1.0, hi=1.0)
  # Non-finite values are not monotonic.
  assert not weighting.is_monotonic(lambda lam: jnp.exp(-5.0 * lam))


def _np_log_edm(lam, mean, std, sigma_data):
  return (-0.5 * ((lam - mean) / std)**2
          + np.log(np.exp(-lam) + sigma_data**2))


@pytest.mark.parametrize("params", [
    {},
    {"mean": 0.0, "std": 1.0, "sigma_data": 1.0},
    {"mean": 1.0, "std": 3.0, "sigma_data": 0.2},
])
def test_edm_argmax_is_the_argmax(params):
  full = {"mean": 2.4, "std": 2.4, "sigma_data": 0.5, **params}
  lam_star = weighting.edm_argmax(**params)
  # A dense float64 grid over a wide range finds no larger value ...
  grid = np.linspace(-40, 40, 800001)   # spacing 1e-4
  log_w = _np_log_edm(grid, **full)
  assert abs(grid[np.argmax(log_w)] - lam_star) < 2e-4
  assert _np_log_edm(lam_star, **full) >= log_w.max() - 1e-12
  # ... and the derivative vanishes there (the stationarity condition
  # (mean - lam) / std^2 = sigmoid(-lam - 2 log sigma_data)).
  residual = ((full["mean"] - lam_star) / full["std"]**2
              - 1 / (1 + np.exp(lam_star + 2 * np.log(full["sigma_data"]))))
  assert abs(residual) < 1e-10


def test_edm_argmax_default_value():
  # For the defaults lam_star = -3.3078 (float64 bisection; see above).
  np.testing.assert_allclose(weighting.edm_argmax(), -3.3077775, atol=1e-6)


def test_edm_monotonic_is_edm_clamped_at_lam_star():
  lam_star = weighting.edm_argmax()
  edm, edm_mono = weighting.get("edm"), weighting.get("edm_monotonic")
  below = jnp.linspace(-20.0, lam_star, 50)
  above = jnp.linspace(lam_star, 20.0, 50)
  peak = float(edm(jnp.float32(lam_star)))
  # Constant edm(lam_star) for lam <= lam_star ...
  np.testing.assert_allclose(edm_mono(below), np.full(50, peak), rtol=1e-6)
  # ... equal to edm for lam >= lam_star ...
  np.testing.assert_allclose(edm_mono(above), edm(above), rtol=1e-6)
  # rtol: as in the table test, float32 log-space terms of size ~20.
  np.testing.assert_allclose(edm_mono(above), np_edm(np.asarray(above)),
                             rtol=1e-5)
  # ... and never below edm.
  lam = jnp.linspace(-20.0, 20.0, 401)
  assert np.all(np.asarray(edm_mono(lam)) >= np.asarray(edm(lam)) * (1 - 1e-6))


def test_weightings_finite_with_finite_gradients_in_float32():
  lam = jnp.linspace(-30.0, 30.0, 121)
  for name in weighting.MONOTONIC:
    w = weighting.get(name)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(w)))(lam)
    assert np.all(np.isfinite(values)) and np.all(values > 0), name
    assert np.all(np.isfinite(grads)), name


def test_error_conversions_match_explicit_predictions():
  # With x_hat = (z - sigma eps_hat) / alpha and v = alpha eps - sigma x.
  rng = np.random.default_rng(0)
  lam = rng.uniform(-8, 8, 64)
  x, eps, eps_hat = rng.normal(size=(3, 64))
  alpha = np.sqrt(1 / (1 + np.exp(-lam)))
  sigma = np.sqrt(1 / (1 + np.exp(lam)))
  z = alpha * x + sigma * eps
  x_hat = (z - sigma * eps_hat) / alpha
  v, v_hat = alpha * eps - sigma * x, alpha * eps_hat - sigma * x_hat
  eps_mse = (eps - eps_hat)**2
  x_mse, v_mse = (x - x_hat)**2, (v - v_hat)**2
  np.testing.assert_allclose(weighting.x_mse_from_eps_mse(eps_mse, lam),
                             x_mse, rtol=1e-4)
  np.testing.assert_allclose(weighting.v_mse_from_eps_mse(eps_mse, lam),
                             v_mse, rtol=1e-4)
  np.testing.assert_allclose(weighting.eps_mse_from_x_mse(x_mse, lam),
                             eps_mse, rtol=1e-4)
  np.testing.assert_allclose(weighting.eps_mse_from_v_mse(v_mse, lam),
                             eps_mse, rtol=1e-4)


def test_error_conversions_round_trip_and_stay_finite():
  lam = jnp.linspace(-30.0, 30.0, 61)
  mse = jnp.linspace(0.0, 2.0, 61)
  np.testing.assert_allclose(
      weighting.eps_mse_from_x_mse(weighting.x_mse_from_eps_mse(mse, lam),
                                   lam), mse, rtol=1e-5)
  np.testing.assert_allclose(
      weighting.eps_mse_from_v_mse(weighting.v_mse_from_eps_mse(mse, lam),
                                   lam), mse, rtol=1e-5)
  for fn in [weighting.x_mse_from_eps_mse, weighting.eps_mse_from_x_mse,
             weighting.v_mse_from_eps_mse, weighting.eps_mse_from_v_mse]:
    grads = jax.vmap(jax.grad(fn, argnums=(0, 1)))(mse, lam)
    assert all(np.all(np.isfinite(g)) for g in grads), fn.__name__


ERROR_CASES = [
    ("unknown_name", lambda: weighting.get("karras"),
     r"unknown weighting 'karras'; known: edm, edm_monotonic, elbo, "
     r"eps_cosine, sigmoid, v_cosine\. Set config\.model\.weighting"),
    ("unknown_option", lambda: weighting.get("sigmoid", mean=1.0),
     r"weighting 'sigmoid' got unknown option\(s\) \['mean'\]; it accepts "
     r"\['bias'\]"),
    ("option_for_elbo", lambda: weighting.get("elbo", bias=1.0),
     r"weighting 'elbo' got unknown option\(s\) \['bias'\]; it accepts none"),
    ("bad_std", lambda: weighting.get("edm", std=0.0),
     r"weighting 'edm' needs std > 0; got 0\.0"),
    ("bad_sigma_data", lambda: weighting.get("edm_monotonic",
                                             sigma_data=-1.0),
     r"needs sigma_data > 0; got -1\.0"),
    ("is_monotonic_interval", lambda: weighting.is_monotonic(
        weighting.elbo, lo=1.0, hi=1.0), r"lo < hi; got lo=1\.0, hi=1\.0"),
    ("is_monotonic_not_elementwise", lambda: weighting.is_monotonic(
        lambda lam: lam.sum()), r"w must be elementwise"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
