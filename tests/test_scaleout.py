"""Scale-out of the real train step (tests/tiny_config.py: digits, small MLP).

- 8 fake CPU devices vs 1, same global batch: the same metrics, parameters
  and eval bpd; FSDP-sharded state vs replicated likewise.
- Two processes joined by jax.distributed on CPU, each running
  `python -m vdm.main` with 4 devices: the same parameters as one process,
  a checkpoint that restores in one process, and only process 0 writing
  logs, eval JSON and images.
- Clear errors for a batch that does not split over the devices and for
  processes launched with different configs.

Tolerances: 8 devices change only the order of float32 sums (the gradient
all-reduce) and XLA's fusion of per-device shapes (batch 1 per device
instead of 8); both are rounding, measured below 3e-6 bpd on the metrics and
5e-7 on the parameters after 3 steps.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from vdm import checkpointing
from vdm import training_loop
import multiprocess_util
import tiny_config as tiny_config_lib

NUM_STEPS = 3
# Divisible by 1, 2 and 8 devices; the 359 test rows make 3 batches (padded).
EVAL_BATCH_SIZE = 120
DEVICES_PER_PROCESS = 4
P = jax.sharding.PartitionSpec

# Metrics, rtol: a loss of ~13 bpd agrees to ~2e-7 relative (float32 sums in
# another order). bpd_recon is ~0 (sigma_0 = exp(-6.65) against a bin width
# of 2/17) and its float32 value is XLA's exp/log rounding, which differs
# between the two programs' vectorisations: measured up to 3e-6 bpd, hence an
# absolute tolerance of 2e-5 bpd (a missing all-reduce moves the loss by
# ~0.1 bpd).
METRIC_RTOL, METRIC_ATOL = 1e-5, 2e-5
# Parameters: Adam divides the gradient by its RMS, so gradient rounding of
# ~1e-7 relative reaches the parameters as ~lr * 1e-4 at most; measured
# 5e-7 absolute on weights of size ~0.3. 1e-6 is 1/1000 of one Adam step
# (lr 1e-3 at step 1), so a gradient from the wrong examples fails.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6


def scaleout_config(**overrides) -> ml_collections.ConfigDict:
  """tests/tiny_config.py, 3 steps, with `group__field=value` overrides."""
  config = tiny_config_lib.get_config()
  config.training.num_steps = NUM_STEPS
  config.training.eval_batch_size = EVAL_BATCH_SIZE
  for name, value in overrides.items():
    group, field = name.split("__")
    config[group][field] = value
  return config


def flat(tree) -> dict[str, np.ndarray]:
  """{'['net']['dense_in']['kernel']': numpy array, ...} of a pytree."""
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def assert_trees_close(got, want, *, what: str):
  got, want = flat(got), flat(want)
  assert got.keys() == want.keys(), what
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=PARAM_RTOL,
                               atol=PARAM_ATOL, err_msg=f"{what} {name}")


def run_trainer(num_devices: int, fsdp: bool) -> dict:
  """NUM_STEPS steps of training_loop.Trainer, then the eval over the test
  split."""
  trainer = training_loop.Trainer(scaleout_config(
      training__num_devices=num_devices, training__fsdp=fsdp))
  state = trainer.init_state()
  initial = flat(state.params)
  metrics, first_batch = [], None
  for step in range(NUM_STEPS):
    batch = trainer.global_batch(step)
    first_batch = batch if first_batch is None else first_batch
    state, step_metrics = trainer.train_step(state, batch)
    metrics.append(jax.device_get(step_metrics))
  return {"trainer": trainer, "state": state, "initial": initial,
          "metrics": metrics, "first_batch": first_batch,
          "eval": trainer.evaluate(state.ema_params)}


@pytest.fixture(scope="module")
def runs():
  """{(num_devices, fsdp): run_trainer(...)}; each step compiled once."""
  return {(n, fsdp): run_trainer(n, fsdp)
          for n, fsdp in [(1, False), (8, False), (8, True)]}


# ---------------------------------------------- 8 devices vs 1, replicated/fsdp

@pytest.mark.parametrize("fsdp", [False, True])
def test_eight_devices_match_one_device(runs, fsdp):
  reference, run = runs[(1, False)], runs[(8, fsdp)]
  assert run["trainer"].mesh.size == 8 and reference["trainer"].mesh.size == 1
  for step, (got, want) in enumerate(zip(run["metrics"], reference["metrics"])):
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=METRIC_RTOL,
                                 atol=METRIC_ATOL, err_msg=f"{name} {step}")
  assert_trees_close(run["state"].params, reference["state"].params,
                     what="params")
  assert_trees_close(run["state"].ema_params, reference["state"].ema_params,
                     what="ema_params")
  assert int(run["state"].step) == NUM_STEPS
  # Not trivially equal: training moved the parameters by many tolerances.
  moved = max(np.abs(p - reference["initial"][k]).max()
              for k, p in flat(reference["state"].params).items())
  assert moved > 1000 * PARAM_ATOL
  losses = [float(m["loss"]) for m in reference["metrics"]]
  assert len(set(losses)) == NUM_STEPS and 5.0 < losses[0] < 20.0


@pytest.mark.parametrize("fsdp", [False, True])
def test_state_and_batch_are_laid_out_as_configured(runs, fsdp):
  run = runs[(8, fsdp)]
  trainer, state = run["trainer"], run["state"]
  for leaf, sharding in zip(jax.tree.leaves(state),
                            jax.tree.leaves(trainer.state_sharding)):
    assert leaf.sharding == sharding
  # One row of the global batch of 8 on each device.
  image = run["first_batch"]["image"]
  assert image.shape[0] == 8
  assert {s.data.shape[0] for s in image.addressable_shards} == {1}
  kernel = state.params["net"]["dense_in"]["kernel"]             # [64, 32]
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  if fsdp:   # each device stores 1/8 of the kernel, and of Adam's moments
    assert kernel.sharding.spec == P("data", None)
    assert shard_shapes == {(8, 32)}
    mu = state.opt_state[-1][0].mu["net"]["dense_in"]["kernel"]
    assert {s.data.shape for s in mu.addressable_shards} == {(8, 32)}
  else:
    assert kernel.sharding.spec == P()
    assert shard_shapes == {(64, 32)}


@pytest.mark.parametrize("fsdp", [False, True])
def test_eval_bpd_over_the_whole_split_matches(runs, fsdp):
  reference, got = runs[(1, False)]["eval"], runs[(8, fsdp)]["eval"]
  assert got["num_examples"] == reference["num_examples"] == 359
  # Measured 7e-8 relative: float32 sums over 359 examples in another order.
  np.testing.assert_allclose(got["bpd"], reference["bpd"], rtol=1e-6)
  for name in ("bpd_recon", "bpd_prior", "bpd_diff"):
    np.testing.assert_allclose(got[name], reference[name], rtol=1e-6,
                               atol=METRIC_ATOL, err_msg=name)
  # The eval uses the EMA parameters: it is not the untrained model's bpd.
  assert 5.0 < reference["bpd"] < 20.0


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("field, size, match", [
    ("batch_size", 12, r"global batch size 12 is not divisible by the device "
                       r"count 8 .*multiple of 8, e\.g\. 8 or 16"),
    ("eval_batch_size", 100, r"global batch size 100 is not divisible by the "
                             r"device count 8 .*e\.g\. 96 or 104"),
])
def test_batch_not_divisible_by_device_count_is_a_clear_error(field, size,
                                                              match):
  config = scaleout_config(training__num_devices=8)
  config.training[field] = size
  with pytest.raises(ValueError, match=match):
    training_loop.Trainer(config)


# ------------------------------------------------------- two processes on CPU

# Runs `python -m vdm.main ... --coordinator_address=... --num_processes=2
# --process_id=i` in each process (the harness passes the three values as
# VDM_* variables; they are turned into the flags here, so the flags are what
# vdm.main sees). EXTRA_<i>: JSON list of extra flags for process i only.
# An audit hook records every file and folder the process creates, renames
# or opens for writing under the workdir, into AUDIT_DIR/<i>.json at exit.
_CLI_DRIVER = r"""
import atexit, json, os, runpy, sys
# Moved out of VDM_* (vdm.main must get them from its flags) into names that
# survive vdm.main's re-exec with the fast allocator preloaded.
for name in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID"):
  if "VDM_" + name in os.environ:
    os.environ["DRIVER_" + name] = os.environ.pop("VDM_" + name)
