"""Checkpoints: one writer per workdir, verified steps, resume, preemption.

Layout: `WORKDIR/checkpoints/<step>/` holds two Orbax items, `state` (the
whole train state pytree: params, optimizer state, EMA, adaptive-schedule
state, step) and `metadata` (JSON: data iterator position, config hash,
architecture, ...), Orbax's `metrics` (JSON, drives keep-best) and
`checksums.json` (the SHA-256 of every file above).

One writer: training holds `WorkdirLock(workdir)` (an OS file lock on
`WORKDIR/.lock`, released by the kernel when the process dies, so kill -9
leaves no stale lock) and opens the one writing `Manager`. Eval and sampling
open `Manager(..., read_only=True)`, which never creates, deletes, moves or
writes anything, so they may run while training runs.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp*/` and
renames it to `<step>/` only once every process has finished writing (on
object stores without atomic rename it writes a `commit_success.txt` marker
last instead); `checksums.json` is written into the tmp folder just before
the rename, so a committed step always has it. A crash mid-save therefore
leaves a tmp folder, never a half-written `<step>/`. The writing `Manager`
warns about such leftovers and Orbax deletes them; a reader skips them
without touching them (they may be a save in progress).

Verification: restoring a step first re-hashes its files against
`checksums.json`; a mismatch (damaged bytes anywhere, metadata and metrics
included), a missing or extra file, a missing `checksums.json` in a step
saved with one, or any unreadable part skips the step with a warning naming
it and falls back to the previous step. The writer also moves such a step
aside to `<step>.unreadable-<time>/` (so its step number is free again and
nothing is deleted); a reader leaves it where it is.

Multi-process runs: every process must create the `Manager` and call
`save`, `restore_latest`, `wait_until_finished` and `close` at the same
points. Orbax coordinates them (barriers through `jax.distributed`): each
process writes the shards it holds and process 0 finalises the step (and
writes `checksums.json`). Only process 0 takes the `WorkdirLock`.

Async saves: `save` returns once the state has been copied to host memory;
the files are written in a background thread. Donating the state to the next
train step after `save` returns is therefore safe. A failed save (disk full,
permissions) is raised as `CheckpointSaveError` by the next `save`,
`wait_until_finished` or `close`, whichever comes first.
"""

import hashlib
import json
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Mapping, Optional, Sequence

try:
  import fcntl
except ImportError:           # not POSIX: no OS file lock (see WorkdirLock)
  fcntl = None

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vdm import checks
from vdm import parallel

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_METRICS = "metrics"             # Orbax's item name for the metrics JSON
_MAX_LISTED = 5          # mismatching paths listed in the error message
_TMP_MARK = ".orbax-checkpoint-tmp"
_CHECKSUMS = "checksums.json"
# Written into the step's metadata JSON (and stripped on restore): the step
# was saved with a checksums.json, so one missing from it is damage.
_CHECKSUMMED_KEY = "_vdm_checksums"
# Orbax writes these after checksums.json (the commit timestamp, the commit
# marker), so they cannot be covered; neither holds data we restore.
_UNHASHED_TOP = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt",
                           _CHECKSUMS})
_HASH_CHUNK = 4 << 20
_LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another process holds the workdir's lock (a training run)."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...)."""


class NonFiniteStateError(RuntimeError):
  """The state to save holds a NaN or inf (training diverged)."""


