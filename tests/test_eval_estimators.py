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


@pytest.fixture(scope="module")
def briefly_trained():
  """A toy2d model after 40 steps, and a Trainer evaluating it by 'both'."""
  trainer = training_loop.Trainer(_toy_config(
      estimator="both", num_draws=2, strata=1, ode_rtol=1e-3, ode_atol=1e-3))
  state = trainer.init_state()
  for step in range(trainer.config.training.num_steps):
    state, _ = trainer.train_step(state, trainer.global_batch(step))
  return trainer, state.ema_params, trainer.evaluate(state.ema_params)


def test_ode_bpd_of_a_briefly_trained_toy_model_is_finite_with_nfe(
    briefly_trained):
  trainer, params, result = briefly_trained
  assert result["estimator"] == "both" and result["num_examples"] == 2000
  assert result["ode_num_examples"] == 2000
  assert math.isfinite(result["bpd_ode"]) and result["bpd_ode_se"] > 0
  assert result["nfe"] >= 7 and result["nfe"] == int(result["nfe"])
  assert result["dequantization"] == "truncated_normal"
  assert result["ode_num_draws"] == 1 and result["ode_num_probes"] == 1
  assert result["ode_error_norm"] == "separate" and result["ode_rtol"] == 1e-3
  assert result["num_draws"] == 2 and result["bpd_se"] > 0
  # Both bound log P(x) <= 0 from below: bits/dim > 0. (A 40-step model is
  # still near its init: measured 9.06 by the ELBO and 8.39 by the ODE.)
  assert result["bpd_ode"] > 0 and result["bpd"] > 0
  # The paired difference: on the same examples and batches the ODE step's
  # ELBO draws are the ELBO eval's, so it is the difference of the two
  # means, computed per example on another path.
  np.testing.assert_allclose(result["bpd_ode_minus_elbo"],
                             result["bpd_ode"] - result["bpd"], rtol=1e-5)
  # (Its error holds the ELBO's Monte Carlo noise per example: large for
  # this near-init toy model with 2 draws, small against the spread over
  # images of a trained image model, where pairing pays.)
  assert result["bpd_ode_minus_elbo_se"] > 0
  assert "bpd_ode_estimate" not in result     # the ODE saw every example
  # N of the examples (config.eval.num_examples), spread over the split:
  # the same bpd as the eval step on a batch of every other example.
  subset = evaluate.evaluate_split(
      trainer.eval_step, params, trainer.ds, split="test",
      batch_size=1000, mesh=trainer.mesh, num_dims=2, limit=1000)
  assert subset["num_examples"] == 1000
  rows = trainer.ds.read("test", np.arange(0, 2000, 2))
  batch = {"image": rows["image"], "label": rows["label"],
           "mask": np.ones(1000, bool)}
  sums = trainer.eval_step(params, parallel.shard_batch(trainer.mesh, batch),
                           jax.numpy.asarray(0, jax.numpy.int32))
  np.testing.assert_allclose(
      subset["bpd"], float(sums["total"]) / (1000 * 2 * math.log(2)),
      rtol=1e-6)


def test_the_ode_on_a_subset_estimates_the_whole_split(briefly_trained):
  trainer, params, full = briefly_trained
  config = _toy_config(estimator="both", num_draws=2, strata=1,
                       ode_rtol=1e-3, ode_atol=1e-3, ode_num_examples=400)
  config.training.eval_batch_size = 400
  result = training_loop.Trainer(config).evaluate(params)
  assert result["num_examples"] == 2000 and result["ode_num_examples"] == 400
  # ELBO over the split + the mean paired difference over the subset.
  np.testing.assert_allclose(
      result["bpd_ode_estimate"],
      result["bpd"] + result["bpd_ode_minus_elbo"], rtol=1e-12)
  se = result["bpd_ode_estimate_se"]
  np.testing.assert_allclose(se, math.hypot(result["bpd_ode_minus_elbo_se"],
                                            result["bpd_se"]), rtol=1e-12)
  # It agrees with the ODE over every example (other draws, other batches)
  # within the two errors.
  assert abs(result["bpd_ode_estimate"] - full["bpd_ode"]) < 4 * math.hypot(
      se, full["bpd_ode_se"])


@pytest.mark.parametrize("field,value,match", [
    ("estimator", "exact", "one of elbo, ode, both"),
    ("num_draws", 0, "an int > 0"),
    ("dequantization", "gaussian", "'uniform' or 'truncated_normal'"),
    ("ode_rtol", 0.0, r"a float in \(0, 1\)"),
    ("num_examples", -1, r"an int >= 0 \(0: the whole split"),
    ("ode_num_examples", -1, r"an int >= 0 \(0: the examples of"),
    ("num_draws", 6, r"1 or a multiple of eval.strata=4"),
    ("strata", 0, "an int > 0"),
    ("ode_num_probes", 0, "an int > 0"),
    ("ode_error_norm", "rms", "'separate' .* or 'joint'"),
])
def test_eval_fields_are_validated(field, value, match):
  config = _toy_config(**{field: value})
  with pytest.raises(ValueError, match=f"config.eval.{field}=.*{match}"):
    config_lib.validate(config)


def test_an_ode_subset_needs_the_elbo_over_the_whole_split():
  config = _toy_config(num_examples=100, ode_num_examples=50)
  with pytest.raises(ValueError, match=r"config.eval.ode_num_examples=50.*"
                     r"0 while eval.num_examples=100.*num_examples=0"):
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
  probes = _toy_config(estimator="ode", ode_num_draws=4, ode_num_probes=2)
  assert config_lib.eval_output(probes, "test", 10)[0] != name
  assert "eval" not in config_lib.eval_output(default, "test", 10)[1]
  config_lib.check_changes(default, ode, "/tmp/run")   # no error


def test_a_subset_eval_is_named_and_older_runs_take_new_eval_fields(tmp_path):
  name, record = config_lib.eval_output(_toy_config(num_examples=100),
                                        "test", 10)
  assert name.startswith("test_subset100_10_ema_elbo_seed1_")
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


def test_the_summary_prints_the_ode_its_paired_difference_and_estimate(
    capsys):
  from vdm import main  # pylint: disable=g-import-not-at-top
  config = _toy_config()
  config.training.report_baselines = False
  ds = ml_collections.ConfigDict(dict(name="toy2d", vocab_size=256,
                                      shape=(2,)))
  result = {"bpd": 1.0972, "bpd_se": 0.0017, "num_draws": 16,
            "num_groups": 4, "num_examples": 1000, "bpd_recon": 0.005,
            "bpd_prior": 0.004, "bpd_diff": 1.088, "bpd_ode": 1.089,
            "bpd_ode_se": 0.0305, "ode_num_examples": 100, "nfe": 465.4,
            "dequantization": "truncated_normal",
            "bpd_ode_minus_elbo": -0.0248, "bpd_ode_minus_elbo_se": 0.0178,
            "bpd_ode_estimate": 1.0724, "bpd_ode_estimate_se": None}
  main.print_summary(ds, config, result, "/tmp/run")
  out = capsys.readouterr().out
  assert ("ODE (truncated_normal dequantisation, 100 examples): 1.0890 +- "
          "0.0305, 465 network evaluations per batch") in out
  assert "ODE minus ELBO, paired on those examples: -0.0248 +- 0.0178" in out
  assert ("ODE over all 1000 examples, ELBO + that difference: 1.0724 "
          "(error unknown: one group of ELBO draws)") in out
