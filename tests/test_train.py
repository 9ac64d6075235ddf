"""The training system end to end on tiny configs (digits, 8x8)."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest

from vdm import checkpointing
from vdm import config_lib
from vdm import runtime
from vdm import train
from vdm import training_loop
import tiny_config as tiny_config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """tests/tiny_config.py with `group__field=value` overrides."""
  config = tiny_config_lib.get_config()
  for name, value in overrides.items():
    group, field = name.split("__")
    config[group][field] = value
  return config


def final_params(workdir):
  """Params of the newest checkpoint in WORKDIR as numpy."""
  trainer = training_loop.Trainer(tiny_config())
  ckpt = checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                               async_save=False)
  state, _, step = ckpt.restore_latest(trainer.init_state())
  ckpt.close()
  return step, jax.device_get(state.params), jax.device_get(state.ema_params)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 6-step run (final eval on, samples and plots on)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = training_loop.train_and_evaluate(tiny_config(), workdir)
  return workdir, result


def test_run_writes_eval_json_samples_plots_and_events(reference_run):
  workdir, result = reference_run
  name, _ = config_lib.eval_output(tiny_config(), "test", 6)
  with open(os.path.join(workdir, "eval", f"{name}.json")) as f:
    record = json.load(f)
  assert record["num_examples"] == 359          # the whole split, padded
  assert record["step"] == 6
  for key in ("bpd", "bpd_recon", "bpd_prior", "bpd_diff"):
    assert np.isfinite(record[key])
  np.testing.assert_allclose(
      record["bpd"], record["bpd_recon"] + record["bpd_prior"] +
      record["bpd_diff"], rtol=1e-5)
  assert record["bpd"] == result["bpd"]
  assert "dataset_version" in record
  stem = config_lib.sample_output(tiny_config(), 6)
  assert os.path.exists(os.path.join(workdir, "samples", f"{stem}.png"))
  assert os.path.exists(os.path.join(workdir, "samples", f"{stem}.npz"))
  assert os.path.exists(os.path.join(workdir, "plots", "schedule_6.png"))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["dataset"] == "digits"


def test_eval_is_deterministic_to_the_bit(reference_run):
  workdir, result = reference_run
  trainer = training_loop.Trainer(tiny_config())
  ckpt = checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                               async_save=False)
  state, _, _ = ckpt.restore_latest(trainer.init_state())
  ckpt.close()
  again = trainer.evaluate(state.ema_params)
  assert again["bpd"] == result["bpd"]
  assert again["num_examples"] == 359


_KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from vdm import checkpointing, training_loop
    import tiny_config
    original = checkpointing.Manager.save
    def save_then_die(self, step, *args, **kwargs):
      out = original(self, step, *args, **kwargs)
      if step == 4:   # right after starting the (async) save of step 4
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    checkpointing.Manager.save = save_then_die
    training_loop.train_and_evaluate(tiny_config.get_config(), {workdir!r})
""")


def test_resume_after_kill_9_is_bit_identical(reference_run, tmp_path):
  reference_dir, _ = reference_run
  workdir = str(tmp_path / "killed")
  code = _KILL_DRIVER.format(repo=REPO, tests=os.path.join(REPO, "tests"),
                             workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(s.startswith("2") for s in steps), steps
  training_loop.train_and_evaluate(tiny_config(), workdir)   # resumes, finishes
  step_a, params_a, ema_a = final_params(reference_dir)
  step_b, params_b, ema_b = final_params(workdir)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves((params_a, ema_a)),
                  jax.tree.leaves((params_b, ema_b))):
    np.testing.assert_array_equal(a, b)   # bit-identical


