"""config.eval: the ELBO with K draws, the probability-flow ODE, or both,
over the whole split (training_loop.Trainer.evaluate)."""
import math

import jax
import ml_collections
import pytest

import numpy as np

from vdm import config_files
from vdm import config_lib
from vdm import evaluate
from vdm import parallel
from vdm import stored_config
from vdm import training_loop


def _toy_config(**eval_fields):
  config = config_files.get_config("configs/toy2d.py")
  config.model.net_kwargs = ml_collections.ConfigDict(
      dict(hidden=32, num_res_blocks=1, dropout=0.0, dtype="float32"))
  config.training.num_steps = 40
  config.training.num_devices = 1
  config.training.eval_batch_size = 1000
  config.eval.update(eval_fields)
  return config


def test_ode_bpd_of_a_briefly_trained_toy_model_is_finite_with_nfe():
  trainer = training_loop.Trainer(_toy_config(
      estimator="both", num_draws=2, strata=1, ode_rtol=1e-3, ode_atol=1e-3))
  state = trainer.init_state()
  for step in range(trainer.config.training.num_steps):
    state, _ = trainer.train_step(state, trainer.global_batch(step))
  result = trainer.evaluate(state.ema_params)
  assert result["estimator"] == "both" and result["num_examples"] == 2000
  assert math.isfinite(result["bpd_ode"]) and result["bpd_ode_se"] > 0
  assert result["nfe"] >= 7 and result["nfe"] == int(result["nfe"])
  assert result["dequantization"] == "truncated_normal"
  assert result["num_draws"] == 2 and result["bpd_se"] > 0
  # Both bound log P(x) <= 0 from below: bits/dim > 0. (A 40-step model is
  # still near its init: measured 9.06 by the ELBO and 8.39 by the ODE.)
  assert result["bpd_ode"] > 0 and result["bpd"] > 0
  # The first N examples (config.eval.num_examples): with N one eval batch,
  # exactly the full eval's first batch (same keys: batch 0 of the split).
  head = evaluate.evaluate_split(
      trainer.eval_step, state.ema_params, trainer.ds, split="test",
      batch_size=1000, mesh=trainer.mesh, num_dims=2, limit=1000)
  assert head["num_examples"] == 1000
  batch = next(trainer.ds.eval_batches("test", batch_size=1000))
  sums = trainer.eval_step(state.ema_params, parallel.shard_batch(trainer.mesh, batch),
                           jax.numpy.asarray(0, jax.numpy.int32))
  np.testing.assert_allclose(
      head["bpd"], float(sums["total"]) / (1000 * 2 * math.log(2)),
      rtol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("estimator", "exact", "one of elbo, ode, both"),
    ("num_draws", 0, "an int > 0"),
    ("dequantization", "gaussian", "'uniform' or 'truncated_normal'"),
    ("ode_rtol", 0.0, r"a float in \(0, 1\)"),
    ("num_examples", -1, r"an int >= 0 \(0: the whole split"),
    ("num_draws", 6, r"1 or a multiple of eval.strata=4"),
    ("strata", 0, "an int > 0"),
])
def test_eval_fields_are_validated(field, value, match):
  config = _toy_config(**{field: value})
  with pytest.raises(ValueError, match=f"config.eval.{field}=.*{match}"):
    config_lib.validate(config)


def test_eval_settings_name_the_eval_file_and_may_change_on_a_run():
  # The library's default eval (one draw) keeps the names evals had before
  # the eval options existed; the configs' 16 draws are a setting.
  default = _toy_config(num_draws=1)
  assert config_lib.eval_options(default) == config_lib.EVAL_DEFAULTS
  ode = _toy_config(estimator="ode", ode_num_draws=4)
  name, record = config_lib.eval_output(ode, "test", 10)
  assert name.startswith("test_10_ema_ode_seed1_")
  assert record["eval"]["ode_num_draws"] == 4
  assert "eval" not in config_lib.eval_output(default, "test", 10)[1]
  config_lib.check_changes(default, ode, "/tmp/run")   # no error


def test_a_subset_eval_is_named_and_older_runs_take_new_eval_fields(tmp_path):
  name, record = config_lib.eval_output(_toy_config(num_examples=100),
                                        "test", 10)
  assert name.startswith("test_first100_10_ema_elbo_seed1_")
  assert record["eval"]["num_examples"] == 100
  # A run stored before eval.num_examples existed: its config gets the
  # field, so --config.eval.num_examples=... applies to it.
  old = _toy_config()
  del old.eval["num_examples"]
  config_lib.write_once(old, str(tmp_path))
  loaded = stored_config.get_config(str(tmp_path / config_lib.CONFIG_FILE))
  assert loaded.eval.num_examples == 0
  config_lib.check_changes(config_lib.load_run_config(str(tmp_path)),
                           loaded, str(tmp_path))      # no error
