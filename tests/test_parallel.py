"""Tests for vdm/parallel.py: mesh, shardings, batches, multi-process runs.

A toy regression (a tanh MLP trained with Adam) is the train step here; the
same functions run in the two-process test's workers, which import this
module, so nothing at module level may touch a JAX backend.
"""
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from vdm import checkpointing
from vdm import parallel
import multiprocess_util

P = jax.sharding.PartitionSpec
NUM_STEPS = 3
GLOBAL_BATCH = 16
IN_DIM, HIDDEN, OUT_DIM = 4, 16, 3
TX = optax.adam(3e-2)


class ToyState(struct.PyTreeNode):
  step: jax.Array          # [] int32
  params: dict
  opt_state: Any


def host_init_state() -> ToyState:
  """Deterministic initial state as numpy arrays (the same in every process)."""
  rng = np.random.default_rng(0)
  params = {
      "dense": {"kernel": rng.normal(size=(IN_DIM, HIDDEN)).astype(np.float32),
                "bias": rng.normal(size=(HIDDEN,)).astype(np.float32) * 0.1},
      "out": {"kernel": rng.normal(size=(HIDDEN, OUT_DIM)).astype(np.float32),
              "bias": np.zeros((OUT_DIM,), np.float32)},
  }
  state = ToyState(step=np.zeros((), np.int32), params=params,
                   opt_state=TX.init(params))
  return jax.tree.map(np.asarray, state)


def global_batch(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(100 + step)
  x = rng.normal(size=(GLOBAL_BATCH, IN_DIM)).astype(np.float32)
  w = np.linspace(-1.0, 1.0, IN_DIM * OUT_DIM).reshape(IN_DIM, OUT_DIM)
  return {"x": x, "y": np.sin(x @ w).astype(np.float32)}


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
  pred = h @ params["out"]["kernel"] + params["out"]["bias"]
  return jnp.mean(jnp.square(pred - batch["y"]))


def train_step(state: ToyState, batch) -> tuple[ToyState, jax.Array]:
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
  updates, opt_state = TX.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), loss


def run_toy(mesh, *, fsdp: bool):
  """NUM_STEPS steps on `mesh`; each process feeds its rows of each batch."""
  host_state = host_init_state()
  shardings = parallel.state_sharding(mesh, host_state, fsdp=fsdp)
  state = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
      host_state, shardings)
  step_fn = jax.jit(train_step,
                    in_shardings=(shardings, parallel.data_sharding(mesh)),
                    out_shardings=(shardings, parallel.replicated(mesh)),
                    donate_argnums=(0,))
  rows = parallel.process_batch_slice(mesh, GLOBAL_BATCH)
  losses = []
  for step in range(NUM_STEPS):
    local = {k: v[rows] for k, v in global_batch(step).items()}
    state, loss = step_fn(state, parallel.shard_batch(mesh, local))
    losses.append(float(np.asarray(loss.addressable_data(0))))
  return state, losses, shardings


