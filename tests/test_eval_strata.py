"""The K-draw ELBO eval with stratified times: draws come in groups whose
t are spread evenly over [0, 1) per example; each draw is still unbiased,
the groups are i.i.d. and give the standard error."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import evaluate
from vdm import model as model_lib
from vdm import nets
from vdm import train

_NET = nets.get("mlp", hidden=16, num_res_blocks=1)
# Independent t across the batch, so that the stratification across draws
# is the only one (the default low-discrepancy t over the batch already
# spreads a batch's times and leaves less for the draws to gain).
MODEL = model_lib.Model(net=_NET, data_shape=(8,), vocab_size=17,
                        schedule="fixed_linear", antithetic=False)
PARAMS = MODEL.init(jax.random.key(0))
X = jax.random.randint(jax.random.key(1), (32, 8), 0, 17)
BATCH = {"image": X, "label": jnp.zeros((32,), jnp.int32),
         "mask": jnp.ones((32,), jnp.float32)}
KEY = jax.random.key(5)


def _step(num_draws, strata):
  return jax.device_get(jax.jit(lambda p, b: train.eval_step(
      p, b, jnp.int32(0), model=MODEL, eval_key=KEY, num_draws=num_draws,
      strata=strata))(PARAMS, BATCH))


def test_draws_use_stratified_times_and_their_own_noise():
  sums = _step(8, 4)
  key = jax.random.fold_in(KEY, 0)
  keys = [key] + [jax.random.fold_in(key, k) for k in range(1, 8)]
  expected = []
  for k in range(8):
    t_first = MODEL.elbo_times(keys[k - k % 4], 32)
    t = jnp.mod(t_first + (k % 4) / 4, 1.0)
    expected.append(float(jnp.sum(
        MODEL.elbo_terms(PARAMS, X, None, keys[k], t)["total"])))
  np.testing.assert_allclose(sums["total_draws"], expected, rtol=1e-5)
  np.testing.assert_allclose(
      sums["total_groups"], np.reshape(expected, (2, 4)).mean(axis=1),
      rtol=1e-5)
  # Draw 0 is the single-draw eval; strata=1 gives independent draws.
  np.testing.assert_allclose(sums["total_draws"][0], _step(1, 4)["total"],
                             rtol=1e-6)
  independent = _step(8, 1)
  np.testing.assert_allclose(independent["total_draws"], [
      float(jnp.sum(MODEL.elbo_terms(PARAMS, X, None, k)["total"]))
      for k in keys], rtol=1e-5)
  np.testing.assert_allclose(independent["total_groups"],
                             independent["total_draws"], rtol=1e-6)


def test_stratified_groups_have_lower_variance_than_independent_draws():
  stratified = _step(256, 4)["total_groups"]            # 64 groups of 4
  independent = _step(256, 1)["total_draws"]            # 256 single draws
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
    train.make_eval_step(MODEL, eval_seed=5, params_sharding=None, mesh=mesh,
                         num_draws=num_draws, strata=strata)


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


def test_standard_error_comes_from_the_groups():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  step = train.make_eval_step(MODEL, eval_seed=5, params_sharding=None,
                              mesh=mesh, num_draws=8, strata=4)
  result = evaluate.evaluate_split(step, PARAMS, _Split(), split="test",
                                   batch_size=32, mesh=mesh, num_dims=8)
  to_bpd = 1 / (32 * 8 * math.log(2))
  groups = np.asarray(_step(8, 4)["total_groups"]) * to_bpd
  assert result["num_draws"] == 8 and result["num_groups"] == 2
  np.testing.assert_allclose(result["bpd_groups"], groups, rtol=1e-5)
  assert result["bpd"] == pytest.approx(groups.mean(), rel=1e-5)
  assert result["bpd_se"] == pytest.approx(
      groups.std(ddof=1) / math.sqrt(2), rel=1e-4)
