"""Weighted objectives in training (Kingma & Gao 2023) and the offline
Frechet distance.

* The adaptive noise schedule inside the train step: the histogram moves
  exactly where the batch's log-SNRs fell, by the EMA of the batch means;
  a resumed run reproduces it (and the params) bit for bit.
* A weighting or training noise schedule changes the training loss, never
  the eval bpd function.
* A monotonic weighting's loss is the ELBO of Gaussian-augmented data: for
  Gaussian data with the Bayes-optimal denoiser everything is in closed form
  (derivation in the comments above `test_augmented_elbo_is_exact`).
* `vdm.frechet`: the distance's closed forms, symmetry and zero on identical
  sets; the classifier saves and loads bit-identically.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdm import checkpointing
from vdm import elbo
from vdm import frechet
from vdm import input_pipeline
from vdm import model as model_lib
from vdm import nets
from vdm import schedules
from vdm import train
from vdm import training_loop
from vdm import weighting
import tiny_config as tiny_config_lib

# ==========================================================================
# Monotonic weighting = ELBO of Gaussian-augmented data, in closed form.
#
# Kingma & Gao 2023 (arXiv:2303.00848; the claim as stated in its abstract:
# every common objective is a weighted integral of ELBOs over noise levels,
# and with a monotonic weighting it is the ELBO of Gaussian-noise-augmented
# data; their section titles are not quoted here, not having been checked).
# In log-SNR form, with m(lam; x) = E_eps ||eps - eps_hat(z_lam, lam)||^2,
#   L_w(x) = 0.5 * int_{lo}^{hi} w(lam) m(lam; x) dlam          (1)
# (DESIGN.md, weighted losses; lo/hi are the noise schedule's log-SNR range).
# Let K(lam; x) = KL(q(z_lam..lo | x) || p(z_lam..lo)), the negative ELBO of
# the noise-perturbed ("augmented") data z_lam ~ q(z_lam | x) minus the
# entropy of that noise (which does not depend on the model). K&G show
# dK/dlam = 0.5 m(lam; x). With w(lam) = w(hi) + int_lam^hi (-w'(u)) du
# (w monotone <=> -w' >= 0), integrating (1) by parts gives
#   L_w(x) = int_{lo}^{hi} (-w'(lam)) K(lam; x) dlam
#            + w(hi) K(hi; x) - w(lo) K(lo; x),                (2)
# a positive mixture (density -w' / (w(lo) - w(hi))) of augmented-data ELBOs.
#
# Gaussian data f ~ N(MU, S^2) (one dimension), alpha^2 = sigmoid(lam),
# sigma^2 = sigmoid(-lam). The augmented data z_lam = alpha f + sigma eps is
# Gaussian with variance var_z = alpha^2 S^2 + sigma^2 (data variance of the
# "new" Gaussian-data problem). The Bayes-optimal denoiser is
#   eps_hat(z) = E[eps | z] = sigma (z - alpha MU) / var_z,
# so for one x: eps - eps_hat = eps alpha^2 S^2 / var_z
#                               - sigma alpha (x - MU) / var_z and
#   m(lam; x) = (alpha^2 S^2 / var_z)^2 + sigma^2 alpha^2 (x - MU)^2 / var_z^2.
# With that model (and the prior at lo equal to the true marginal) the
# reverse process is exact, the augmented-data ELBO is tight, and
#   K(lam; x) = E_{z ~ N(alpha x, sigma^2)}[-log N(z; alpha MU, var_z)]
#               - H[N(alpha x, sigma^2)]
#             = 0.5 (sigma^2 / var_z + alpha^2 (x - MU)^2 / var_z - 1
#                    + log(var_z / sigma^2)).
# Checked below: K as that cross-entropy minus entropy by quadrature of the
# marginal density (not using var_z), dK/dlam = 0.5 m, E_x K = I(x; z_lam)
# = 0.5 log(1 + S^2 e^lam); then (1) == (2) by quadrature for every
# monotone weighting, and vdm's Monte-Carlo estimator `elbo.diffusion_loss(...,
# weighting=w)` with a training noise schedule agrees with both.
# ==========================================================================

MU, S = 0.2, 0.3
X_VALUES = (-0.7, 0.25, 0.9)
EDM = dict(mean=2.4, std=2.4, sigma_data=0.5)


def np_sigmoid(u):
  return 0.5 * (1.0 + np.tanh(0.5 * u))


def gaussian_terms(lam, x):
  """(m(lam; x), K(lam; x)) in float64, closed forms above."""
  var_alpha, var_sigma = np_sigmoid(lam), np_sigmoid(-lam)
  var_z = var_alpha * S**2 + var_sigma
  mse = ((var_alpha * S**2 / var_z)**2
         + var_sigma * var_alpha * (x - MU)**2 / var_z**2)
  kl = 0.5 * (var_sigma / var_z + var_alpha * (x - MU)**2 / var_z - 1.0
              + np.log(var_z / var_sigma))
  return mse, kl


def np_edm(lam):
  m, s, sd = EDM["mean"], EDM["std"], EDM["sigma_data"]
  pdf = np.exp(-0.5 * ((lam - m) / s)**2) / (s * np.sqrt(2 * np.pi))
  return pdf * (np.exp(-lam) + sd**2) / sd**2


def np_edm_slope(lam):
  """d log edm / d lam."""
  m, s, sd = EDM["mean"], EDM["std"], EDM["sigma_data"]
  return (m - lam) / s**2 - np.exp(-lam) / (np.exp(-lam) + sd**2)


def np_edm_argmax():
  lo, hi = EDM["mean"] - EDM["std"]**2, EDM["mean"]   # slope > 0 > slope
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np_edm_slope(mid) > 0 else (lo, mid)
  return 0.5 * (lo + hi)


def np_weighting(name, lam):
  """(w(lam), w'(lam)) in float64, written independently of vdm.weighting."""
  if name == "elbo":
    return np.ones_like(lam), np.zeros_like(lam)
  if name == "sigmoid":                          # bias 2
    w = np_sigmoid(2.0 - lam)
    return w, -w * (1.0 - w)
  if name == "v_cosine":
    w = np.exp(-0.5 * lam)
    return w, -0.5 * w
  if name == "edm_monotonic":
    lam_star = np_edm_argmax()
    above = lam > lam_star
    w = np_edm(np.maximum(lam, lam_star))
    return w, np.where(above, np_edm(lam) * np_edm_slope(lam), 0.0)
  raise ValueError(name)


def simpson(values, grid):
  h = grid[1] - grid[0]
  return h / 3 * (values[0] + values[-1] + 4 * values[1:-1:2].sum()
                  + 2 * values[2:-1:2].sum())


def test_augmented_data_kl_closed_form_derivative_and_information():
  # K as cross-entropy of the augmented data's marginal minus the noise
  # entropy; the marginal density by Gauss-Hermite over the data f.
  nodes, weights = np.polynomial.hermite_e.hermegauss(200)
  weights = weights / weights.sum()                    # E over N(0, 1)
  for lam in (-6.0, -2.0, 0.0, 2.0, 5.0):
    alpha, sigma = np.sqrt(np_sigmoid(lam)), np.sqrt(np_sigmoid(-lam))
    for x in X_VALUES:
      z = alpha * x + sigma * nodes                    # z ~ q(z_lam | x)
      f = MU + S * nodes
      dens = (np.exp(-0.5 * ((z[:, None] - alpha * f[None]) / sigma)**2)
              / (sigma * np.sqrt(2 * np.pi))) @ weights   # q(z_lam = z)
      cross_entropy = -np.sum(weights * np.log(dens))
      entropy = 0.5 * np.log(2 * np.pi * np.e * sigma**2)
      np.testing.assert_allclose(cross_entropy - entropy,
                                 gaussian_terms(lam, x)[1], rtol=1e-7)
      # K&G: d/dlam of the augmented-data KL is half the eps-MSE.
      h = 1e-5
      derivative = (gaussian_terms(lam + h, x)[1]
                    - gaussian_terms(lam - h, x)[1]) / (2 * h)
      np.testing.assert_allclose(derivative, 0.5 * gaussian_terms(lam, x)[0],
                                 rtol=1e-6)
    # Averaged over x ~ N(MU, S^2): the mutual information I(x; z_lam).
    mean_k = np.sum(weights * gaussian_terms(lam, MU + S * nodes)[1])
    np.testing.assert_allclose(mean_k, 0.5 * np.log1p(S**2 * np.exp(lam)),
                               rtol=1e-10)


def optimal_eps_fn(z_t, gamma_t):
  """Bayes-optimal eps_hat for data N(MU, S^2); gamma_t [B] -> [B, 1]."""
  gamma = gamma_t[:, None]
  var_alpha, var_sigma = jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)
  var_z = var_alpha * S**2 + var_sigma
  return jnp.sqrt(var_sigma) * (z_t - jnp.sqrt(var_alpha) * MU) / var_z


