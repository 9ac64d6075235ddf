"""Tests for vdm.schedules (fixed, learned, variance-minimising, adaptive)."""
import functools
import math
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import adaptive
from vdm import learned_schedules
from vdm import schedules

T_GRID = np.linspace(0.0, 1.0, 2001, dtype=np.float32)

# (name, options) of every parameter-free schedule variant under test; the
# edm "tail" case keeps only the upper tail of N(mean, std) (z in [2, 8]), the
# cosine "narrow" case a shifted window off-centre.
CASES = {
    "linear": ("fixed_linear", {}),
    "linear_negative": ("fixed_linear", dict(gamma_min=-5.0, gamma_max=-1.0)),
    "cosine": ("cosine", {}),
    "cosine_512": ("cosine", dict(shift=schedules.cosine_shift(512))),
    "cosine_narrow": ("cosine", dict(lam_min=-5.0, lam_max=3.0, shift=1.0)),
    "edm": ("edm", {}),
    "edm_tail": ("edm", dict(mean=-3.0, std=0.5, lam_min=-2.0, lam_max=4.0)),
}
_DEFAULTS = {"fixed_linear": dict(gamma_min=-13.3, gamma_max=5.0),
             "cosine": dict(lam_min=-15.0, lam_max=15.0, shift=0.0),
             "edm": dict(mean=-1.2, std=1.2, lam_min=-20.0, lam_max=20.0)}


def _options(case):
  name, kwargs = CASES[case]
  return name, {**_DEFAULTS[name], **kwargs}


def _support(case):
  name, opts = _options(case)
  if name == "fixed_linear":
    return -opts["gamma_max"], -opts["gamma_min"]
  return opts["lam_min"], opts["lam_max"]


def _reference_pdf(case, lam):
  """Unnormalised float64 log-SNR density, written from the definitions."""
  name, opts = _options(case)
  if name == "fixed_linear":
    return np.ones_like(lam)
  if name == "cosine":   # lam = -2 log tan(pi u / 2) + shift, u ~ U(0, 1)
    return 1.0 / np.cosh((lam - opts["shift"]) / 2)
  z = (-lam / 2 - opts["mean"]) / opts["std"]   # log sigma = -lam / 2
  return np.exp(-0.5 * z**2)


@functools.lru_cache(maxsize=None)
def _jitted(case):
  """(gamma_fn, dgamma/dt via jvp, density), compiled once per case."""
  name, kwargs = CASES[case]
  gamma_fn = schedules.get(name, **kwargs)
  dgamma = lambda t: jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))[1]
  density = schedules.get_density(name, **kwargs)
  return jax.jit(gamma_fn), jax.jit(dgamma), jax.jit(density)


# ------------------------------------------------------------ fixed schedules
@pytest.mark.parametrize("case", CASES)
def test_shapes_and_dtype(case):
  gamma_fn, _, density = _jitted(case)
  assert gamma_fn(jnp.float32(0.3)).shape == ()
  out = gamma_fn(jnp.linspace(0, 1, 5))
  assert out.shape == (5,) and out.dtype == jnp.float32
  assert density(jnp.zeros((2, 3))).shape == (2, 3)


@pytest.mark.parametrize("case", CASES)
def test_endpoints_finite_and_at_support(case):
  gamma_fn, _, _ = _jitted(case)
  lam_min, lam_max = _support(case)
  gamma = np.asarray(gamma_fn(jnp.array([0.0, 1.0])))
  if CASES[case][0] == "fixed_linear":   # (1 - t) a + t b is exact at 0, 1
    np.testing.assert_array_equal(gamma, np.float32([-lam_max, -lam_min]))
  else:   # float32 atan / ndtr round trip: a few ulp of |lam| <= 20
    np.testing.assert_allclose(gamma, [-lam_max, -lam_min], atol=2e-5)


