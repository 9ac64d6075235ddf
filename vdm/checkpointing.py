"""Checkpoints: the Orbax manager, verified steps, resume, read-only readers.

Apart from it: the workdir lock (`workdir_lock.py`), the checksums of a
step (`checksums.py`) and the stop-signal guard (`preemption.py`).

Layout: `WORKDIR/checkpoints/<step>/` holds two Orbax items, `state` (the
whole train state pytree: params, optimizer state, EMA, adaptive-schedule
state, step) and `metadata` (JSON: data iterator position, config hash,
architecture, ...), Orbax's `metrics` (JSON, drives keep-best) and
`checksums.json` (the SHA-256 of every file above).

One writer: training holds `workdir_lock.WorkdirLock(workdir)` (an OS file
lock on `WORKDIR/.lock`, released by the kernel when the process dies, so
kill -9 leaves no stale lock) and opens the one writing `Manager`. Eval and
sampling open `Manager(..., read_only=True)`, which never creates, deletes,
moves or writes anything, so they may run while training runs.

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
writes `checksums.json`). Only process 0 takes the workdir lock.

Async saves: `save` returns once the state has been copied to host memory;
the files are written in a background thread. Donating the state to the next
train step after `save` returns is therefore safe. A failed save (disk full,
permissions) is raised as `CheckpointSaveError` by the next `save`,
`wait_until_finished`, `close` or `check_for_errors`, whichever comes first;
the training loop calls `check_for_errors` after every step, so a failure
surfaces within a step of the moment the background write fails. A folder
that cannot be written is refused when the writer opens it, before anything
is trained.
"""

import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vdm import checks
from vdm import checksums
from vdm import parallel

PyTree = Any