NOISE_SCHEDULES = {   # name: (gamma_fn, (lam_lo, lam_hi))
    "fixed_linear": (functools.partial(schedules.fixed_linear,
                                       gamma_min=-13.3, gamma_max=5.0),
                     (-5.0, 13.3)),
    "cosine": (functools.partial(schedules.cosine, lam_min=-15.0,
                                 lam_max=15.0), (-15.0, 15.0)),
}
_NUM_MC = 1 << 17


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mc_weighted_loss(weighting_name, schedule_name, x, key):
  gamma_fn, _ = NOISE_SCHEDULES[schedule_name]
  w = weighting.get(weighting_name, **(
      {"bias": 2.0} if weighting_name == "sigmoid" else
      EDM if weighting_name == "edm_monotonic" else {}))
  key_t, key_eps = jax.random.split(key)
  f = jnp.full((_NUM_MC, 1), x, jnp.float32)
  t = elbo.sample_times(key_t, _NUM_MC)
  eps = jax.random.normal(key_eps, f.shape)
  return elbo.diffusion_loss(optimal_eps_fn, gamma_fn, f, t, eps,
                             weighting=w)                   # [N] nats


@pytest.mark.parametrize("schedule_name", sorted(NOISE_SCHEDULES))
@pytest.mark.parametrize("name",
                         ["elbo", "sigmoid", "edm_monotonic", "v_cosine"])