@pytest.mark.parametrize("case", CASES)
def test_strictly_increasing(case):
  gamma = np.asarray(_jitted(case)[0](T_GRID))
  assert np.all(np.isfinite(gamma))
  assert np.all(np.diff(gamma) > 0)


@pytest.mark.parametrize("case", CASES)
def test_gamma_is_the_quantile_of_the_reference_density(case):
  # t must equal P(lam > -gamma(t)) under the float64 reference density,
  # integrated by the trapezoid rule on 200001 points (error < 1e-8).
  lam_min, lam_max = _support(case)
  lam = np.linspace(lam_min, lam_max, 200001)
  pdf = _reference_pdf(case, lam)
  steps = 0.5 * (pdf[1:] + pdf[:-1]) * np.diff(lam)
  upper = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])
  upper /= upper[0]
  t = T_GRID[::50]
  tail = np.interp(-np.asarray(_jitted(case)[0](t), np.float64), lam, upper)
  # atol: float32 gamma is off by ~1e-6 |lam|, times p(lam) <= 0.2.
  np.testing.assert_allclose(tail, t, atol=2e-5)


def test_matches_float64_reference_formulas():
  t = np.array([0.05, 0.3, 0.5, 0.8, 0.97])
  # cosine: u mapped to [u(15), u(-15)], u(lam) = 2/pi atan(exp(-lam / 2)).
  u_lo, u_hi = (2 / np.pi * np.arctan(np.exp(-x / 2)) for x in (15, -15))
  want = 2 * np.log(np.tan(np.pi / 2 * (u_lo + t * (u_hi - u_lo))))
  np.testing.assert_allclose(_jitted("cosine")[0](t), want, rtol=1e-5,
                             atol=1e-5)
  # edm: gamma = 2 (mean + std Phi^-1(u)), u in [Phi(z(20)), Phi(z(-20))].
  normal = statistics.NormalDist()
  z_lo, z_hi = (-10 + 1.2) / 1.2, (10 + 1.2) / 1.2
  u = normal.cdf(z_lo) + t * (normal.cdf(z_hi) - normal.cdf(z_lo))
  want = [2 * (-1.2 + 1.2 * normal.inv_cdf(x)) for x in u]
  np.testing.assert_allclose(_jitted("edm")[0](t), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(schedules.fixed_linear(t),
                             -13.3 + 18.3 * t, rtol=1e-6)
  assert schedules.cosine_shift(512) == pytest.approx(2 * math.log(1 / 8))
  assert schedules.cosine_shift(64) == 0.0
  np.testing.assert_allclose(
      schedules.cosine(t, shift=-2.0) - 2.0,   # lam = lam_unshifted - 2
      schedules.cosine(t, lam_min=-13.0, lam_max=17.0), atol=2e-5)


@pytest.mark.parametrize("case", CASES)
def test_density_integrates_to_one_and_vanishes_outside(case):
  lam_min, lam_max = _support(case)
  lam = np.linspace(lam_min, lam_max, 100001, dtype=np.float32)
  pdf = np.asarray(_jitted(case)[2](lam), np.float64)
  integral = np.sum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(lam))
  np.testing.assert_allclose(integral, 1.0, rtol=1e-4)  # float32 grid/values
  outside = np.float32([lam_min - 0.5, lam_max + 0.5])
  np.testing.assert_array_equal(_jitted(case)[2](outside), [0.0, 0.0])


@pytest.mark.parametrize("case", CASES)
def test_density_is_inverse_of_jvp_derivative(case):
  gamma_fn, dgamma, density = _jitted(case)
  t = T_GRID[::20]
  product = density(-gamma_fn(t)) * dgamma(t)
  # float32: ndtri / log-sin derivatives carry ~1e-6 relative error.
  np.testing.assert_allclose(product, np.ones_like(t), rtol=2e-5)


