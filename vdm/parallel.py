"""Device mesh, shardings of the train state and batches, multi-process setup.

One `jax.jit`-compiled step runs over a one-axis `jax.sharding.Mesh` (axis
`'data'`): each global batch is split along its first dimension over the
devices, the train state is replicated or, FSDP-style, split along the same
axis; XLA inserts the gradient all-reduce (or reduce-scatter / all-gather).

Multi-process runs (several hosts, or several processes on one machine) run
the same program in every process (SPMD, "multi-controller" JAX):

  1. `initialize_distributed()` before any other JAX call;
  2. `check_config_agreement(config.to_json())` so that no process trains a
     different model;
  3. `make_mesh()` spans the devices of all processes; each process loads
     only its rows of the global batch (`process_batch_slice`) and
     `shard_batch` assembles the global `jax.Array` from them;
  4. every process calls the jitted step and every Orbax save/restore (they
     coordinate), and only `is_main_process()` writes logs and images.

Example (single or multi process, the same code):

  parallel.initialize_distributed()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.training.batch_size, mesh)
  state_shardings = parallel.state_sharding(mesh, abstract_state, fsdp=False)
  batch = parallel.shard_batch(mesh, local_numpy_batch)

`train.make_train_step` compiles the step with these shardings
(`data_sharding` for batches, `replicated` for metrics). Compile options and
the allocator are not this module's: see `runtime`.
"""

import glob
import hashlib
import importlib.util
import os
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vdm import checks

DATA_AXIS = "data"

# Environment variables read by `initialize_distributed` (explicit setup, e.g.
# GPU clusters without a scheduler jax knows, or local multi-process tests).
ENV_COORDINATOR = "VDM_COORDINATOR"          # host:port of process 0
ENV_NUM_PROCESSES = "VDM_NUM_PROCESSES"
ENV_PROCESS_ID = "VDM_PROCESS_ID"
ENV_DISTRIBUTED = "VDM_DISTRIBUTED"          # 'auto': let jax detect the
                                             # cluster (SLURM, Open MPI, k8s)

PyTree = Any


def _int_from_env(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an "
                     "integer; set it to a whole number or unset it.") from None