def test_augmented_elbo_is_exact(name, schedule_name):
  lo, hi = NOISE_SCHEDULES[schedule_name][1]
  grid = np.linspace(lo, hi, (1 << 16) + 1)
  w, dw = np_weighting(name, grid)
  # The numpy reference is the function vdm trains with (float32 values).
  w_vdm = weighting.get(name, **({"bias": 2.0} if name == "sigmoid" else
                                 EDM if name == "edm_monotonic" else {}))
  np.testing.assert_allclose(w_vdm(jnp.float32(grid[::64])), w[::64],
                             rtol=2e-5)
  assert np.all(-dw >= 0)                            # monotone: a mixture
  for i, x in enumerate(X_VALUES):
    mse, kl = gaussian_terms(grid, x)
    weighted = 0.5 * simpson(w * mse, grid)                          # (1)
    augmented = (simpson(-dw * kl, grid) + w[-1] * kl[-1]
                 - w[0] * kl[0])                                     # (2)
    # Simpson on 65537 points of smooth integrands (edm_monotonic: w' is
    # continuous at lam_star, w'' is not): error well below 1e-9.
    np.testing.assert_allclose(augmented, weighted, rtol=1e-9)
    # vdm's importance-sampled estimator w(lam) / p(lam) ||eps - eps_hat||^2
    # with lam from the schedule, against the quadrature: within 4 standard
    # errors (iid formula; antithetic times only make the error smaller).
    losses = np.asarray(_mc_weighted_loss(name, schedule_name, x,
                                          jax.random.key(i)), np.float64)
    std_error = losses.std() / np.sqrt(losses.size)
    error = abs(losses.mean() - weighted)
    assert error < 4 * std_error + 1e-6 * weighted, (losses.mean(), weighted,
                                                     std_error)
    # The check has teeth: 4 standard errors stay below 20% (ELBO with the
    # cosine p(lam) has heavy importance weights cosh(lam / 2); 3%), under 2%
    # for the weightings paired with their schedule.
    assert std_error < 0.05 * weighted


