"""Tests for the K-draw ELBO eval: one draw is today's eval to the last bit;
K draws, in groups with stratified t, give their mean and a Monte Carlo
standard error that covers the truth."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import evaluate
from vdm import model as model_lib
from vdm import nets
from vdm import train
import nets_util

_NET = nets.get("mlp", hidden=16, num_res_blocks=1)
MODEL = model_lib.Model(net=_NET, data_shape=(8,), vocab_size=17,
                        schedule="fixed_linear")
PARAMS = MODEL.init(jax.random.key(0))
X = jax.random.randint(jax.random.key(1), (32, 8), 0, 17)
BATCH = {"image": X, "label": jnp.zeros((32,), jnp.int32),
         "mask": jnp.ones((32,), jnp.float32)}
KEY = jax.random.key(5)


# Independent t across the batch, so that the stratification across draws
# is the only one (the default low-discrepancy t over the batch already
# spreads a batch's times and leaves less for the draws to gain). Same net,
# so PARAMS serve it too.
INDEPENDENT_T = model_lib.Model(net=_NET, data_shape=(8,), vocab_size=17,
                                schedule="fixed_linear", antithetic=False)


def _step(num_draws, batch_index=0, *, model=MODEL, strata=1):
  return jax.device_get(jax.jit(lambda p, b: train.eval_step(
      p, b, jnp.int32(batch_index), model=model, eval_key=KEY,
      num_draws=num_draws, strata=strata))(PARAMS, BATCH))


def test_one_draw_is_the_single_draw_eval_and_draw_zero_of_k():
  one = _step(1)
  terms = MODEL.elbo_terms(PARAMS, X, None, jax.random.fold_in(KEY, 0))
  np.testing.assert_allclose(one["total"], float(jnp.sum(terms["total"])),
                             rtol=1e-6)
  many = _step(8)
  assert many["total_draws"].shape == (8,)
  np.testing.assert_allclose(many["total_draws"][0], one["total"], rtol=1e-6)
  np.testing.assert_allclose(many["total"], np.mean(many["total_draws"]),
                             rtol=1e-6)
  assert np.std(many["total_draws"]) > 0          # the draws differ


class _Split:
  name = "fake"

  def eval_batches(self, split, **kwargs):
    del split, kwargs
    yield {k: np.asarray(v) for k, v in BATCH.items()}

  def num_examples(self, split):
    del split
    return 32

  def num_eval_examples(self, split, limit=None):
    return min(self.num_examples(split), limit or 32)


def test_standard_error_covers_a_many_draw_reference():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  step = train.make_eval_step(MODEL, eval_seed=5,
                              params_sharding=None, mesh=mesh,
                              num_draws=8)
  result = evaluate.evaluate_split(step, PARAMS, _Split(), split="test",
                                   batch_size=32, mesh=mesh, num_dims=8)
  assert result["num_draws"] == 8 and result["bpd_se"] > 0
  # Reference: the mean of 128 further independent draws.
  keys = jax.random.split(jax.random.key(77), 128)
  ref = jax.jit(jax.vmap(lambda k: jnp.sum(
      MODEL.elbo_terms(PARAMS, X, None, k)["total"])))(keys)
  ref_bpd = float(jnp.mean(ref)) / (32 * 8 * math.log(2))
  assert abs(result["bpd"] - ref_bpd) < 4 * result["bpd_se"]
  single = evaluate.evaluate_split(
      train.make_eval_step(MODEL, eval_seed=5, params_sharding=None,
                           mesh=mesh),
      PARAMS, _Split(), split="test", batch_size=32, mesh=mesh, num_dims=8)
  assert single["num_draws"] == 1 and single["bpd_se"] is None



def test_draws_are_listed_and_paired_across_models():
  """'bpd_draws' holds each draw's bpd of the split ('bpd' is their mean,
  'bpd_se' their standard error); draw k's keys do not depend on the
  model, so two models' lists are paired (common random numbers)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  step = train.make_eval_step(MODEL, eval_seed=5, params_sharding=None,
                              mesh=mesh, num_draws=4)
  key = jax.random.fold_in(jax.random.key(5), 0)     # batch 0
  keys = [key] + [jax.random.fold_in(key, k) for k in range(1, 4)]
  to_bpd = 1 / (32 * 8 * math.log(2))
  for params in (PARAMS, nets_util.perturb(PARAMS, 3)):
    result = evaluate.evaluate_split(step, params, _Split(), split="test",
                                     batch_size=32, mesh=mesh, num_dims=8)
    draws = np.asarray(result["bpd_draws"])
    assert draws.shape == (4,)
    assert result["bpd"] == pytest.approx(draws.mean(), rel=1e-6)
    assert result["bpd_se"] == pytest.approx(draws.std(ddof=1) / 2, rel=1e-6)
    direct = [float(jnp.sum(MODEL.elbo_terms(params, X, None, k)["total"]))
              * to_bpd for k in keys]
    np.testing.assert_allclose(draws, direct, rtol=1e-5)