@pytest.mark.parametrize("case", CASES)
def test_density_matches_histogram(case):
  gamma_fn, _, density = _jitted(case)
  num = 100_000
  t = jax.random.uniform(jax.random.key(0), (num,))
  lam = -np.asarray(gamma_fn(t))
  lam_min, lam_max = _support(case)
  edges = np.linspace(lam_min, lam_max, 21)
  counts, _ = np.histogram(lam, edges)
  fine = np.linspace(lam_min, lam_max, 20 * 1000 + 1, dtype=np.float32)
  pdf = np.asarray(density(fine), np.float64)
  cell = 0.5 * (pdf[1:] + pdf[:-1]) * np.diff(fine)
  mass = cell.reshape(20, 1000).sum(axis=1)
  # 5 binomial standard errors per bin (+1 count for near-empty bins).
  bound = 5 * np.sqrt(num * mass * (1 - mass)) + 1
  assert np.all(np.abs(counts - num * mass) <= bound), (counts, num * mass)


def test_get_matches_direct_call():
  t = jnp.array([0.1, 0.6])
  np.testing.assert_array_equal(schedules.get("cosine", shift=1.0)(t),
                                schedules.cosine(t, shift=1.0))
  np.testing.assert_array_equal(schedules.get("fixed_linear")(t),
                                schedules.fixed_linear(t))