def test_non_monotonic_weighting_is_not_a_mixture():
  # eps_cosine = sech(lam / 2) rises for lam < 0: -w' < 0 there, so (2) has
  # negative mixture weights (K&G: an integral of ELBOs, but not one ELBO).
  grid = np.linspace(-15.0, 15.0, 3001)
  w = 1.0 / np.cosh(grid / 2)
  assert np.any(np.diff(w) > 0)
  assert not weighting.is_monotonic(weighting.get("eps_cosine"))
  assert weighting.is_monotonic(weighting.get("edm_monotonic"))


# ==========================================================================
# Weighting / noise schedule change the training loss, not the eval bpd.
# ==========================================================================

_NET = nets.get("mlp", hidden=16, num_res_blocks=1)


def _model(**kwargs):
  kwargs.setdefault("schedule", "fixed_linear")
  return model_lib.Model(net=_NET, data_shape=(8,), vocab_size=17, **kwargs)


@pytest.fixture(scope="module")
def small_model_inputs():
  model = _model()
  params = model.init(jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (16, 8), 0, 17)
  return params, x, jax.random.key(2)


_training_loss = jax.jit(lambda m, p, x, k, a: m.training_loss(p, x, None, k,
                                                               a),
                         static_argnums=0)
_eval_step = jax.jit(lambda m, p, b: train.eval_step(
    p, b, jnp.int32(0), model=m, eval_key=jax.random.key(5)),
                     static_argnums=0)


def test_weighting_changes_training_loss_not_eval(small_model_inputs):
  params, x, key = small_model_inputs
  variants = {
      "elbo": _model(),
      "sigmoid": _model(weighting="sigmoid", weighting_kwargs=(("bias", 2.0),)),
      "cosine": _model(noise_schedule="cosine"),
      "edm_adaptive": _model(weighting="edm_monotonic",
                             noise_schedule="adaptive"),
  }
  losses, aux = {}, {}
  for name, model in variants.items():
    adaptive = model.init_adaptive()
    losses[name], aux[name] = jax.device_get(
        _training_loss(model, params, x, key, adaptive))
  # Same noise schedule and key: the weighted per-example diffusion loss is
  # exactly w(lambda) times the ELBO one, and the totals differ.
  logsnr = np.float64(aux["elbo"]["logsnr"])
  np.testing.assert_array_equal(aux["sigmoid"]["logsnr"], logsnr)
  np.testing.assert_allclose(aux["sigmoid"]["diff"],
                             aux["elbo"]["diff"] * np_sigmoid(2.0 - logsnr),
                             rtol=2e-6)
  # The training p(lambda) changes the noise levels drawn: cosine's range.
  assert np.all(np.abs(aux["cosine"]["logsnr"]) <= 15.0)
  assert not np.allclose(aux["cosine"]["logsnr"], logsnr)
  for name in variants:
    # recon and prior use the model's schedule endpoints: untouched.
    np.testing.assert_array_equal(aux[name]["recon"], aux["elbo"]["recon"])
    np.testing.assert_array_equal(aux[name]["prior"], aux["elbo"]["prior"])
    if name != "elbo":
      assert abs(losses[name] - losses["elbo"]) > 1e-3 * abs(losses["elbo"])
  # The eval bpd function: bit-identical for every training objective.
  batch = {"image": x, "label": jnp.zeros(16, jnp.int32),
           "mask": jnp.ones(16, bool)}
  reference = jax.device_get(_eval_step(variants["elbo"], params, batch))
  for name, model in variants.items():
    got = jax.device_get(_eval_step(model, params, batch))
    for term in reference:
      assert got[term] == reference[term], (name, term)


# ==========================================================================
# The adaptive schedule in the train loop.
# ==========================================================================

NUM_BINS = 12


def adaptive_config(**overrides) -> ml_collections.ConfigDict:
  config = tiny_config_lib.get_config()
  config.model.noise_schedule = "adaptive"
  config.model.schedule = "fixed_linear"   # learned ones need the ELBO
  config.model.noise_schedule_kwargs = ml_collections.ConfigDict(
      dict(num_bins=NUM_BINS, lam_min=-12.0, lam_max=12.0))
  config.model.weighting = "sigmoid"
  config.model.adaptive_decay = 0.9
  config.optimizer.decay = "none"   # the LR of step s does not need num_steps
  config.sampling.num_samples = 0
  config.training.eval_batch_size = 400   # the 359 test digits in one batch
  for name, value in overrides.items():
    group, field = name.split("__")
    config[group][field] = value
  return config