def test_conditional_eval_is_marked_and_reports_the_null_label_bpd():
  """-log p(x | y) is marked conditional; with label dropout the null
  label's -log p(x) comes too, on the same draws."""
  net = nets.get("mlp", hidden=16, num_res_blocks=1, num_classes=3)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  batch = dict(BATCH, label=jnp.arange(32, dtype=jnp.int32) % 3)

  class Split(_Split):
    def eval_batches(self, split, **kwargs):
      del split, kwargs
      yield {k: np.asarray(v) for k, v in batch.items()}

  for p_uncond in (0.0, 0.2):
    model = model_lib.Model(net=net, data_shape=(8,), vocab_size=17,
                            schedule="fixed_linear", num_classes=3,
                            p_uncond=p_uncond)
    params = nets_util.perturb(model.init(jax.random.key(0)), 3)
    step = train.make_eval_step(model, eval_seed=5, params_sharding=None,
                                mesh=mesh, num_draws=2)
    result = evaluate.evaluate_split(step, params, Split(), split="test",
                                     batch_size=32, mesh=mesh, num_dims=8,
                                     conditional=True)
    assert result["conditional"] is True
    if p_uncond == 0:
      assert "bpd_uncond" not in result
      continue
    key = jax.random.fold_in(jax.random.key(5), 0)
    to_bpd = 1 / (32 * 8 * math.log(2))
    cond = model.elbo_terms(params, X, batch["label"], key)["total"]
    uncond = model.elbo_terms(params, X, None, key)["total"]
    # Draw 0 of 2 (the draws' mean is the result): same key for both.
    assert result["bpd_uncond_se"] > 0
    step_sums = jax.device_get(jax.jit(lambda p, b: train.eval_step(
        p, b, jnp.int32(0), model=model, eval_key=jax.random.key(5),
        num_draws=2))(params, batch))
    np.testing.assert_allclose(step_sums["uncond_total_draws"][0],
                               float(jnp.sum(uncond)), rtol=1e-5)
    np.testing.assert_allclose(step_sums["total_draws"][0],
                               float(jnp.sum(cond)), rtol=1e-5)
    assert float(jnp.sum(uncond)) != float(jnp.sum(cond))
    assert result["bpd_uncond"] == pytest.approx(
        float(np.mean(step_sums["uncond_total_draws"])) * to_bpd, rel=1e-6)


# Draws in groups with stratified times: each draw is still unbiased, the
# groups are i.i.d. and give the standard error.


def test_draws_use_stratified_times_and_their_own_noise():
  sums = _step(8, model=INDEPENDENT_T, strata=4)
  key = jax.random.fold_in(KEY, 0)
  keys = [key] + [jax.random.fold_in(key, k) for k in range(1, 8)]
  expected = []
  for k in range(8):
    t_first = INDEPENDENT_T.elbo_times(keys[k - k % 4], 32)
    t = jnp.mod(t_first + (k % 4) / 4, 1.0)
    expected.append(float(jnp.sum(
        INDEPENDENT_T.elbo_terms(PARAMS, X, None, keys[k], t)["total"])))
  np.testing.assert_allclose(sums["total_draws"], expected, rtol=1e-5)
  np.testing.assert_allclose(
      sums["total_groups"], np.reshape(expected, (2, 4)).mean(axis=1),
      rtol=1e-5)
  # Draw 0 is the single-draw eval; strata=1 gives independent draws.
  np.testing.assert_allclose(sums["total_draws"][0],
                             _step(1, model=INDEPENDENT_T, strata=4)["total"],
                             rtol=1e-6)
  independent = _step(8, model=INDEPENDENT_T)
  np.testing.assert_allclose(independent["total_draws"], [
      float(jnp.sum(INDEPENDENT_T.elbo_terms(PARAMS, X, None, k)["total"]))
      for k in keys], rtol=1e-5)
  np.testing.assert_allclose(independent["total_groups"],
                             independent["total_draws"], rtol=1e-6)


def test_stratified_groups_have_lower_variance_than_independent_draws():
  stratified = _step(256, model=INDEPENDENT_T,
                     strata=4)["total_groups"]           # 64 groups of 4
  independent = _step(256, model=INDEPENDENT_T)["total_draws"]   # 256 draws
  # Both estimate the same expectation ...
  assert abs(stratified.mean() - independent.mean()) < 4 * math.sqrt(
      stratified.var(ddof=1) / 64 + independent.var(ddof=1) / 256)
  # ... and a group of 4 stratified draws beats the mean of 4 independent.
  ratio = stratified.var(ddof=1) / (independent.var(ddof=1) / 4)
  assert ratio < 0.5, ratio


@pytest.mark.parametrize("num_draws,strata", [(6, 4), (4, 0), (2, 1.5)])
def test_draws_must_fill_whole_groups(num_draws, strata):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="strata="):
    train.make_eval_step(INDEPENDENT_T, eval_seed=5, params_sharding=None,
                         mesh=mesh, num_draws=num_draws, strata=strata)


def test_standard_error_comes_from_the_groups():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  step = train.make_eval_step(INDEPENDENT_T, eval_seed=5, params_sharding=None,
                              mesh=mesh, num_draws=8, strata=4)
  result = evaluate.evaluate_split(step, PARAMS, _Split(), split="test",
                                   batch_size=32, mesh=mesh, num_dims=8)
  to_bpd = 1 / (32 * 8 * math.log(2))
  groups = np.asarray(_step(8, model=INDEPENDENT_T,
                            strata=4)["total_groups"]) * to_bpd
  assert result["num_draws"] == 8 and result["num_groups"] == 2
  np.testing.assert_allclose(result["bpd_groups"], groups, rtol=1e-5)
  assert result["bpd"] == pytest.approx(groups.mean(), rel=1e-5)
  assert result["bpd_se"] == pytest.approx(
      groups.std(ddof=1) / math.sqrt(2), rel=1e-4)
