"""vdm.model: closures, losses and the variance-minimisation wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import elbo
from vdm import model as model_lib
from vdm import nets
from vdm import schedules

VOCAB = 64
SHAPE = (4,)


def make_model(**kwargs):
  net = nets.get("mlp", hidden=16, num_res_blocks=1,
                 num_classes=kwargs.pop("num_classes_net", 0))
  kwargs.setdefault("vocab_size", VOCAB)
  return model_lib.Model(net=net, data_shape=SHAPE, **kwargs)


def perturb(params, key, scale=0.3):
  """Random non-zero params (the nets zero-initialise their output layer)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [
      l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def data():
  x = jax.random.randint(jax.random.key(0), (8, *SHAPE), 0, VOCAB)
  return x


def test_elbo_terms_sum_and_match_elbo_functions(data):
  model = make_model(schedule="learned_linear")
  params = perturb(model.init(jax.random.key(1)), jax.random.key(2))
  key = jax.random.key(3)
  terms = model.elbo_terms(params, data, None, key)
  np.testing.assert_allclose(terms["total"],
                             terms["recon"] + terms["prior"] + terms["diff"],
                             rtol=1e-6)
  # The same numbers from the pure functions, composed by hand.
  key_recon, key_t, key_eps = jax.random.split(key, 3)
  f = elbo.encode(data, VOCAB)
  gamma_fn = model.gamma_fn(params)
  gamma_0, gamma_1 = gamma_fn(jnp.array([0.0, 1.0]))
  z_0 = elbo.diffuse(f, jnp.full((8,), gamma_0),
                     jax.random.normal(key_recon, f.shape))
  t = elbo.sample_times(key_t, 8)
  eps = jax.random.normal(key_eps, f.shape)
  diff = elbo.diffusion_loss(model.eps_fn(params), gamma_fn, f, t, eps)
  np.testing.assert_allclose(terms["diff"], diff, rtol=1e-6)
  np.testing.assert_allclose(
      terms["recon"], elbo.reconstruction_loss(data, z_0, gamma_0, VOCAB),
      rtol=1e-6)
  np.testing.assert_allclose(terms["prior"], elbo.prior_loss(f, gamma_1),
                             rtol=1e-6)


def test_variance_minimization_gradients(data):
  """Shape params get grad of mean(L_diff^2); the rest the ELBO gradient."""
  model_vm = make_model(schedule="learned_net", variance_minimization=True)
  model = make_model(schedule="learned_net")
  params = perturb(model.init(jax.random.key(4)), jax.random.key(5), 0.1)
  key = jax.random.key(6)

  def loss_vm(p):
    return model_vm.training_loss(p, data, None, key)[0]

  def loss_elbo(p):
    return model.training_loss(p, data, None, key)[0]

  def mean_sq_diff(p):
    return jnp.mean(jnp.square(model.training_loss(p, data, None, key)[1][
        "diff"]))

  g_vm = jax.jit(jax.grad(loss_vm))(params)
  g_elbo = jax.jit(jax.grad(loss_elbo))(params)
  g_sq = jax.jit(jax.grad(mean_sq_diff))(params)
  # Values agree: the wrapper changes gradients only.
  np.testing.assert_allclose(loss_vm(params), loss_elbo(params), rtol=1e-6)
  shape_vm = jax.tree.leaves(g_vm["schedule"]["shape"])
  shape_sq = jax.tree.leaves(g_sq["schedule"]["shape"])
  shape_elbo = jax.tree.leaves(g_elbo["schedule"]["shape"])
  for a, b, c in zip(shape_vm, shape_sq, shape_elbo):
    scale = np.max(np.abs(b)) + 1e-12
    # atol relative to the leaf's scale: the normalised shape cancels terms.
    np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=1e-3)
    assert not np.allclose(a, c, rtol=1e-2)   # really a different gradient
  for part in ("net",):
    for a, b in zip(jax.tree.leaves(g_vm[part]),
                    jax.tree.leaves(g_elbo[part])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for name in ("gamma_0", "span_raw"):
    np.testing.assert_allclose(g_vm["schedule"][name],
                               g_elbo["schedule"][name], rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize("parameterization", ["x", "v"])
def test_parameterization_converts_the_net_output(data, parameterization):
  model = make_model(schedule="fixed_linear",
                     parameterization=parameterization)
  params = perturb(model.init(jax.random.key(7)), jax.random.key(8))
  z = jax.random.normal(jax.random.key(9), (8, *SHAPE))
  gamma = jnp.linspace(-5.0, 5.0, 8)
  out = model.net.apply({"params": params["net"]}, z, gamma, None,
                        train=False)
  eps_hat = model.eps_fn(params)(z, gamma)
  var = jax.nn.sigmoid(gamma)[:, None]
  alpha, sigma = jnp.sqrt(1 - var), jnp.sqrt(var)
  if parameterization == "x":      # eps = (z - alpha x) / sigma
    expected = (z - alpha * out) / sigma
  else:                            # eps = sigma z + alpha v
    expected = sigma * z + alpha * out
  np.testing.assert_allclose(eps_hat, expected, rtol=1e-4, atol=1e-5)


def test_p_uncond_one_equals_the_null_label(data):
  model = make_model(schedule="fixed_linear", num_classes=3,
                     num_classes_net=3, p_uncond=0.999999)
  params = perturb(model.init(jax.random.key(10)), jax.random.key(11))
  labels = jnp.arange(8) % 3
  key = jax.random.key(12)
  dropped, _ = model.training_loss(params, data, labels, key)
  null, _ = model.training_loss(params, data, jnp.full((8,), 3), key)
  kept, _ = make_model(schedule="fixed_linear", num_classes=3,
                       num_classes_net=3).training_loss(params, data, labels,
                                                        key)
  np.testing.assert_allclose(dropped, null, rtol=1e-6)
  assert abs(float(kept) - float(null)) > 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="cubic"), "unknown schedule"),
    (dict(noise_schedule="karras"), "unknown noise_schedule"),
    (dict(weighting="l1"), "unknown weighting"),
    (dict(weighting="sigmoid", num_steps=10), "continuous time"),
    (dict(schedule="fixed_linear", variance_minimization=True),
     "learned schedule"),
    (dict(p_uncond=0.1), "class-conditional"),
    (dict(gamma_min=5.0, gamma_max=-13.3), "gamma_min"),
    (dict(parameterization="score"), "unknown parameterization"),
    (dict(num_steps=-1), "num_steps"),
    (dict(schedule="learned_linear", weighting="sigmoid"), "trained by the ELBO"),
    (dict(schedule="learned_net", noise_schedule="cosine"),
     "trained by the ELBO"),
    (dict(schedule="fixed_linear", noise_schedule="edm", num_steps=4),
     "continuous time"),
    (dict(schedule="learned_net", variance_minimization=True, num_steps=4),
     "continuous-time loss"),
    (dict(p_uncond=1.0, num_classes=2, num_classes_net=2), "p_uncond"),
    (dict(vocab_size=1), "vocab_size"),
    # Options are bound when the model is built, not at the first loss.
    (dict(schedule="fixed_linear", noise_schedule="edm",
          noise_schedule_kwargs=(("std", -1.0),)), "noise_schedule.*std"),
    (dict(schedule="fixed_linear", noise_schedule="adaptive",
          noise_schedule_kwargs=(("num_bins", 0),)), "num_bins"),
    (dict(schedule="fixed_linear", weighting="sigmoid",
          weighting_kwargs=(("scale", 2.0),)), "unknown option"),
])
def test_bad_model_settings_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_model(**kwargs)