def test_train_step_updates_histogram_exactly_where_logsnr_fell():
  config = adaptive_config()
  trainer = training_loop.Trainer(config)
  model = trainer.model
  base_key = jax.random.key(7)
  decay = config.model.adaptive_decay
  step_fn = jax.jit(functools.partial(
      train.train_step, model=model, base_key=base_key,
      ema_decay=config.optimizer.ema_decay, adaptive_decay=decay,
      learning_rate_fn=trainer.learning_rate_fn))
  state = trainer.init_state()
  edges = np.asarray(state.adaptive.edges, np.float64)
  for step in range(3):
    batch = trainer.global_batch(step)
    # The same loss evaluation the step makes (its key: fold_in(base, step)).
    _, aux = _training_loss(model, state.params,
                            batch["image"].astype(jnp.int32),
                            jax.random.fold_in(base_key, step), state.adaptive)
    logsnr = np.float64(aux["logsnr"])
    loss = np.float64(aux["weighted_mse"])
    old = jax.device_get(state.adaptive)
    state, _ = step_fn(state, batch)
    new = jax.device_get(state.adaptive)
    index = np.clip(np.searchsorted(edges, logsnr, side="right") - 1, 0,
                    NUM_BINS - 1)
    hits = np.bincount(index, minlength=NUM_BINS)
    assert hits.sum() == 8                        # all inside [-12, 12]
    np.testing.assert_array_equal(new.count, old.count + hits)
    np.testing.assert_array_equal(new.edges, old.edges)
    changed = np.asarray(new.loss_ema) != np.asarray(old.loss_ema)
    np.testing.assert_array_equal(changed, hits > 0)
    expected = np.float64(old.loss_ema)
    for k in np.flatnonzero(hits):
      mean = loss[index == k].mean()
      expected[k] = mean if old.count[k] == 0 else (
          decay * expected[k] + (1 - decay) * mean)
    # rtol: float32 EMA and batch means (the step's own fused arithmetic).
    np.testing.assert_allclose(new.loss_ema, expected, rtol=1e-5)
    assert np.all(np.isfinite(new.loss_ema)) and np.all(new.loss_ema > 0)
  assert int(np.sum(new.count)) == 24


def _restore(trainer, workdir):
  ckpt = checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                               async_save=False)
  state, _, step = ckpt.restore_latest(trainer.init_state())
  ckpt.close()
  return step, jax.device_get(state)