@pytest.mark.parametrize("call, error, match", [
    (lambda: schedules.get("linear"), ValueError,
     r"unknown schedule 'linear'; known: cosine, edm, fixed_linear"),
    (lambda: schedules.get_density("adaptive"), ValueError,
     r"unknown schedule 'adaptive'"),
    (lambda: schedules.get("cosine", lam_mn=-3.0), TypeError,
     r"no option\(s\) \['lam_mn'\].*lam_min"),
    (lambda: schedules.get("fixed_linear", gamma_min=5.0, gamma_max=-13.3),
     ValueError, r"gamma_min=5.0 must be < gamma_max=-13.3"),
    (lambda: schedules.fixed_linear(0.5, 1.0, 1.0), ValueError,
     r"gamma_min=1.0 must be < gamma_max=1.0"),
    (lambda: schedules.get("cosine", lam_min=3.0, lam_max=3.0), ValueError,
     r"lam_min=3.0 must be < lam_max=3.0"),
    (lambda: schedules.edm(0.5, lam_min=20.0, lam_max=-20.0), ValueError,
     r"lam_min=20.0 must be < lam_max=-20.0"),
    (lambda: schedules.get("edm", std=0.0), ValueError, r"std=0.0 must be > 0"),
    (lambda: schedules.cosine_shift(0), ValueError, r"resolution=0.0"),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


# --------------------------------------------------------- learned schedules
_NETS = {"linear": schedules.LearnedLinear(),
         "monotone": schedules.MonotoneNet(num_features=16),
         "monotone_1024": schedules.MonotoneNet()}


@functools.lru_cache(maxsize=None)
def _learned(kind):
  """(module, initial params, jitted apply(params, t, method))."""
  net = _NETS[kind]
  params = net.init(jax.random.key(1), jnp.zeros((2,)))["params"]
  def apply(p, t, method):   # t is None for "endpoints"
    args = () if t is None else (t,)
    return net.apply({"params": p}, *args, method=method)

  return net, params, jax.jit(apply, static_argnames="method")


def _perturbed(params, seed):
  """Random parameters far from the initialisation (scale 2)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + 2.0 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _paths(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}


def test_learned_param_paths():
  assert _paths(_learned("linear")[1]) == {"gamma_0": (), "span_raw": ()}
  assert _paths(_learned("monotone")[1]) == {
      "gamma_0": (), "span_raw": (),
      "shape/l1/kernel": (1, 1), "shape/l1/bias": (1,),
      "shape/l2/kernel": (1, 16), "shape/l2/bias": (16,),
      "shape/l3/kernel": (16, 1)}


@pytest.mark.parametrize("kind", _NETS)
def test_learned_initialisation_is_close_to_linear(kind):
  _, params, apply = _learned(kind)
  gamma_0, gamma_1 = apply(params, None, "endpoints")
  # float32: softplus(inverse_softplus(18.3)) loses a few ulp of 18.3.
  np.testing.assert_allclose([gamma_0, gamma_1], [-13.3, 5.0], atol=1e-5)
  gamma = apply(params, T_GRID, "__call__")
  # The sigmoid branch is < 1/4 of g's range and nearly linear on [0, 1]:
  # measured max deviation 0.4% of the span; allow 1%.
  np.testing.assert_allclose(gamma, schedules.fixed_linear(T_GRID),
                             atol=0.01 * 18.3)


@pytest.mark.parametrize("kind", ["linear", "monotone"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_exact_endpoints_and_strictly_increasing(kind, seed):
  _, params, apply = _learned(kind)
  params = _perturbed(params, seed)
  gamma_0, gamma_1 = apply(params, None, "endpoints")
  assert gamma_1 > gamma_0
  t = jnp.array([0.3, 0.0, 1.0, 0.7, 1.0, 0.0])   # ends anywhere in a batch
  shape = np.asarray(apply(params, t, "shape"))
  np.testing.assert_array_equal(shape[[1, 2, 4, 5]], [0.0, 1.0, 1.0, 0.0])
  gamma = np.asarray(apply(params, t, "__call__"))
  np.testing.assert_array_equal(gamma[[1, 2]], [gamma_0, gamma_1])  # exact
  for t_end, want in ((0.0, gamma_0), (1.0, gamma_1)):            # scalars
    assert apply(params, jnp.float32(t_end), "__call__") == want
  grid = np.asarray(apply(params, T_GRID, "__call__"))
  assert np.all(np.diff(grid) > 0)
  assert np.all((shape >= 0) & (shape <= 1))


def test_monotone_shape_exact_even_if_rows_round_differently(monkeypatch):
  # On CPU g(0) comes out bit-identical at every batch row, so simulate a
  # backend where it does not: offset each row of g by its position.
  net, params, _ = _learned("monotone")
  original = learned_schedules._MonotoneShapeNet.__call__
  jitter = lambda self, t: original(self, t) + 1e-3 * jnp.arange(t.shape[0])
  monkeypatch.setattr(learned_schedules._MonotoneShapeNet, "__call__",
                      jitter)
  t = jnp.array([0.0, 0.5, 1.0])
  shape_fn = lambda s: net.apply({"params": params}, s, method="shape")
  shape, dshape = jax.jvp(shape_fn, (t,), (jnp.ones_like(t),))
  np.testing.assert_array_equal(np.asarray(shape)[[0, 2]], [0.0, 1.0])
  assert np.all(np.asarray(dshape) > 0)   # derivative kept at the ends


def test_learned_linear_span_stays_positive():
  _, params, apply = _learned("linear")
  params = {"gamma_0": jnp.float32(2.0), "span_raw": jnp.float32(-5.0)}
  gamma_0, gamma_1 = apply(params, None, "endpoints")
  np.testing.assert_allclose(gamma_1 - gamma_0, np.log1p(np.exp(-5.0)),
                             rtol=1e-3)   # 2 + 0.0067 keeps ~4 digits
  assert gamma_1 > gamma_0


def test_monotone_derivative_matches_finite_difference():
  _, params, apply = _learned("monotone")
  params = _perturbed(params, 3)
  t = jnp.array([0.1, 0.4, 0.9])
  gamma_fn = lambda s: apply(params, s, "__call__")
  dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))[1]
  h = 1e-2
  central = (gamma_fn(t + h) - gamma_fn(t - h)) / (2 * h)
  assert np.all(dgamma > 0)
  # O(h^2) truncation plus float32 rounding (~1e-6 * 20 / 2h = 1e-3).
  np.testing.assert_allclose(dgamma, central, rtol=1e-2)


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.LearnedLinear(gamma_min=5.0, gamma_max=1.0),
     r"gamma_min=5.0 must be < gamma_max=1.0"),
    (lambda: schedules.MonotoneNet(num_features=0),
     r"num_features must be >= 1; got 0"),
])
def test_learned_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make().init(jax.random.key(0), jnp.zeros((2,)))


# ---------------------------------------------------- variance minimisation
def _toy_loss(per_example, args):
  """L_i = 0.5 dgamma_i m(gamma_i, x_i), a stand-in for the diffusion loss."""
  shape_t, dshape_dt = per_example
  (gamma_0, span_raw), x = args
  span = jax.nn.softplus(span_raw)
  gamma = gamma_0 + span * shape_t
  m = jax.nn.sigmoid(gamma) * x**2 + jnp.cos(0.3 * gamma) * x + 1.0
  return 0.5 * span * dshape_dt * m


def test_variance_minimizing_gradients():
  net, params, _ = _learned("monotone")
  params = _perturbed(params, 4)
  shape_params = params["shape"]
  ends = (params["gamma_0"], params["span_raw"])
  key_t, key_x = jax.random.split(jax.random.key(5))
  t = jax.random.uniform(key_t, (6,))
  x = jax.random.normal(key_x, (6,))

  def losses(shape_params, ends, x, wrap):
    variables = {"params": {"gamma_0": ends[0], "span_raw": ends[1],
                            "shape": shape_params}}
    shape_fn = lambda s: net.apply(variables, s, method="shape")
    per_example = jax.jvp(shape_fn, (t,), (jnp.ones_like(t),))
    loss_fn = schedules.variance_minimizing(_toy_loss) if wrap else _toy_loss
    return loss_fn(per_example, (ends, x))

  def all_grads(*a):
    mean_wrapped = lambda *a: jnp.mean(losses(*a, wrap=True))
    mean_l = lambda *a: jnp.mean(losses(*a, wrap=False))
    mean_l2 = lambda *a: jnp.mean(losses(*a, wrap=False)**2)
    return (jax.grad(mean_wrapped, argnums=(0, 1, 2))(*a),
            jax.grad(mean_l, argnums=(0, 1, 2))(*a), jax.grad(mean_l2)(*a))

  grad_wrapped, grad_l, grad_l2 = jax.jit(all_grads)(shape_params, ends, x)
  np.testing.assert_array_equal(losses(shape_params, ends, x, True),
                                losses(shape_params, ends, x, False))

  def close(actual, desired):
    # The same graph compiled differently (jit vs eager) already differs by
    # ~3e-6 of a leaf's largest entry here (the normalisation cancels).
    atol = 2e-5 * float(jnp.max(jnp.abs(desired)))
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=atol)

  jax.tree_util.tree_map(close, grad_wrapped[0], grad_l2)
  jax.tree_util.tree_map(close, grad_wrapped[1:], grad_l[1:])
  # The test has teeth: the two shape gradients differ by far more.
  diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                grad_l2, grad_l[0])
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-2


def test_variance_minimizing_rejects_mismatched_batch():
  wrapped = schedules.variance_minimizing(lambda pe, a: pe[0] * a)
  with pytest.raises(ValueError, match=r"leading dimension B"):
    wrapped((jnp.ones(3), jnp.ones(4)), 2.0)


# ------------------------------------------------------------------ adaptive
def _random_state(num_bins=7, lam_min=-4.0, lam_max=6.0):
  state = schedules.adaptive_init(num_bins=num_bins, lam_min=lam_min,
                                  lam_max=lam_max)
  ema = np.exp(np.random.default_rng(0).normal(size=num_bins))
  return state._replace(loss_ema=jnp.float32(ema),
                        count=jnp.ones(num_bins, jnp.int32))


_adaptive_gamma = jax.jit(schedules.adaptive_gamma)
_adaptive_density = jax.jit(schedules.adaptive_density)
_adaptive_update = jax.jit(schedules.adaptive_update)


def test_adaptive_init_is_uniform():
  state = schedules.adaptive_init(num_bins=100)
  np.testing.assert_array_equal(np.asarray(state.edges)[[0, -1]], [-15, 15])
  np.testing.assert_allclose(_adaptive_density(state, jnp.array([-7.0, 3.0])),
                             [1 / 30, 1 / 30], rtol=1e-5)
  np.testing.assert_allclose(_adaptive_gamma(state, T_GRID),
                             -15.0 + 30.0 * T_GRID, atol=2e-5)


def test_adaptive_density_integrates_to_one():
  state = _random_state()
  edges = np.asarray(state.edges, np.float64)
  mids = 0.5 * (edges[1:] + edges[:-1])
  p = np.asarray(_adaptive_density(state, mids), np.float64)
  np.testing.assert_allclose(np.sum(p * np.diff(edges)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(p / p.sum(), state.loss_ema / state.loss_ema.sum(),
                             rtol=1e-6)   # proportional to the EMA
  # Midpoint rule with 1000 cells per bin (no cell straddles an edge): exact
  # for a piecewise constant density up to float32 values.
  fine = np.linspace(-4.0, 6.0, 7 * 1000 + 1)
  cells = jnp.float32(0.5 * (fine[1:] + fine[:-1]))
  quad = np.sum(np.float64(_adaptive_density(state, cells)) * np.diff(fine))
  np.testing.assert_allclose(quad, 1.0, rtol=1e-6)
  outside = jnp.array([-4.1, 6.1])
  np.testing.assert_array_equal(_adaptive_density(state, outside), [0, 0])


def test_adaptive_gamma_is_piecewise_linear_inverse_cdf():
  state = _random_state()
  gamma = np.asarray(_adaptive_gamma(state, T_GRID))
  assert gamma[0] == -6.0                                     # exact
  np.testing.assert_allclose(gamma[-1], 4.0, atol=1e-5)
  assert np.all(np.diff(gamma) > 0)
  # Independent float64 inverse CDF: knots (tail mass above lam, -lam).
  edges = np.asarray(state.edges, np.float64)
  mass = np.asarray(state.loss_ema, np.float64) * np.diff(edges)
  upper = np.cumsum(mass[::-1]) / mass.sum()
  knots_t = np.concatenate([[0.0], upper])
  np.testing.assert_allclose(gamma, np.interp(T_GRID, knots_t, -edges[::-1]),
                             atol=2e-5)   # float32 rounding of |gamma| <= 6
  # dgamma/dt (jvp) = 1 / p(lam) inside every bin.
  t = jnp.float32(0.5 * (knots_t[1:] + knots_t[:-1]))
  dgamma = jax.jvp(functools.partial(_adaptive_gamma, state), (t,),
                   (jnp.ones_like(t),))[1]
  p = _adaptive_density(state, -_adaptive_gamma(state, t))
  np.testing.assert_allclose(dgamma * p, np.ones(7), rtol=1e-5)


def test_adaptive_gamma_histogram_matches_density():
  state = _random_state()
  num = 100_000
  t = jax.random.uniform(jax.random.key(2), (num,))
  lam = -np.asarray(_adaptive_gamma(state, t))
  counts, _ = np.histogram(lam, np.asarray(state.edges))
  mass = (np.asarray(state.loss_ema, np.float64)
          * np.diff(np.asarray(state.edges, np.float64)))
  mass /= mass.sum()
  bound = 5 * np.sqrt(num * mass * (1 - mass))   # 5 binomial std errors
  assert np.all(np.abs(counts - num * mass) <= bound), (counts, num * mass)


def test_adaptive_update_one_bin_closed_form():
  state = schedules.adaptive_init(num_bins=5, lam_min=-5.0, lam_max=5.0)
  logsnr = jnp.array([-0.9, -0.1, -0.5, -1.0])      # all in bin 2: [-1, 1)
  loss = jnp.array([3.0, 5.0, 10.0, 2.0])
  first = _adaptive_update(state, logsnr, loss, decay=0.9)
  # First visit replaces the placeholder; nothing else moves.
  np.testing.assert_array_equal(first.loss_ema, [1, 1, 5.0, 1, 1])
  np.testing.assert_array_equal(first.count, [0, 0, 4, 0, 0])
  np.testing.assert_array_equal(first.edges, state.edges)
  second = _adaptive_update(first, logsnr[:2], jnp.array([7.0, 9.0]),
                            decay=0.9)
  np.testing.assert_allclose(second.loss_ema[2], 0.9 * 5.0 + 0.1 * 8.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(np.delete(second.loss_ema, 2), [1, 1, 1, 1])
  np.testing.assert_array_equal(second.count, [0, 0, 6, 0, 0])


def test_adaptive_update_many_bins_matches_numpy():
  state = _random_state(num_bins=6, lam_min=-3.0, lam_max=3.0)
  rng = np.random.default_rng(1)
  logsnr = np.concatenate([rng.uniform(-3.0, -1.0, 9), [3.0, -3.0, 7.0, 0.5]])
  loss = rng.uniform(0.0, 4.0, logsnr.size)
  loss[-1] = np.nan                                     # ignored
  new = schedules.adaptive_update(state, logsnr, loss, decay=0.95)
  jitted = _adaptive_update(state, jnp.float32(logsnr), jnp.float32(loss),
                            decay=0.95)
  # jit fuses the EMA differently from eager: 1 ulp.
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, rtol=1e-6), new, jitted)
  keep = (logsnr >= -3) & (logsnr <= 3) & np.isfinite(loss)
  index = np.minimum(np.floor(logsnr[keep] + 3.0).astype(int), 5)  # width 1
  ema = np.asarray(state.loss_ema, np.float64)
  count = np.ones(6, int)
  for k in range(6):
    hits = loss[keep][index == k]
    count[k] += hits.size
    if hits.size:
      ema[k] = 0.95 * ema[k] + 0.05 * np.float32(hits).mean()
  np.testing.assert_allclose(new.loss_ema, ema, rtol=1e-6)
  np.testing.assert_array_equal(new.count, count)
  assert count[-1] == 2 and count[0] > 1   # lam_max and lam_min are kept


def test_adaptive_schedule_names_are_vdm_adaptive_functions():
  assert (schedules.adaptive_init, schedules.adaptive_update,
          schedules.adaptive_density, schedules.adaptive_gamma) == (
              adaptive.init, adaptive.update, adaptive.density, adaptive.gamma)


@pytest.mark.parametrize("call, error, match", [
    (lambda: schedules.adaptive_init(num_bins=0), ValueError,
     r"num_bins must be >= 1; got 0"),
    (lambda: schedules.adaptive_init(num_bins=2.5), TypeError, r"got 2.5"),
    (lambda: schedules.adaptive_init(lam_min=1.0, lam_max=-1.0), ValueError,
     r"lam_min=1.0 must be < lam_max=-1.0"),
    (lambda: schedules.adaptive_update(schedules.adaptive_init(), jnp.zeros(3),
                                       jnp.zeros(3), decay=1.0),
     ValueError, r"decay=1.0 must be in \[0, 1\)"),
    (lambda: schedules.adaptive_update(schedules.adaptive_init(), jnp.zeros(3),
                                       jnp.zeros(4)),
     ValueError, r"shape \[B\]; got \(3,\) and \(4,\)"),
])
def test_adaptive_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_math_module_imports_no_training_or_io():
  code = ("import sys, vdm.schedules; print([m for m in ('optax', 'orbax', "
          "'tensorflow', 'tensorflow_datasets') if m in sys.modules])")
  out = subprocess.check_output([sys.executable, "-c", code], text=True)
  assert out.strip() == "[]"