def _on_cloud_tpu_vm() -> bool:
  """Cheap check (no metadata-server query) for a Cloud TPU VM."""
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_libtpu and has_chips


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Joins the processes of a multi-process run (`jax.distributed`).

  Must run before any other JAX call (device queries included). Sources, in
  this order:

  - the arguments, else the environment variables `VDM_COORDINATOR`
    (`host:port` of process 0), `VDM_NUM_PROCESSES`, `VDM_PROCESS_ID`: an
    explicit setup (GPU clusters, local tests). All three are needed, unless
    the number of processes is 1 (then this is a no-op).
  - otherwise, on a Cloud TPU VM (libtpu installed and TPU chips visible), or
    when `VDM_DISTRIBUTED=auto` or jax's own `JAX_COORDINATOR_ADDRESS` is set:
    `jax.distributed.initialize()` with no arguments, which reads the TPU
    pod / cluster (SLURM, Open MPI, Kubernetes) from the environment. This
    also works on a single-host TPU VM (one process).
  - otherwise: a single process; nothing to do.

  Idempotent: a second call returns at once.

  Args:
    coordinator_address: `host:port` that process 0 listens on.
    num_processes: total number of processes.
    process_id: this process's index in `[0, num_processes)`.
  Returns:
    True when the run now has several processes.
  Raises:
    ValueError: an explicit setup that is incomplete or inconsistent.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if coordinator_address is None:
    coordinator_address = os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_from_env(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_from_env(ENV_PROCESS_ID)

  explicit = {"coordinator_address": coordinator_address,
              "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in explicit.values()):
    if num_processes is not None and num_processes == 1:
      return False
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise ValueError(
          f"incomplete multi-process setup: missing {', '.join(missing)} "
          f"(got {explicit}). Pass all three, or set the environment "
          f"variables {ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and "
          f"{ENV_PROCESS_ID} in every process.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"process_id={process_id} must lie in [0, num_processes="
          f"{num_processes}); give each process a distinct id from 0 to "
          f"{max(num_processes, 1) - 1}.")
    logging.info("jax.distributed.initialize(%s, num_processes=%d, "
                 "process_id=%d)", coordinator_address, num_processes,
                 process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True

  if (_on_cloud_tpu_vm() or os.environ.get(ENV_DISTRIBUTED) == "auto"
      or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    logging.info("jax.distributed.initialize() with cluster auto-detection")
    jax.distributed.initialize()
    return jax.process_count() > 1
  return False


def is_main_process() -> bool:
  """True in process 0, the one that writes logs, images and summaries."""
  return jax.process_index() == 0


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A one-axis mesh (`'data'`) over all devices, or the first `num_devices`.

  Args:
    num_devices: use only this many devices (tests and benchmarks on one
      machine); None uses all devices of all processes. A multi-process run
      must use all of them.
  Returns:
    The mesh, with an `Auto` axis type (sharding decided by the jit
    in/out shardings, not by the types of the arrays). Devices are in
    `jax.make_mesh`'s topology-aware order, unless that would split a
    process's devices: then grouped by process, in process order, so that
    each process feeds one contiguous block of every batch.
  Raises:
    TypeError: `num_devices` not an int.
    ValueError: `num_devices` outside `[1, jax.device_count()]`, or not all
      devices in a multi-process run.
  """
  total = jax.device_count()
  if num_devices is None:
    num_devices = total
  num_devices = checks.check_int("num_devices", num_devices,
                                 hint="Pass None to use every device.")
  if not 1 <= num_devices <= total:
    raise ValueError(f"num_devices={num_devices} must lie in [1, {total}] "
                     f"(the devices this run sees); pass None to use all.")
  if jax.process_count() > 1 and num_devices != total:
    raise ValueError(
        f"num_devices={num_devices} but a multi-process run must use all "
        f"{total} devices (every process holds some); pass None.")
  devices = jax.devices()[:num_devices]
  if hasattr(jax, "make_mesh"):
    # Topology-aware order (e.g. a ring on TPU) for faster all-reduces.
    mesh = jax.make_mesh((num_devices,), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)
    processes = [d.process_index for d in mesh.devices.flat]
    if processes == sorted(processes):
      return mesh
    # Each process must own one contiguous block of batch rows, in process
    # order (see `process_batch_slice`): group the devices by process.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    logging.info("make_mesh: devices regrouped by process for data loading")
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Splits the first (batch) dimension over the `'data'` axis."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A full copy on every device of the mesh."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...],
               num_shards: int) -> jax.sharding.PartitionSpec:
  """Shards the largest dimension divisible by `num_shards` (last on ties)."""
  best = None
  for axis, size in enumerate(shape):
    if size % num_shards == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return jax.sharding.PartitionSpec()
  spec = [None] * len(shape)
  spec[best] = DATA_AXIS
  return jax.sharding.PartitionSpec(*spec)


def state_sharding(mesh: jax.sharding.Mesh, abstract_state: PyTree, *,
                   fsdp: bool = False) -> PyTree:
  """Shardings for every leaf of a train state (params, optimizer state, ...).

  Replicated (`fsdp=False`): every device holds the whole state; XLA
  all-reduces the gradients. FSDP-style (`fsdp=True`, for models that do not
  fit one device): each array is split along its largest dimension that the
  mesh size divides (the last such one on ties), so each device stores
  1/num_devices of it and XLA all-gathers the weights where a layer needs
  them. Arrays with no such dimension, and scalars, are replicated. Adam's
  moments have the parameters' shapes, hence the same shardings.

  Args:
    abstract_state: a pytree whose leaves have `.shape` (`jax.Array`,
      `jax.ShapeDtypeStruct` from `jax.eval_shape`, numpy arrays) or are
      Python scalars.
    fsdp: split the arrays as above instead of replicating them.
  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_state`.
  """
  num_shards = mesh.shape[DATA_AXIS]

  def leaf_sharding(leaf):
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    if not fsdp or not shape:
      return replicated(mesh)
    return jax.sharding.NamedSharding(mesh, _fsdp_spec(shape, num_shards))

  return jax.tree.map(leaf_sharding, abstract_state)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, *,
                     field: str = "config.training.batch_size") -> int:
  """Checks that a global batch splits evenly over processes and devices.

  Args:
    global_batch_size: examples per step summed over all devices
      (`config.training.batch_size`).
    mesh: the mesh from `make_mesh`.
    field: the config field named in error messages.
  Returns:
    The number of examples each process loads per step.
  Raises:
    TypeError: not an int.
    ValueError: not positive, or not divisible by the number of processes or
      by the number of devices in the mesh.
  """
  global_batch_size = checks.check_int(
      "batch size", global_batch_size, minimum=1,
      hint="Set config.training.batch_size to a positive multiple of the "
      "device count.")
  num_processes = jax.process_count()
  num_devices = mesh.size

  def multiples(n):  # the multiples of n nearest the requested size
    below = global_batch_size // n * n
    return f"{below} or {below + n}" if below else f"{n}"

  if global_batch_size % num_processes:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"number of processes {num_processes} (each loads an equal share); "
        f"set {field} to a multiple of {num_processes}, "
        f"e.g. {multiples(num_processes)}.")
  if global_batch_size % num_devices:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"device count {num_devices} of the mesh (each device gets an "
        f"equal share); set {field} to a multiple of "
        f"{num_devices}, e.g. {multiples(num_devices)}.")
  return global_batch_size // num_processes


def process_batch_slice(mesh: jax.sharding.Mesh,
                        global_batch_size: int) -> slice:
  """The rows of a global batch that this process must load.

  `shard_batch` puts this process's local batch at these rows of the global
  array; an input pipeline that reads the global batch `b` and feeds
  `b[process_batch_slice(mesh, len(b))]` reproduces a single-process run.

  Raises:
    ValueError: as `check_batch_size`, or the devices of this process do not
      hold one contiguous block of rows (a mesh not built by `make_mesh`).
  """
  check_batch_size(global_batch_size, mesh)
  index_map = data_sharding(mesh).addressable_devices_indices_map(
      (global_batch_size,))
  starts = sorted({idx[0].indices(global_batch_size)[0]
                   for idx in index_map.values()})
  stops = sorted({idx[0].indices(global_batch_size)[1]
                  for idx in index_map.values()})
  if any(a != b for a, b in zip(starts[1:], stops[:-1])):
    raise ValueError(f"the devices of process {jax.process_index()} hold "
                     f"rows starting at {starts}, not one contiguous block; "
                     "build the mesh with parallel.make_mesh().")
  return slice(starts[0], stops[-1])


def shard_batch(mesh: jax.sharding.Mesh, local_batch: PyTree) -> PyTree:
  """Assembles global batch arrays, split along `'data'`, from local parts.

  Each process passes its own rows (`process_batch_slice`); with one process
  the local batch is the global batch.

  Args:
    local_batch: a pytree (usually a dict) of numpy arrays `[b, ...]`, the
      same `b` for all leaves, `b = global_batch / process_count`.
  Returns:
    The same pytree of global `jax.Array`s `[b * process_count, ...]` with
    sharding `data_sharding(mesh)`.
  Raises:
    ValueError: leaves without a batch dimension or with different ones, or a
      global batch that does not split evenly (see `check_batch_size`).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(local_batch)
  if not leaves:
    raise ValueError("local_batch has no arrays.")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(f"batch entry {jax.tree_util.keystr(path)} is a "
                       "scalar; every entry needs a leading batch dimension.")
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(f"batch entries have different leading sizes {sizes}; "
                     "they must all hold the same examples.")
  local_size = next(iter(sizes.values()))
  check_batch_size(local_size * jax.process_count(), mesh)
  sharding = data_sharding(mesh)

  def to_global(leaf):
    leaf = np.asarray(leaf)
    global_shape = (leaf.shape[0] * jax.process_count(),) + leaf.shape[1:]
    return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

  return jax.tree.map(to_global, local_batch)


def all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds in every process (a collective when multi-process)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
  return bool(np.all(np.asarray(flags)))


def check_config_agreement(config_json: str) -> str:
  """Checks that all processes run with the same configuration.

  Every process hashes its config (SHA-256) and the hashes are gathered
  (`multihost_utils.process_allgather`, a collective: call it from all
  processes at the same point, before training).

  Args:
    config_json: the resolved config, serialised deterministically (e.g.
      `config.to_json(sort_keys=True)`).
  Returns:
    The hex SHA-256 of `config_json` (e.g. for checkpoint metadata).
  Raises:
    TypeError: `config_json` not a string.
    ValueError: some process has a different config; names those processes.
      Raised in every process, so that none keeps running alone.
  """
  if not isinstance(config_json, str):
    raise TypeError(f"config_json must be a str; got "
                    f"{type(config_json).__name__}.")
  digest = hashlib.sha256(config_json.encode("utf-8")).digest()
  if jax.process_count() == 1:
    return digest.hex()
  words = np.frombuffer(digest, dtype=np.int32).copy()        # [8]
  gathered = np.asarray(multihost_utils.process_allgather(words))  # [P, 8]
  differ = [p for p in range(gathered.shape[0])
            if not np.array_equal(gathered[p], gathered[0])]
  if differ:
    hashes = {p: gathered[p].tobytes().hex()[:12] for p in [0] + differ}
    raise ValueError(
        f"process(es) {differ} run with a different config than process 0 "
        f"(SHA-256 prefixes {hashes}); launch every process with the same "
        "--config file and the same --config.* overrides.")
  return digest.hex()