@pytest.mark.slow
def test_adaptive_state_resumes_bit_identically(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  result_full = training_loop.train_and_evaluate(
      adaptive_config(training__num_steps=4), full)
  training_loop.train_and_evaluate(adaptive_config(training__num_steps=2),
                                   split)
  trainer = training_loop.Trainer(adaptive_config())
  step_half, half = _restore(trainer, split)
  result_split = training_loop.train_and_evaluate(
      adaptive_config(training__num_steps=4), split)   # resumes at 2
  step_a, state_a = _restore(trainer, full)
  step_b, state_b = _restore(trainer, split)
  assert (step_half, step_a, step_b) == (2, 4, 4)
  assert int(np.sum(half.adaptive.count)) == 2 * 8   # restored, not reset
  assert int(np.sum(state_a.adaptive.count)) == 4 * 8
  for a, b in zip(jax.tree.leaves((state_a.adaptive, state_a.params,
                                   state_a.ema_params, state_a.opt_state)),
                  jax.tree.leaves((state_b.adaptive, state_b.params,
                                   state_b.ema_params, state_b.opt_state))):
    np.testing.assert_array_equal(a, b)            # bit-identical
  assert result_split["bpd"] == result_full["bpd"]


# ==========================================================================
# Frechet distance (vdm.frechet), on random features, not the CNN.
# ==========================================================================


def _random_cov(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_identical_sets_is_zero_and_symmetric():
  rng = np.random.default_rng(0)
  feats_1 = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
  feats_2 = rng.normal(size=(200, 16)) * 2.0 + 1.0
  scale = np.trace(np.cov(feats_1, rowvar=False))
  assert frechet.frechet_distance_features(feats_1, feats_1) < 1e-9 * scale
  # Fewer samples than features: singular covariance, still ~0.
  few = rng.normal(size=(8, 16))
  assert frechet.frechet_distance_features(few, few) < 1e-9 * np.trace(
      np.cov(few, rowvar=False))
  d_12 = frechet.frechet_distance_features(feats_1, feats_2)
  d_21 = frechet.frechet_distance_features(feats_2, feats_1)
  assert d_12 > 1.0
  np.testing.assert_allclose(d_12, d_21, rtol=1e-10)


def test_frechet_matches_closed_forms():
  rng = np.random.default_rng(1)
  # Commuting (diagonal) covariances: sum_i (sqrt(a_i) - sqrt(b_i))^2.
  a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  m1, m2 = rng.normal(size=5), rng.normal(size=5)
  expected = np.sum((m1 - m2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  np.testing.assert_allclose(
      frechet.frechet_distance(m1, np.diag(a), m2, np.diag(b)), expected,
      rtol=1e-12)
  # Non-commuting 2x2: C1 C2 has eigenvalues l1, l2 >= 0, so
  # tr sqrt(C1 C2) = sqrt(l1) + sqrt(l2) = sqrt(tr(C1 C2) + 2 sqrt(det C1 C2)).
  c1, c2 = _random_cov(rng, 2), _random_cov(rng, 2)
  m1, m2 = rng.normal(size=2), rng.normal(size=2)
  trace_sqrt = np.sqrt(np.trace(c1 @ c2)
                       + 2 * np.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
  expected = (np.sum((m1 - m2)**2) + np.trace(c1) + np.trace(c2)
              - 2 * trace_sqrt)
  np.testing.assert_allclose(frechet.frechet_distance(m1, c1, m2, c2),
                             expected, rtol=1e-10)
  # From samples of those two Gaussians: the estimate converges to it.
  num = 200_000
  feats_1 = m1 + rng.normal(size=(num, 2)) @ np.linalg.cholesky(c1).T
  feats_2 = m2 + rng.normal(size=(num, 2)) @ np.linalg.cholesky(c2).T
  # Sampling error of means and covariances at N = 2e5: ~1% of the distance.
  np.testing.assert_allclose(
      frechet.frechet_distance_features(feats_1, feats_2), expected,
      rtol=0.03)


@pytest.mark.parametrize("call, match", [
    (lambda: frechet.frechet_distance_features(np.zeros((5, 3)),
                                               np.zeros((5, 4))),
     "feature sizes differ"),
    (lambda: frechet.frechet_distance_features(np.zeros((1, 3)),
                                               np.zeros((5, 3))),
     r"N >= 2; got shape \(1, 3\)"),
    (lambda: frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2),
                                      np.eye(2)), "one F"),
    (lambda: frechet.gaussian_stats(np.full((4, 2), np.nan)), "non-finite"),
])
def test_frechet_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_classifier_trains_saves_and_loads_identically(tmp_path):
  ds = input_pipeline.create("digits")
  extractor = frechet.train_classifier(ds, num_steps=60, batch_size=64,
                                       num_features=16, log=None)
  assert extractor.info["test_accuracy"] > 0.6    # chance is 0.1
  frechet.save_classifier(extractor, str(tmp_path))
  loaded = frechet.load_classifier(str(tmp_path))
  x = ds.read("test", np.arange(37))["image"]
  feats = extractor.features(x, batch_size=16)    # padded last chunk
  assert feats.shape == (37, 16) and feats.dtype == np.float64
  np.testing.assert_array_equal(loaded.features(x), feats)
  assert "NOT Inception FID" in loaded.info["note"]
  with pytest.raises(ValueError, match="takes images"):
    loaded.features(np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(FileNotFoundError, match="train_classifier.py"):
    frechet.load_classifier(str(tmp_path / "missing"))