coordinator = os.environ["DRIVER_COORDINATOR"]
num_processes = os.environ["DRIVER_NUM_PROCESSES"]
process_id = os.environ["DRIVER_PROCESS_ID"]
workdir = os.path.realpath(os.environ["SCALEOUT_WORKDIR"])
written = set()

def audit(event, args):
  if event == "open":
    path, mode, flags = args
    writing = (any(c in (mode or "") for c in "wax+") or
               (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    paths = [path] if writing else []
  elif event in ("os.rename", "os.mkdir", "os.symlink", "os.link"):
    paths = [args[1] if event == "os.rename" else args[0]]
  else:
    return
  for path in paths:
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.realpath(os.fsdecode(path))
      if path.startswith(workdir + os.sep):
        written.add(os.path.relpath(path, workdir))

def dump():
  with open(os.path.join(os.environ["AUDIT_DIR"], process_id + ".json"),
            "w") as f:
    json.dump(sorted(written), f)

atexit.register(dump)
sys.addaudithook(audit)
extra = json.loads(os.environ.get("EXTRA_" + process_id, "[]"))
sys.argv = ["vdm.main", *sys.argv[1:], *extra,
            "--coordinator_address=" + coordinator,
            "--num_processes=" + num_processes, "--process_id=" + process_id]
runpy.run_module("vdm.main", run_name="__main__", alter_sys=True)
"""


def run_cli_processes(tmp_path, *,
                      extra: tuple[tuple[str, ...], ...] = ((), ()),
                      timeout_s: float = 240.0) -> tuple[str, list, list]:
  """vdm.main in two joined processes; (workdir, outputs, audit per process).

  Raises:
    AssertionError: from the harness, with every process's output tail.
  """
  reason = multiprocess_util.cpu_multiprocess_unsupported_reason()
  if reason:
    pytest.skip(reason)
  workdir = str(tmp_path / "run")
  audit_dir = tmp_path / "audit"
  audit_dir.mkdir()
  outputs = multiprocess_util.run_processes(
      _CLI_DRIVER, num_processes=2, devices_per_process=DEVICES_PER_PROCESS,
      timeout_s=timeout_s,
      env={"SCALEOUT_WORKDIR": workdir, "AUDIT_DIR": str(audit_dir),
           "EXTRA_0": json.dumps(extra[0]), "EXTRA_1": json.dumps(extra[1])},
      args=("--config=tests/tiny_config.py", f"--workdir={workdir}",
            "--config.training.num_devices=0",      # all 8 devices
            f"--config.training.num_steps={NUM_STEPS}",
            f"--config.training.eval_batch_size={EVAL_BATCH_SIZE}"))
  audits = []
  for process_id in range(2):
    with open(audit_dir / f"{process_id}.json") as f:
      audits.append(json.load(f))
  return workdir, outputs, audits


@pytest.mark.slow
def test_two_processes_match_one_process_and_only_process_0_writes(
    tmp_path, runs):
  workdir, outputs, audits = run_cli_processes(tmp_path)
  reference = runs[(1, False)]

  # The checkpoint both processes wrote restores in this single process,
  # into a 1-device state and into an 8-device FSDP state alike.
  restored = {}
  for key in [(1, False), (8, True)]:
    trainer = runs[key]["trainer"]
    with checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                               async_save=False) as manager:
      state, metadata, step = manager.restore_latest(trainer.init_state())
    assert step == NUM_STEPS and metadata["data_step"] == NUM_STEPS
    assert int(state.step) == NUM_STEPS
    for leaf, sharding in zip(jax.tree.leaves(state),
                              jax.tree.leaves(trainer.state_sharding)):
      assert leaf.sharding == sharding
    restored[key] = state
  for a, b in zip(jax.tree.leaves(jax.device_get(restored[(1, False)])),
                  jax.tree.leaves(jax.device_get(restored[(8, True)]))):
    np.testing.assert_array_equal(a, b)     # the same bytes, resharded
  # ... and holds the parameters one process trains, to float tolerance.
  state = restored[(1, False)]
  assert_trees_close(state.params, reference["state"].params, what="params")
  assert_trees_close(state.ema_params, reference["state"].ema_params,
                     what="ema_params")
  assert_trees_close(state.opt_state[-1][0].mu,
                     reference["state"].opt_state[-1][0].mu, what="adam mu")

  # The final eval (all processes, process 0 writes it) = one process's.
  eval_name = [n for n in os.listdir(os.path.join(workdir, "eval"))
               if n.startswith(f"test_{NUM_STEPS}_ema_")]
  assert len(eval_name) == 1, eval_name
  sample_stem = [n[:-4] for n in os.listdir(os.path.join(workdir, "samples"))
                 if n.startswith(f"{NUM_STEPS}_ema_") and n.endswith(".npz")]
  assert len(sample_stem) == 1, sample_stem
  with open(os.path.join(workdir, "eval", eval_name[0])) as f:
    record = json.load(f)
  assert record["num_examples"] == 359 and record["step"] == NUM_STEPS
  np.testing.assert_allclose(record["bpd"], reference["eval"]["bpd"],
                             rtol=1e-6)

  # Only process 0 wrote logs, config, eval JSON, samples and plots; process
  # 1 wrote only checkpoint files (Orbax saves from every process).
  for name in ("config.json", f"eval/{eval_name[0]}",
               f"samples/{sample_stem[0]}.png",
               f"samples/{sample_stem[0]}.npz",
               f"plots/schedule_{NUM_STEPS}.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
    assert any(p.startswith(name) for p in audits[0]), (name, audits[0])
  events = [n for n in os.listdir(workdir) if n.startswith("events.out")]
  assert len(events) == 1, events
  assert events[0] in audits[0]
  not_checkpoints = [p for p in audits[1] if p.split(os.sep)[0] not in
                     ("checkpoints",)]
  assert not not_checkpoints, not_checkpoints
  # (The audit is live in process 1: it saw Orbax write that process's part.)
  assert any(p.endswith("process_1") for p in audits[1]), audits[1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  assert "digits test split, 359 examples" in outputs[0]
  assert "test split" not in outputs[1] and "step 3/3" not in outputs[1]


@pytest.mark.slow
def test_processes_with_different_configs_fail_clearly(tmp_path):
  with pytest.raises(AssertionError, match="a process failed") as failure:
    run_cli_processes(tmp_path, extra=((), ("--config.optimizer.b2=0.999",)),
                      timeout_s=120)
  report = str(failure.value)
  process_1 = report[report.index("--- process 1 ---"):]
  assert ("process(es) [1] run with a different config than process 0"
          in process_1), report[-3000:]
  assert "--config.* overrides" in process_1
  # It fails before anything is compiled or written.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