class WorkdirLock:
  """An exclusive OS lock on a workdir: one training run per workdir.

  Takes `flock(LOCK_EX | LOCK_NB)` on `WORKDIR/.lock` and writes the holder's
  host and pid into it. The kernel releases the lock when the process exits,
  however it exits (kill -9 included), so a stale lock cannot happen; the
  file itself stays and is harmless. A second holder is refused at once with
  `WorkdirInUseError` naming the holder.

    with checkpointing.WorkdirLock(workdir, enabled=parallel.is_main_process()):
      ...train...

  Multi-process runs: only process 0 takes it (pass `enabled=False`
  elsewhere); the processes of one run share the workdir by design.
  Workdirs on object stores (`gs://...`) cannot be locked: a warning is
  logged and nothing is locked. On NFS, Linux maps `flock` to an NFS byte
  range lock, which works across hosts when the server supports locking.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self._workdir = os.fspath(workdir)
    self._enabled = enabled
    self._fd = None

  @property
  def path(self) -> str:
    return os.path.join(self._workdir, _LOCK_FILE)

  def acquire(self) -> None:
    """Takes the lock, creating the workdir if needed.

    Raises:
      WorkdirInUseError: another process holds it.
    """
    if not self._enabled or self._fd is not None:
      return
    if "://" in self._workdir or fcntl is None:
      logging.warning("cannot lock workdir %s (no OS file locks there); make "
                      "sure no other training run uses it.", self._workdir)
      return
    os.makedirs(self._workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirInUseError(
          f"workdir {self._workdir} is in use by a training run: {holder}. "
          "Wait for it to finish or stop it (it saves on SIGTERM), or use "
          "another --workdir; --mode=eval and --mode=sample may run beside "
          "it.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(),
                             "pid": os.getpid()}).encode() + b"\n")
    self._fd = fd

  def release(self) -> None:
    """Releases the lock (idempotent); the file stays."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  """'host H, pid P' from a lock file, or why it is not known."""
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode())
    return f"host {holder['host']}, pid {holder['pid']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "host and pid not yet written (it is just starting)"


def _path_str(path: Sequence[Any]) -> str:
  """'params/dense/kernel' for a jax key path (dict, attribute or index)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape Orbax stores: PRNG keys as their raw data `[..., 2]`."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{path: stored shape} for every leaf; Orbax metadata and states alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(path): _stored_shape(leaf) for path, leaf in leaves}


def _default_sharding() -> jax.sharding.Sharding:
  """Replicated over the mesh of all devices, as the train state is."""
  return parallel.replicated(parallel.make_mesh())


def _abstract_target(target_state: PyTree) -> PyTree:
  """Shapes, dtypes and shardings of `target_state`, allocating nothing.

  Leaves without a sharding (plain `jax.eval_shape` output) are restored
  replicated on all devices.
  """
  default = []

  def to_abstract(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                  sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      if not default:
        default.append(_default_sharding())
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default[0])
    return leaf

  return jax.tree.map(to_abstract, target_state)


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds in every process (a collective when multi-process)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
  return bool(np.all(np.asarray(flags)))