def test_non_finite_loss_stops_and_saves_nothing_bad(tmp_path):
  config = tiny_config(optimizer__learning_rate=1e12,
                       optimizer__grad_clip=0.0, optimizer__warmup_steps=0,
                       training__num_steps=40, training__log_every=1,
                       training__checkpoint_every=1)
  with pytest.raises(RuntimeError, match=r"non-finite .* between steps"):
    training_loop.train_and_evaluate(config, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  # The error left after every async save in flight was complete on disk.
  assert not [s for s in os.listdir(ckpt_dir) if "tmp" in s]
  saved = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  trainer = training_loop.Trainer(config)
  ckpt = checkpointing.Manager(str(ckpt_dir), async_save=False)
  restored = ckpt.restore_latest(trainer.init_state())
  ckpt.close()
  if restored is not None:     # every saved state is finite
    state = restored[0]
    for leaf in jax.tree.leaves(jax.device_get(state.params)):
      assert np.all(np.isfinite(leaf))
    assert restored[2] == max(saved)


def test_checkpoint_of_another_architecture_is_a_clear_error(reference_run):
  workdir, _ = reference_run
  config = tiny_config(training__num_steps=8)
  config.model.net_kwargs.hidden = 48
  with pytest.raises(ValueError, match="different"):
    training_loop.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("field, value, match", [
    ("data.dataset", "mnist", "data.dataset"),
    ("model.net", "resnet", "model.net"),
    ("training.num_steps", 0, "training.num_steps"),
    ("training.batch_size", -4, "training.batch_size"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate"),
    ("optimizer.ema_decay", 1.0, "optimizer.ema_decay"),
    ("model.gamma_min", 6.0, "model.gamma_min"),
    ("sampling.sampler", "euler", "sampling.sampler"),
])
def test_bad_config_is_rejected_before_compiling(field, value, match):
  config = tiny_config()
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_unknown_weighting_and_schedule_names_are_rejected():
  with pytest.raises(ValueError, match="unknown weighting"):
    training_loop.Trainer(tiny_config(model__weighting="l2"))
  with pytest.raises(ValueError, match="unknown schedule"):
    training_loop.Trainer(tiny_config(model__schedule="quadratic"))


def test_batch_not_divisible_by_devices_is_rejected():
  config = tiny_config(training__batch_size=6, training__num_devices=4)
  with pytest.raises(ValueError, match="divisible"):
    training_loop.Trainer(config)


def test_sample_cli_writes_png_of_expected_size(reference_run):
  workdir, _ = reference_run
  cmd = [sys.executable, "-m", "vdm.main", "--config=tests/tiny_config.py",
         f"--workdir={workdir}", "--mode=sample",
         "--config.sampling.num_samples=9"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stem = config_lib.sample_output(tiny_config(sampling__num_samples=9), 6)
  image = matplotlib.image.imread(os.path.join(workdir, "samples",
                                               f"{stem}.png"))
  # 9 samples of 8x8 -> a 3x3 grid with 1-pixel gaps: 3 * 9 - 1 = 26 pixels,
  # enlarged by the smallest integer factor reaching 256 px: 10 -> 260.
  assert image.shape[:2] == (260, 260)
  # Gray data is saved as gray: each 10x10 block holds one value.
  blocks = image[..., 0] if image.ndim == 3 else image
  assert image.ndim == 2 or image.shape[2] in (1, 2)
  np.testing.assert_array_equal(blocks, np.repeat(np.repeat(
      blocks[::10, ::10], 10, axis=0), 10, axis=1))
  assert np.load(os.path.join(workdir, "samples", f"{stem}.npz"))[
      "samples"].shape == (9, 8, 8, 1)


def test_bad_compute_dtype_names_the_field():
  config = tiny_config()
  config.model.net_kwargs.dtype = "bfloat61"
  with pytest.raises(ValueError, match="model.net_kwargs.dtype"):
    config_lib.validate(config)


def test_weight_decay_skips_biases_and_the_schedule():
  trainer = training_loop.Trainer(tiny_config())
  params = trainer.abstract_state.params
  mask = train.weight_decay_mask(params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  names = {jax.tree_util.keystr(path): value for path, value in flat}
  assert not any(v for k, v in names.items() if "schedule" in k)
  assert not any(v for k, v in names.items() if k.endswith("['bias']"))
  assert any(v for k, v in names.items() if k.endswith("['kernel']"))


def test_step_factory_uses_the_documented_key():
  # The loop's step comes from train.make_train_step; a step compiled by hand
  # from train.train_step with the documented key fold_in(key(seed), 1) and
  # the same shardings gives the same state and metrics to the bit, and
  # another key (e.g. key(1), which the benchmarks once used) does not.
  config = tiny_config()
  trainer = training_loop.Trainer(config)
  batch = trainer.global_batch(0)
  repl = jax.sharding.NamedSharding(trainer.mesh,
                                    jax.sharding.PartitionSpec())

  def by_hand(base_key):
    step = runtime.jit(
        functools.partial(
            train.train_step, model=trainer.model, base_key=base_key,
            ema_decay=config.optimizer.ema_decay,
            adaptive_decay=config.model.adaptive_decay,
            learning_rate_fn=trainer.learning_rate_fn),
        in_shardings=(trainer.state_sharding, trainer.batch_sharding),
        out_shardings=(trainer.state_sharding, repl))
    return jax.device_get(step(trainer.init_state(), batch))

  documented = jax.random.fold_in(jax.random.key(config.training.seed), 1)
  expected = by_hand(documented)
  got = jax.device_get(trainer.train_step(trainer.init_state(), batch))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  other = by_hand(jax.random.key(1))
  assert other[1]["loss"] != expected[1]["loss"]


# ------------------------------------------------- gradient accumulation


def _quadratic_loss(params, inputs, key):
  """A loss without random draws: K micro-batches must give one batch's."""
  del key
  x, y = inputs
  per_example = jnp.sum(jnp.square(jnp.tanh(x @ params["w"] + params["b"])
                                   - y), axis=-1)           # [n]
  return jnp.mean(per_example), {"per_example": per_example}


@pytest.mark.parametrize("num_micro", [1, 2, 4, 8])
def test_accumulated_gradient_equals_the_one_batch_gradient(num_micro):
  rs = np.random.RandomState(0)
  params = {"w": jnp.asarray(rs.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rs.normal(size=3), jnp.float32)}
  inputs = (jnp.asarray(rs.normal(size=(8, 5)), jnp.float32),
            jnp.asarray(rs.normal(size=(8, 3)), jnp.float32))
  key = jax.random.key(0)
  want = jax.jit(jax.value_and_grad(_quadratic_loss, has_aux=True))(
      params, inputs, key)
  got = jax.jit(functools.partial(train.accumulated_value_and_grad,
                                  _quadratic_loss,
                                  num_micro_batches=num_micro))(
                                      params, inputs, key=key)
  if num_micro == 1:
    # The same program as without accumulation: equal to the bit.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  else:
    # Not to the bit: the batch mean becomes a mean of K partial means (and
    # the gradient a sum of K partial sums), another rounding order; float32
    # rounding of 8 terms of size ~1 bounds the difference by ~1e-6.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
  # Per-example outputs come back in the batch's order.
  np.testing.assert_allclose(got[0][1]["per_example"],
                             want[0][1]["per_example"], rtol=1e-6)


def test_accumulation_rejects_a_count_that_does_not_divide_the_batch():
  inputs = (jnp.zeros((8, 5)), jnp.zeros((8, 3)))
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match="num_micro_batches=3 must be"):
    train.accumulated_value_and_grad(_quadratic_loss, params, inputs,
                                     jax.random.key(0), 3)
  for bad, match in ((3, "a divisor of training.batch_size=8"),
                     (0, "an int > 0")):
    with pytest.raises(ValueError, match=match):
      config_lib.validate(tiny_config(training__grad_accum_steps=bad))


def test_accumulating_step_advances_counters_once_and_resumes_exactly():
  # Batch 8 as 4 micro-batches of 2: one optimizer step, one EMA update and
  # step + 1 per batch; and a resumed run (state through the host, as a
  # checkpoint restore) takes the next step to the bit.
  trainer = training_loop.Trainer(tiny_config(training__grad_accum_steps=4))
  init = trainer.init_state()
  ema_0 = jax.device_get(init.ema_params)
  state_1, metrics = trainer.train_step(init, trainer.global_batch(0))
  assert int(state_1.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  decay = float(train.ema_decay_at(jnp.zeros((), jnp.int32),
                                   trainer.config.optimizer.ema_decay))
  params_1 = jax.device_get(state_1.params)
  for e0, p1, e1 in zip(jax.tree.leaves(ema_0), jax.tree.leaves(params_1),
                        jax.tree.leaves(jax.device_get(state_1.ema_params))):
    np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * p1, rtol=1e-6,
                               atol=1e-7)
  host = jax.device_get(state_1)
  restored = jax.device_put(host, trainer.state_sharding)
  straight, m_straight = trainer.train_step(state_1, trainer.global_batch(1))
  resumed, m_resumed = trainer.train_step(restored, trainer.global_batch(1))
  assert int(straight.step) == 2
  for a, b in zip(jax.tree.leaves(jax.device_get((straight, m_straight))),
                  jax.tree.leaves(jax.device_get((resumed, m_resumed)))):
    np.testing.assert_array_equal(a, b)