@pytest.mark.parametrize("noise_schedule", ["cosine", "cosine_shifted",
                                            "edm", "adaptive"])
def test_training_noise_schedules_give_finite_losses(data, noise_schedule):
  model = make_model(schedule="fixed_linear", noise_schedule=noise_schedule,
                     weighting="sigmoid")
  params = perturb(model.init(jax.random.key(13)), jax.random.key(14))
  loss, aux = model.training_loss(params, data, None, jax.random.key(15),
                                  model.init_adaptive())
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(aux["logsnr"]))
  assert np.all(aux["weighted_mse"] >= 0)


def _training_draws(model, params, data, key):
  """t, eps and eps_hat as `training_loss` draws them (its key order)."""
  _, key_t, key_eps, key_dropout, _ = jax.random.split(key, 5)
  t = elbo.sample_times(key_t, data.shape[0])
  eps = jax.random.normal(key_eps, data.shape)
  eps_fn = model.eps_fn(params, train=True, key_dropout=key_dropout)
  return t, eps, eps_fn


def test_weighted_loss_is_w_over_p_times_the_squared_error(data):
  """0.5 w(lambda) / p(lambda) ||eps - eps_hat||^2, lambda from p(lambda)."""
  model = make_model(schedule="fixed_linear", noise_schedule="edm",
                     weighting="sigmoid", weighting_kwargs=(("bias", 1.0),))
  params = perturb(model.init(jax.random.key(16)), jax.random.key(17))
  key = jax.random.key(18)
  _, aux = model.training_loss(params, data, None, key)
  t, eps, eps_fn = _training_draws(model, params, data, key)
  gamma_t, dgamma_dt = jax.jvp(schedules.get("edm"), (t,), (jnp.ones(8),))
  var_t = 1.0 / (1.0 + np.exp(-np.float64(gamma_t)))[:, None]   # sigma_t^2
  f = np.float64(elbo.encode(data, VOCAB))
  z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * np.float64(eps)
  eps_hat = np.float64(eps_fn(jnp.float32(z_t), gamma_t))
  lam = -np.float64(gamma_t)
  w = 1.0 / (1.0 + np.exp(lam - 1.0))                  # sigmoid(1 - lam)
  p_inv = np.float64(dgamma_dt)                         # 1 / p(lambda)
  expected = 0.5 * w * p_inv * np.sum(np.square(eps - eps_hat), axis=-1)
  # rtol: z_t in float32 vs float64 moves eps_hat by ~1e-7 relative.
  np.testing.assert_allclose(aux["diff"], expected, rtol=1e-5)
  np.testing.assert_array_equal(aux["logsnr"], -gamma_t)