def _short(error: BaseException, limit: int = 300) -> str:
  """The error in at most `limit` characters: its head and its tail (where
  tensorstore puts the OS error)."""
  text = f"{type(error).__name__}: {error}"
  if len(text) <= limit:
    return text
  return text[:limit // 3] + " ... " + text[-(limit - limit // 3):]


def _root_cause(error: BaseException) -> BaseException:
  """The innermost OSError in `error`'s chain (else `error` itself)."""
  found, seen = error, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      found = error
    error = error.__cause__ or error.__context__
  return found


# Checksums. SHA-256 because hashlib's uses the CPU's SHA instructions: about
# 1 s per GiB per core here (docs/reliability.md), so verifying a cifar10
# state of a few hundred MB costs well under a second.
def _hash_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _hashed_files(step_dir: epath.Path) -> list[str]:
  """Paths under `step_dir` that checksums.json covers, sorted."""
  names, folders = [], [(step_dir, "")]
  while folders:          # epath has no recursive glob on object stores
    folder, prefix = folders.pop()
    for path in folder.iterdir():
      name = prefix + path.name
      if path.is_dir():
        folders.append((path, name + "/"))
      elif (name not in _UNHASHED_TOP and
            path.name != "commit_success.txt"):
        names.append(name)
  return sorted(names)


def _digests(step_dir: epath.Path, names: Sequence[str]) -> dict[str, str]:
  """{name: sha256} of files under `step_dir`, hashed in parallel threads."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  workers = max(1, min(8, os.cpu_count() or 1, len(names)))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    hashes = pool.map(lambda name: _hash_file(step_dir / name), names)
    return dict(zip(names, hashes))


def write_checksums(step_dir: str | os.PathLike) -> None:
  """Writes `step_dir/checksums.json`: the SHA-256 of each file in the step."""
  step_dir = epath.Path(step_dir)
  files = _digests(step_dir, _hashed_files(step_dir))
  (step_dir / _CHECKSUMS).write_text(
      json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def verify_checksums(step_dir: str | os.PathLike) -> Optional[str]:
  """None if the step's files match its checksums.json, else the problem.

  A step without checksums.json passes (with a warning) only if its metadata
  says it was saved before checksums were written.
  """
  step_dir = epath.Path(step_dir)
  checksums = step_dir / _CHECKSUMS
  if not checksums.exists():
    try:
      metadata = _read_json(step_dir / _METADATA / _METADATA)
    except (OSError, ValueError) as e:
      return f"no {_CHECKSUMS} and unreadable metadata ({_short(e)})"
    if not isinstance(metadata, dict) or metadata.get(_CHECKSUMMED_KEY):
      return f"{_CHECKSUMS} is missing"
    logging.warning("checkpoint %s has no %s (saved by an older version); "
                    "restoring it unverified.", step_dir, _CHECKSUMS)
    return None
  try:
    expected = _read_json(checksums)["files"]
    if not isinstance(expected, dict):
      raise ValueError("'files' is not a mapping")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{_CHECKSUMS} is unreadable ({_short(e)})"
  found = _hashed_files(step_dir)
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing:
    return f"missing files: {', '.join(missing[:3])}"
  if extra:
    return f"files not in {_CHECKSUMS}: {', '.join(extra[:3])}"
  actual = _digests(step_dir, found)
  bad = [name for name in found if actual[name] != expected[name]]
  if bad:
    return (f"checksum mismatch (damaged bytes) in {len(bad)} files: "
            f"{', '.join(bad[:3])}")
  return None


# Finiteness: one compiled reduction per leaf, fetched as one small array.
def _is_inexact(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return (dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and
          not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def non_finite_paths(state: PyTree) -> list[str]:
  """Paths of the floating leaves of `state` holding a NaN or inf."""
  leaves = [(path, leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(state)[0]
            if _is_inexact(leaf)]
  if not leaves:
    return []
  flags = _finite_flags([leaf for _, leaf in leaves])
  if flags.is_fully_addressable:
    flags = np.asarray(jax.device_get(flags))
  else:                                  # multi-process: gather the global
    flags = np.asarray(multihost_utils.process_allgather(flags, tiled=True))
  return [_path_str(path) for (path, _), ok in zip(leaves, flags) if not ok]


class Manager:
  """Saves and restores the train state in `directory` with Orbax.

  Keeps the newest `max_to_keep` steps and, with `keep_best`, also the step
  with the lowest `metrics[best_metric]` (eval bpd). Steps saved without
  metrics (periodic or preemption saves) rank worst for keep-best but are
  kept while they are among the newest `max_to_keep`: no step is deleted
  merely for lacking metrics, and none is kept forever for it either. (Orbax's
  own `max_to_keep` + `best_fn` keeps only the best N, so a fresh preemption
  save without metrics would be deleted at once, or, with
  `keep_checkpoints_without_metrics`, every such save would be kept forever;
  hence the explicit union of `LatestN` and `BestN` policies here.)

  One writer per directory: the training run, holding `WorkdirLock`. Eval
  and sampling open it with `read_only=True`: that never creates, deletes,
  moves or writes anything (no Orbax `CheckpointManager` is built, so none of
  its clean-ups run), skips unfinished and damaged steps where they lie, and
  can run while the training writes.

  Usage:

    manager = checkpointing.Manager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore_latest(abstract_state)
    if restored is not None:
      state, metadata, step = restored
    ...
    manager.save(step, state, metadata={"data_step": step},
                 metrics={"bpd": eval_bpd})
    ...
    manager.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               keep_best: bool = True, best_metric: str = "bpd",
               async_save: bool = True, read_only: bool = False):
    """Opens the checkpoint directory (the writer creates it if needed).

    Args:
      directory: `WORKDIR/checkpoints`; local path or a URL Orbax supports
        (`gs://...`). Step folders are named by the step number.
      max_to_keep: how many of the newest steps to keep (>= 1).
      keep_best: also keep the step with the lowest `metrics[best_metric]`.
      best_metric: the metrics key ranking steps, lower is better. A missing
        or NaN value ranks worst.
      async_save: write files in a background thread.
      read_only: for eval and sampling: restore only, touch nothing.
    Raises:
      FileNotFoundError: `read_only` and `directory` does not exist.
    """
    max_to_keep = checks.check_int(
        "max_to_keep", max_to_keep, minimum=1,
        hint="Keep at least the newest checkpoint.")
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self._directory = directory
    self._keep_best = keep_best
    self._best_metric = best_metric
    self._read_only = read_only
    self._async_save = async_save
    self._pending_step = None          # the step of the newest save started
    self._closed = False
    # Restores read step folders directly (the writer's and readers' path
    # alike), so a reader needs no CheckpointManager.
    self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **{_STATE: ocp.StandardCheckpointHandler(),
           _METADATA: ocp.JsonCheckpointHandler()}))
    self._manager = None
    if read_only:
      if not epath.Path(directory).exists():
        raise FileNotFoundError(
            f"no checkpoints folder {directory}: this workdir has not been "
            "trained; train first (python -m vdm.main --config=... "
            "--workdir=...), then evaluate or sample.")
      self._note_unfinished_saves()
      return
    self._warn_unfinished_saves()
    self._set_aside_bad_metrics()

    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._metric_value,
          reverse=True,            # sorted high to low, keeps the last (lowest)
          n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn only makes Orbax write and reload the metrics; retention is
        # decided by preservation_policy alone.
        best_fn=self._metric_value if keep_best else None,
        best_mode="min",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            policies),
        # Always Orbax's async path (a sync save waits right after): its
        # post-finalization callback runs on process 0 after every process
        # has written and before the tmp folder is renamed, which is where
        # checksums.json goes.
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=self._write_pending_checksums),
        # A save is written to `<step>.orbax-checkpoint-tmp*` and renamed to
        # `<step>` when complete, so a tmp folder is an interrupted save:
        # never restored, deleted here (after the warning above) by the
        # lock holder only.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        directory,
        item_names=(_STATE, _METADATA),
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler()},
        options=options)

  @property
  def directory(self) -> str:
    return self._directory

  @property
  def read_only(self) -> bool:
    return self._read_only

  def _metric_value(self, metrics: Optional[Mapping[str, Any]]) -> float:
    """The keep-best score: lower is better; missing or NaN ranks worst."""
    try:
      value = float(metrics[self._best_metric])
    except (KeyError, TypeError, ValueError):
      return math.inf
    return math.inf if math.isnan(value) else value

  def _unfinished_saves(self) -> list[str]:
    if "://" in self._directory or not os.path.isdir(self._directory):
      return []
    return sorted(name for name in os.listdir(self._directory)
                  if _TMP_MARK in name)

  def _warn_unfinished_saves(self) -> None:
    for name in self._unfinished_saves():
      logging.warning(
          "checkpoint %s in %s is an unfinished save (the run stopped while "
          "writing it); it is ignored and will be deleted. Resuming from the "
          "newest complete step.", name, self._directory)

  def _note_unfinished_saves(self) -> None:
    for name in self._unfinished_saves():
      logging.info("ignoring %s in %s: an unfinished save (perhaps one a "
                   "training run is writing now); not touched.", name,
                   self._directory)

  def _step_path(self, step: int) -> epath.Path:
    return epath.Path(self._directory) / str(step)

  def _steps_on_disk(self) -> list[int]:
    """Committed steps, read from the directory listing, ascending."""
    root = epath.Path(self._directory)
    if not root.exists():
      return []
    remote = "://" in self._directory
    steps = []
    for child in root.iterdir():
      if not child.name.isdigit() or not child.is_dir():
        continue
      # Without atomic rename (object stores) the commit marker is last.
      if remote and not (child / "commit_success.txt").exists():
        continue
      steps.append(int(child.name))
    return sorted(steps)

  def _read_metrics(self, step: int) -> Optional[dict]:
    """The step's metrics dict; None if it has none; ValueError if garbled."""
    path = self._step_path(step) / _METRICS / _METRICS
    if not path.exists():
      return None
    try:
      metrics = _read_json(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"unreadable metrics file {path}: {_short(e)}") from e
    if not isinstance(metrics, dict):
      raise ValueError(f"metrics file {path} does not hold a JSON object")
    return metrics

  def _set_aside_bad_metrics(self) -> None:
    """Moves aside steps whose metrics JSON is unreadable (writer only).

    Orbax reads every step's metrics when it lists the steps and fails on a
    garbled file, so this runs before each listing.
    """
    for step in self._steps_on_disk():
      try:
        self._read_metrics(step)
      except ValueError as e:
        logging.warning("checkpoint step %d in %s is unreadable (%s); "
                        "skipping it. It was moved to %s for inspection.",
                        step, self._directory, e, self._move_aside(step))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vdm_set_aside_bad_metrics")

  def _write_pending_checksums(self) -> None:
    """Orbax's post-finalization callback: checksums.json into the step.

    Runs on process 0 in Orbax's background thread, after every process has
    written the step and before its tmp folder is renamed to `<step>/`.
    """
    step = self._pending_step
    root = epath.Path(self._directory)
    tmp = sorted(p for p in root.iterdir()
                 if p.name.startswith(f"{step}{_TMP_MARK}"))
    # Object stores write in place: then the step folder itself.
    write_checksums(tmp[-1] if tmp else root / str(step))

  def _save_error(self, step: Optional[int],
                  error: BaseException) -> CheckpointSaveError:
    kept = [s for s in self._steps_on_disk() if s != step]
    intact = (f"the earlier checkpoints are intact (newest: step {kept[-1]})"
              if kept else "there is no earlier checkpoint")
    return CheckpointSaveError(
        f"saving checkpoint step {step} to {self._directory} failed: "
        f"{_short(_root_cause(error))}; {intact}. Free disk space or make "
        "the folder writable, then rerun the same command to resume.")

  def _wait(self) -> None:
    """Waits for the pending save; its failure as a CheckpointSaveError."""
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._pending_step, e) from e

  def save(self, step: int, state: PyTree, *,
           metadata: Optional[Mapping[str, Any]] = None,
           metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Starts saving `state` as step `step` (asynchronously); all processes.

    Args:
      step: the training step (number of updates applied to `state`).
      state: the train state pytree; arrays may be sharded. Every floating
        leaf must be finite.
      metadata: JSON-serialisable dict stored with the step, e.g.
        `{"data_step": ..., "config_hash": ..., "arch": ...}`.
      metrics: e.g. `{"bpd": 3.1}` measured on this state; drives keep-best.
      force: save even if a newer step exists in the directory.
    Returns:
      True if a save was started; False if `step` already exists (e.g. a
      final save right after a periodic one) or is older than the newest
      step and `force` is False.
    Raises:
      TypeError: `metadata` is not JSON-serialisable.
      NonFiniteStateError: `state` holds a NaN or inf; nothing is saved.
      CheckpointSaveError: this save, or the previous one still in flight,
        failed to write (disk full, permissions).
      RuntimeError: the manager is read-only.
    """
    if self._read_only:
      raise RuntimeError(
          f"checkpoints in {self._directory} are open read-only (eval or "
          "sampling); only the training run that holds the workdir saves.")
    step = int(step)
    metadata = dict(metadata or {})
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint metadata must be JSON-serialisable "
                      f"(ints, floats, strings, lists, dicts); got "
                      f"{metadata!r}: {e}") from None
    if metrics is not None:
      metrics = {str(k): float(v) for k, v in metrics.items()}
    elif self._keep_best:
      metrics = {}     # no score: ranks worst, but LatestN still keeps it
    self._wait()       # a failed previous save is reported now, by its step
    existing = self._manager.all_steps()
    if step in existing:
      logging.info("checkpoint step %d already exists in %s; not saving it "
                   "again.", step, self._directory)
      return False
    if existing and step < max(existing) and not force:
      logging.warning("not saving step %d: %s already has the newer step %d "
                      "(pass force=True to save anyway).", step,
                      self._directory, max(existing))
      return False
    bad = non_finite_paths(state)
    if bad:
      last_good = max(existing) if existing else None
      listed = ", ".join(bad[:_MAX_LISTED])
      listed += f" and {len(bad) - _MAX_LISTED} more" if len(
          bad) > _MAX_LISTED else ""
      where = (f"the last good checkpoint is step {last_good}"
               if last_good is not None else "no checkpoint was written")
      raise NonFiniteStateError(
          f"non-finite state (NaN or inf in {listed}) at step {step}, reached "
          f"between steps {(last_good or 0) + 1} and {step}; training stopped "
          f"and this state was NOT saved; {where}. Lower "
          "optimizer.learning_rate or set optimizer.grad_clip.")
    metadata[_CHECKSUMMED_KEY] = 1
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _METADATA: ocp.args.JsonSave(metadata)})
    self._pending_step = step
    try:
      started = bool(self._manager.save(step, args=args, metrics=metrics,
                                        force=force))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if not self._async_save:
      self._wait()
    return started

  def latest_step(self) -> Optional[int]:
    """The newest finalised step (not checked for damage), or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """All finalised steps in the directory, ascending."""
    if self._manager is None:
      return self._steps_on_disk()
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest `best_metric` (newest if no metrics)."""
    if self._manager is not None:
      return self._manager.best_step()
    scores = {}
    for step in self._steps_on_disk():
      try:
        scores[step] = self._metric_value(self._read_metrics(step))
      except ValueError:
        continue
    if not scores:
      return None
    return min(scores, key=lambda s: (scores[s], -s))

  def restore_latest(
      self, target_state: PyTree) -> Optional[tuple[PyTree, dict, int]]:
    """Restores the newest intact step into the layout of `target_state`.

    Steps are tried newest first. One that fails verification (checksums)
    or whose files cannot be read (truncated, missing, bad metadata) is
    logged with a warning naming it and the previous step is tried. The
    writer also moves it aside to `<step>.unreadable-<time>/` (so new saves
    at that step number work and nothing is deleted); a read-only manager
    leaves it in place. In multi-process runs the processes agree on each
    step (all must read it).

    Args:
      target_state: a state pytree giving the structure, shapes, dtypes and
        shardings to restore into: concrete arrays, or `jax.ShapeDtypeStruct`
        leaves (with `sharding=`; without one, replicated on all devices),
        e.g. from `jax.eval_shape`. Nothing of it is read or donated.
    Returns:
      `(state, metadata, step)`, or None if the directory has no steps.
    Raises:
      ValueError: a step holds a differently shaped or structured state (a
        checkpoint of another model in this workdir).
      RuntimeError: there are steps but none is readable.
    """
    if self._manager is not None:
      self._wait()
      self._set_aside_bad_metrics()
      self._manager.reload()
    abstract = _abstract_target(target_state)
    expected = _flat_shapes(abstract)
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      problem, restored = None, None
      step_dir = self._step_path(step)
      try:
        problem = verify_checksums(step_dir)
        if problem is None:
          tree = self._checkpointer.metadata(step_dir).item_metadata[_STATE]
          if tree is None:
            raise ValueError("no readable state metadata")
          found = _flat_shapes(getattr(tree, "tree", tree))
      except Exception as e:  # pylint: disable=broad-except
        problem = _short(e)
      if problem is None:
        self._check_same_model(step, expected, found)
        try:
          restored = self._checkpointer.restore(
              step_dir, args=ocp.args.Composite(**{
                  _STATE: ocp.args.StandardRestore(abstract),
                  _METADATA: ocp.args.JsonRestore()}))
        except Exception as e:  # pylint: disable=broad-except
          if "RESOURCE_EXHAUSTED" in str(e):
            raise                # out of memory: not the checkpoint's fault
          problem = _short(e)
      if _all_processes_agree(problem is None):
        metadata = dict(restored[_METADATA] or {})
        metadata.pop(_CHECKSUMMED_KEY, None)
        return restored[_STATE], metadata, step
      problem = problem or "unreadable in another process"
      if self._read_only:
        where = "left in place (only the training run moves it aside)"
      else:
        where = f"moved to {self._move_aside(step)}"
        self._manager.reload()
      logging.warning(
          "checkpoint step %d in %s is unreadable (%s); skipping it and "
          "trying the previous step. It was %s.", step, self._directory,
          problem, where)
      unreadable.append((step, problem, where))
    if unreadable:
      listed = "; ".join(f"step {s}: {p} ({w})" for s, p, w in unreadable)
      raise RuntimeError(
          f"no readable checkpoint in {self._directory}: {listed}. Fix or "
          "remove them and rerun, or use a new --workdir to start over.")
    return None

  def _check_same_model(self, step: int, expected: dict, found: dict) -> None:
    """Raises ValueError if the stored tree differs from the target's."""
    problems = []
    # Shallow paths first: params before their optimizer-state copies.
    for path in sorted(set(expected) | set(found),
                       key=lambda p: (p.count("/"), p)):
      if path not in found:
        problems.append(f"{path}: only in this model {expected[path]}")
      elif path not in expected:
        problems.append(f"{path}: only in the checkpoint {found[path]}")
      elif expected[path] != found[path]:
        problems.append(f"{path}: checkpoint {found[path]}, this model "
                        f"{expected[path]}")
    if not problems:
      return
    described = ""
    try:
      stored = _read_json(self._step_path(step) / _METADATA / _METADATA)
      known = {k: stored[k] for k in ("arch", "config_hash") if k in stored}
      if known:
        described = f" (it was saved with {known})"
    except Exception:  # pylint: disable=broad-except
      pass
    listed = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    listed += f"; and {more} more" if more > 0 else ""
    raise ValueError(
        f"the workdir holds a checkpoint of a different model: step {step} "
        f"in {self._directory}{described} does not match the state of the "
        f"current config in {len(problems)} arrays: {listed}. Use a new "
        "--workdir for this config, or run with the config that wrote this "
        "workdir.")

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of Orbax's view (writer, process 0)."""
    source = os.path.join(self._directory, str(step))
    target = f"{source}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      suffix = 0
      while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
      target += f"-{suffix}" if suffix else ""
      epath.Path(source).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vdm_move_aside_{step}")
    return target

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are on disk (all processes).

    Raises:
      CheckpointSaveError: the pending save failed.
    """
    self._wait()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources (idempotent).

    Raises:
      CheckpointSaveError: the pending save failed (resources are released
        all the same).
    """
    if self._closed:
      return
    self._closed = True
    try:
      self._wait()
    finally:
      if self._manager is not None:
        self._manager.close()
      self._checkpointer.close()

  def __enter__(self) -> "Manager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag; the loop saves, then exits cleanly.

  Cloud schedulers announce preemption with SIGTERM some seconds before a
  kill; Ctrl-C sends SIGINT. Inside the `with` block the first such signal
  only sets `requested`; the loop polls `should_stop(step)` once per step,
  saves at that step and leaves the loop. A second signal gets the behaviour
  that was installed before (Ctrl-C twice still interrupts at once). Leaving
  the block restores the previous handlers.

    with checkpointing.PreemptionGuard() as guard:
      for step in range(start, num_steps):
        state, metrics = train_step(state, batch)
        if guard.should_stop(step + 1):
          manager.save(step + 1, state, metadata=..., force=True)
          break
    manager.wait_until_finished()

  Multi-process runs: all processes must stop at the same step (a save is a
  collective). With `jax.distributed` initialised and jax's preemption
  service on (the default), SIGTERM is left to jax's own notifier and
  `should_stop` asks `multihost_utils.reached_preemption_sync_point(step)`,
  which turns true at the same step everywhere; enter the guard after
  `parallel.initialize_distributed()` (a Python handler installed later would
  shadow jax's). Other signals only set a local flag, which the processes
  combine (`process_allgather`, a host sync) every `sync_every` steps. So
  call `should_stop` at every step, from every process.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
               *, sync_every: int = 100):
    if sync_every < 1:
      raise ValueError(f"sync_every must be >= 1; got {sync_every}.")
    self._signals = tuple(signals)
    self._sync_every = sync_every
    self._previous = {}
    self._requested = False
    self._signal = None

  @property
  def requested(self) -> bool:
    """True once a signal arrived in this process."""
    return self._requested

  @property
  def signal(self) -> Optional[int]:
    """The first signal received, or None."""
    return self._signal

  @staticmethod
  def _jax_preemption_service() -> bool:
    return jax.process_count() > 1 and bool(
        getattr(jax.config, "jax_enable_preemption_service", False))

  def _handle(self, signum, frame) -> None:
    if self._requested:          # second signal: the previous behaviour
      previous = self._previous.get(signum, signal.SIG_DFL)
      self._restore()
      if callable(previous):
        previous(signum, frame)
      elif previous != signal.SIG_IGN:
        os.kill(os.getpid(), signum)       # default action (terminate)
      return
    self._requested = True
    self._signal = signum
    logging.warning("received %s: saving a checkpoint at the next step, "
                    "then stopping (send it again to stop at once).",
                    signal.Signals(signum).name)

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard entered outside the main thread; "
                      "signal handlers cannot be installed there.")
      return self
    skip = {signal.SIGTERM} if self._jax_preemption_service() else set()
    for signum in self._signals:
      if signum not in skip:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _restore(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None
                    else signal.SIG_DFL)
    self._previous = {}

  def __exit__(self, *exc_info) -> None:
    if self._previous:
      self._restore()

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and stop; the same answer in all processes.

    Args:
      step: the current training step; call at every step, from every
        process.
    """
    if jax.process_count() == 1:
      return self._requested
    stop = False
    if self._jax_preemption_service():
      stop = multihost_utils.reached_preemption_sync_point(int(step))
    if int(step) % self._sync_every == 0:
      none_requested = _all_processes_agree(not self._requested)
      stop = stop or not none_requested
    return bool(stop)
