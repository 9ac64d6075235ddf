"""Tests for the K-draw ELBO eval: one draw is today's eval to the last bit;
K draws give their mean and a Monte Carlo standard error that covers the
truth."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from vdm import evaluate
from vdm import model as model_lib
from vdm import nets
from vdm import train

_NET = nets.get("mlp", hidden=16, num_res_blocks=1)
MODEL = model_lib.Model(net=_NET, data_shape=(8,), vocab_size=17,
                        schedule="fixed_linear")
PARAMS = MODEL.init(jax.random.key(0))
X = jax.random.randint(jax.random.key(1), (32, 8), 0, 17)
BATCH = {"image": X, "label": jnp.zeros((32,), jnp.int32),
         "mask": jnp.ones((32,), jnp.float32)}
KEY = jax.random.key(5)


def _step(num_draws, batch_index=0):
  return jax.device_get(jax.jit(lambda p, b: train.eval_step(
      p, b, jnp.int32(batch_index), model=MODEL, eval_key=KEY,
      num_draws=num_draws))(PARAMS, BATCH))


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