def test_t_step_elbo_loss_matches_its_formula(data):
  """0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat(z_t)||^2 on the grid."""
  num_steps = 4
  model = make_model(schedule="fixed_linear", num_steps=num_steps)
  params = perturb(model.init(jax.random.key(19)), jax.random.key(20))
  key = jax.random.key(21)
  _, aux = model.training_loss(params, data, None, key)
  t, eps, eps_fn = _training_draws(model, params, data, key)
  step = np.floor(np.float64(t) * num_steps)
  t_grid, s_grid = (step + 1) / num_steps, step / num_steps
  gamma_t = -13.3 + 18.3 * t_grid          # the fixed_linear schedule
  gamma_s = -13.3 + 18.3 * s_grid
  var_t = (1.0 / (1.0 + np.exp(-gamma_t)))[:, None]
  f = np.float64(elbo.encode(data, VOCAB))
  z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * np.float64(eps)
  eps_hat = np.float64(eps_fn(jnp.float32(z_t), jnp.float32(gamma_t)))
  expected = 0.5 * num_steps * np.expm1(gamma_t - gamma_s) * np.sum(
      np.square(eps - eps_hat), axis=-1)
  # rtol: gamma in float32 (|gamma| <= 13.3) carries ~1e-6 of its value.
  np.testing.assert_allclose(aux["diff"], expected, rtol=1e-4)
  np.testing.assert_array_equal(aux["weighted_mse"], 0.0)