_STATE = "state"
_METADATA = checksums.METADATA_ITEM   # the step's JSON metadata
_METRICS = "metrics"             # Orbax's item name for the metrics JSON
_MAX_LISTED = 5          # mismatching paths listed in the error message
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...)."""


class _OneLineSaveFailure:
  """Drops the tracebacks from Orbax's ERROR logs (a failed background save
  logs one per thread).

  A failed save is raised as one `CheckpointSaveError` (step, path, OS error)
  at the next save or wait; Orbax's tracebacks above it buried that line.
  Their one-line messages stay; VDM_DEBUG=1 keeps the tracebacks.
  """

  def filter(self, record) -> bool:
    if (record.levelno >= logging.ERROR and record.exc_info
        and f"{os.sep}orbax{os.sep}" in record.pathname
        and os.environ.get("VDM_DEBUG", "") in ("", "0")):
      record.exc_info = None
      record.exc_text = None
    return True


_SAVE_FAILURE_FILTER = _OneLineSaveFailure()


class NonFiniteStateError(RuntimeError):
  """The state to save holds a NaN or inf (training diverged)."""


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


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def _root_cause(error: BaseException) -> BaseException:
  """The innermost OSError in `error`'s chain (else `error` itself)."""
  found, seen = error, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      found = error
    error = error.__cause__ or error.__context__
  return found



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

  One writer per directory: the training run, holding the workdir lock
  (`workdir_lock.WorkdirLock`). Eval and sampling open it with
  `read_only=True`: that never creates, deletes, moves or writes anything
  (no Orbax `CheckpointManager` is built, so none of its clean-ups run),
  skips unfinished and damaged steps where they lie, and can run while the
  training writes.

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
    self._unchecked = False            # a save started, its outcome not seen
    self._closed = False
    # Restores read step folders directly (the writer's and readers' path
    # alike), so a reader needs no CheckpointManager.
    # The metrics item (Orbax's, for keep-best) is registered too, though
    # never restored here: an unregistered item on disk makes Orbax warn on
    # every restore.
    self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        **{_STATE: ocp.StandardCheckpointHandler(),
           _METADATA: ocp.JsonCheckpointHandler(),
           _METRICS: ocp.JsonCheckpointHandler()}))
    self._manager = None
    absl_logger = logging.get_absl_logger()
    if _SAVE_FAILURE_FILTER not in absl_logger.filters:
      absl_logger.addFilter(_SAVE_FAILURE_FILTER)
    if read_only:
      if not epath.Path(directory).exists():
        raise FileNotFoundError(
            f"no checkpoints folder {directory}: this workdir has not been "
            "trained; train first (python -m vdm.main --config=... "
            "--workdir=...), then evaluate or sample.")
      self._note_unfinished_saves()
      return
    self._check_writable()
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
      raise ValueError(f"unreadable metrics file {path}: "
                       f"{checksums.short_error(e)}") from e
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

  def _check_writable(self) -> None:
    """Creates the folder and a probe file in it, or refuses at once.

    Orbax would find out at the first save, minutes into training, and its
    background threads then wait minutes for a step folder that never
    appears (an unwritable folder hung the run for 5 minutes).
    """
    if "://" in self._directory:       # object stores: no cheap probe
      return
    probe = os.path.join(self._directory,
                         f".vdm-write-probe-{os.getpid()}-{time.time_ns()}")
    try:
      os.makedirs(self._directory, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"ok")
      os.remove(probe)
    except OSError as e:
      raise CheckpointSaveError(
          f"cannot write checkpoints to {self._directory}: "
          f"{checksums.short_error(e)}. Make the folder writable (or free "
          "disk space, or choose another --workdir), then rerun the same "
          "command.") from None

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
    checksums.write_checksums(tmp[-1] if tmp else root / str(step))

  def _save_error(self, step: Optional[int],
                  error: BaseException) -> CheckpointSaveError:
    kept = [s for s in self._steps_on_disk() if s != step]
    intact = (f"the earlier checkpoints are intact (newest: step {kept[-1]})"
              if kept else "there is no earlier checkpoint")
    return CheckpointSaveError(
        f"saving checkpoint step {step} to {self._directory} failed: "
        f"{checksums.short_error(_root_cause(error))}; {intact}. Free disk "
        "space or make the folder writable, then rerun the same command to "
        "resume.")

  def _wait(self) -> None:
    """Waits for the pending save; its failure as a CheckpointSaveError."""
    if self._manager is None or not self._unchecked:
      return             # no save since the last outcome was seen
    self._unchecked = False
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._pending_step, e) from e

  def check_for_errors(self, *, collective: bool = False) -> None:
    """Raises a failed background save now; never waits for a running one.

    Cheap enough to call after every train step (it looks at the save
    thread and returns).

    Args:
      collective: multi-process runs: every process must call it at the same
        point, and all raise together if any process's save failed (a
        process that stopped alone would leave the others waiting in the
        next collective). Single-process calls need not pass it.
    Raises:
      CheckpointSaveError: the newest save failed (on any process, when
        `collective`).
    """
    error = None
    if (self._manager is not None and self._unchecked
        and not self._manager.is_saving_in_progress()):
      try:
        self._wait()
      except CheckpointSaveError as e:
        error = e
    if collective and jax.process_count() > 1:
      failed = multihost_utils.process_allgather(
          np.array(error is not None, np.int32))
      if error is None and np.any(failed):
        error = CheckpointSaveError(
            f"saving checkpoint step {self._pending_step} to "
            f"{self._directory} failed on process(es) "
            f"{np.flatnonzero(failed).tolist()} (their log has the cause); "
            "rerun the same command to resume from the last checkpoint.")
    if error is not None:
      raise error

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
    metadata[checksums.CHECKSUMMED_KEY] = 1
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _METADATA: ocp.args.JsonSave(metadata)})
    self._pending_step = step
    self._unchecked = True
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
        problem = checksums.verify_checksums(step_dir)
        if problem is None:
          tree = self._checkpointer.metadata(step_dir).item_metadata[_STATE]
          if tree is None:
            raise ValueError("no readable state metadata")
          found = _flat_shapes(getattr(tree, "tree", tree))
      except Exception as e:  # pylint: disable=broad-except
        problem = checksums.short_error(e)
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
          problem = checksums.short_error(e)
      if parallel.all_processes_agree(problem is None):
        metadata = dict(restored[_METADATA] or {})
        metadata.pop(checksums.CHECKSUMMED_KEY, None)
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