def flat_params(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------- mesh, specs

@pytest.mark.parametrize("num_devices, expected", [(None, 8), (1, 1), (3, 3)])
def test_make_mesh_sizes(num_devices, expected):
  mesh = parallel.make_mesh(num_devices)
  assert mesh.axis_names == ("data",)
  assert mesh.size == expected and mesh.shape["data"] == expected
  assert list(mesh.devices.flat) == jax.devices()[:expected]


@pytest.mark.parametrize("num_devices, error, match", [
    (0, ValueError, r"num_devices=0 must lie in \[1, 8\]"),
    (9, ValueError, r"num_devices=9 must lie in \[1, 8\]"),
    (2.0, TypeError, r"num_devices must be an int; got 2\.0 .*None to use "
                     r"every device"),
])
def test_make_mesh_errors(num_devices, error, match):
  with pytest.raises(error, match=match):
    parallel.make_mesh(num_devices)


def test_state_sharding_replicated_and_fsdp():
  mesh = parallel.make_mesh()                                  # 8 devices
  tree = {"kernel": jax.ShapeDtypeStruct((4, 16), jnp.float32),
          "square": jnp.zeros((8, 8)),       # tie: the last axis
          "conv": np.zeros((3, 3, 32, 64)),  # largest divisible: 64
          "odd": np.zeros((3, 5)),           # nothing divisible by 8
          "bias": np.zeros((24,)),
          "count": jnp.zeros((), jnp.int32),
          "scale": 1.5}
  fsdp = parallel.state_sharding(mesh, tree, fsdp=True)
  expected = {"kernel": P(None, "data"), "square": P(None, "data"),
              "conv": P(None, None, None, "data"), "odd": P(),
              "bias": P("data"), "count": P(), "scale": P()}
  assert {k: v.spec for k, v in fsdp.items()} == expected
  assert all(v.mesh is mesh for v in fsdp.values())
  replicated = parallel.state_sharding(mesh, tree)
  assert all(v.spec == P() for v in replicated.values())


# --------------------------------------------------------------------- batches

def test_shard_batch_global_shape_and_sharding():
  mesh = parallel.make_mesh()
  local = global_batch(0)
  batch = parallel.shard_batch(mesh, local)
  assert batch["x"].shape == (GLOBAL_BATCH, IN_DIM)
  assert batch["x"].sharding == parallel.data_sharding(mesh)
  shards = sorted(batch["x"].addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape for s in shards] == [(2, IN_DIM)] * 8
  assert [s.device for s in shards] == list(mesh.devices.flat)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  np.testing.assert_array_equal(np.asarray(batch["y"]), local["y"])
  assert parallel.process_batch_slice(mesh, GLOBAL_BATCH) == slice(0, 16)


@pytest.mark.parametrize("batch, match", [
    ({"x": np.zeros((8, 2)), "y": np.zeros((4,))}, r"different leading sizes"),
    ({"x": np.zeros((8, 2)), "n": np.float32(3)}, r"\['n'\] is a scalar"),
    ({"x": np.zeros((12, 2))}, r"global batch size 12 is not divisible by the "
                               r"device count 8"),
])
def test_shard_batch_errors(batch, match):
  with pytest.raises(ValueError, match=match):
    parallel.shard_batch(parallel.make_mesh(), batch)


@pytest.mark.parametrize("size, error, match", [
    (12, ValueError, r"global batch size 12 is not divisible by the device "
                     r"count 8 .*multiple of 8, e\.g\. 8 or 16"),
    (4, ValueError, r"global batch size 4 .* device count 8 .*e\.g\. 8\.$"),
    (0, ValueError, r"batch size must be >= 1; got 0"),
    (16.0, TypeError, r"batch size must be an int; got 16\.0"),
])
def test_check_batch_size_errors(size, error, match):
  with pytest.raises(error, match=match):
    parallel.check_batch_size(size, parallel.make_mesh())


def test_check_batch_size_returns_per_process_size():
  assert parallel.check_batch_size(24, parallel.make_mesh()) == 24
  assert parallel.check_batch_size(3, parallel.make_mesh(3)) == 3


# ------------------------------------------------ single-process setup helpers

def test_single_process_helpers(monkeypatch):
  for name in ("VDM_COORDINATOR", "VDM_NUM_PROCESSES", "VDM_PROCESS_ID",
               "VDM_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(num_processes=1) is False
  assert parallel.is_main_process()
  text = json.dumps({"lr": 0.1})
  assert (parallel.check_config_agreement(text)
          == hashlib.sha256(text.encode()).hexdigest())
  with pytest.raises(TypeError, match="config_json must be a str; got dict"):
    parallel.check_config_agreement({"lr": 0.1})


@pytest.mark.parametrize("env, kwargs, match", [
    ({"VDM_COORDINATOR": "localhost:1234"}, {},
     r"missing num_processes, process_id.*VDM_NUM_PROCESSES"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     r"process_id=2 must lie in \[0, num_processes=2\)"),
    ({"VDM_NUM_PROCESSES": "two"}, {}, r"VDM_NUM_PROCESSES='two' is not an "
                                       r"integer"),
])
def test_initialize_distributed_errors(monkeypatch, env, kwargs, match):
  for name in ("VDM_COORDINATOR", "VDM_NUM_PROCESSES", "VDM_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=match):
    parallel.initialize_distributed(**kwargs)


# ---------------------------------------------- 8 devices vs 1, replicated/fsdp

@pytest.fixture(scope="module")
def toy_runs():
  """{(num_devices, fsdp): (state, losses, shardings)}, each compiled once."""
  return {(n, fsdp): run_toy(parallel.make_mesh(n), fsdp=fsdp)
          for n, fsdp in [(1, False), (8, False), (8, True)]}


@pytest.mark.parametrize("num_devices, fsdp", [(8, False), (8, True)])
def test_sharded_training_matches_one_device(toy_runs, num_devices, fsdp):
  reference, reference_losses, _ = toy_runs[(1, False)]
  state, losses, shardings = toy_runs[(num_devices, fsdp)]
  # Only the order of float32 sums differs (all-reduce vs one device).
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  got, want = flat_params(state.params), flat_params(reference.params)
  initial = flat_params(host_init_state().params)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
    # Adam moved every parameter by ~lr per step: equality is not trivial.
    assert np.abs(want[name] - initial[name]).max() > 1e-2, name
  assert int(state.step) == NUM_STEPS
  assert losses[-1] < losses[0]
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding
  if fsdp:
    assert state.params["dense"]["kernel"].sharding.spec == P(None, "data")
    assert state.params["out"]["kernel"].sharding.spec == P("data", None)
    assert state.opt_state[0].mu["dense"]["bias"].sharding.spec == P("data")
    assert state.params["out"]["bias"].sharding.spec == P()     # [3]


# ------------------------------------------------------- two processes on CPU

WORKER = r"""
import json, os
import numpy as np
from vdm import checkpointing, parallel
parallel.initialize_distributed()
import jax
from jax.experimental import multihost_utils
import test_parallel as tp

out = os.environ["VDM_TEST_OUT"]
mesh = parallel.make_mesh()
report = {"process_count": jax.process_count(),
          "device_count": jax.device_count(),
          "rows": str(parallel.process_batch_slice(mesh, tp.GLOBAL_BATCH))}
for name, fsdp in (("replicated", False), ("fsdp", True)):
  state, losses, _ = tp.run_toy(mesh, fsdp=fsdp)
  directory = os.path.join(out, "ckpt_" + name)
  with checkpointing.Manager(directory) as manager:
    manager.save(tp.NUM_STEPS, state, metadata={"data_step": tp.NUM_STEPS})
  params = multihost_utils.process_allgather(state.params, tiled=True)
  # Restoring in both processes gives the trained (sharded) state back.
  with checkpointing.Manager(directory) as manager:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), state)
    restored, _, step = manager.restore_latest(target)
  report[f"restored_{name}"] = step == tp.NUM_STEPS and all(
      np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(params), jax.tree.leaves(
              multihost_utils.process_allgather(restored.params, tiled=True))))
  if parallel.is_main_process():
    np.savez(os.path.join(out, name + ".npz"), losses=np.asarray(losses),
             **tp.flat_params(params))
for size in (3, 6):
  try:
    parallel.check_batch_size(size, mesh)
  except ValueError as e:
    report[f"batch_{size}"] = str(e)
try:
  parallel.check_config_agreement(json.dumps({"seed": jax.process_index()}))
except ValueError as e:
  report["config_error"] = str(e)
report["config_hash"] = parallel.check_config_agreement('{"seed": 0}')
reports = multihost_utils.process_allgather(
    np.frombuffer(json.dumps(report).ljust(4096).encode(), np.uint8))
if parallel.is_main_process():
  merged = [json.loads(bytes(r).decode()) for r in np.asarray(reports)]
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(merged, f)
"""


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path, toy_runs):
  reason = multiprocess_util.cpu_multiprocess_unsupported_reason()
  if reason:
    pytest.skip(reason)
  multiprocess_util.run_processes(
      WORKER, num_processes=2, devices_per_process=2, timeout_s=150,
      env={"VDM_TEST_OUT": str(tmp_path)})
  with open(tmp_path / "report.json") as f:
    reports = json.load(f)
  assert [r["process_count"] for r in reports] == [2, 2]
  assert [r["device_count"] for r in reports] == [4, 4]
  # Each process fed its own half of every global batch.
  assert [r["rows"] for r in reports] == ["slice(0, 8, None)",
                                          "slice(8, 16, None)"]
  for r in reports:
    assert "global batch size 3 is not divisible by the number of processes 2"\
        in r["batch_3"]
    assert "global batch size 6 is not divisible by the device count 4" \
        in r["batch_6"]
    assert "process(es) [1] run with a different config" in r["config_error"]
    assert r["config_hash"] == hashlib.sha256(b'{"seed": 0}').hexdigest()
    assert r["restored_replicated"] and r["restored_fsdp"]

  reference, reference_losses, _ = toy_runs[(1, False)]
  want = flat_params(reference.params)
  mesh = parallel.make_mesh()
  for name, fsdp in (("replicated", False), ("fsdp", True)):
    got = dict(np.load(tmp_path / f"{name}.npz"))
    np.testing.assert_allclose(got.pop("losses"), reference_losses, rtol=1e-5)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} {key}")
    # The checkpoint both processes wrote restores in this single process.
    host_state = host_init_state()
    shardings = parallel.state_sharding(mesh, host_state, fsdp=fsdp)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        host_state, shardings)
    with checkpointing.Manager(tmp_path / f"ckpt_{name}") as manager:
      restored, metadata, step = manager.restore_latest(target)
    assert step == NUM_STEPS and metadata == {"data_step": NUM_STEPS}
    assert int(restored.step) == NUM_STEPS
    for key, value in flat_params(restored.params).items():
      np.testing.assert_array_equal(value, got[key], err_msg=f"{name} {key}")
