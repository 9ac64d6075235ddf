"""Checkpoints: an Orbax manager, resume from the newest valid step, preemption.

Layout: `WORKDIR/checkpoints/<step>/` holds two Orbax items, `state` (the
whole train state pytree: params, optimizer state, EMA, adaptive-schedule
state, step) and `metadata` (JSON: data iterator position, config hash,
architecture, ...), plus Orbax's `metrics` (JSON, drives keep-best).

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/`
and renames it to `<step>/` only once every process has finished writing
(on object stores without atomic rename it writes a `commit_success.txt`
marker last instead). A crash mid-save therefore leaves a tmp folder, never a
half-written `<step>/`; `Manager` warns about such leftovers and Orbax
deletes them. A finalised step can still be damaged later (a truncated or
deleted file, a full disk during a copy): `restore_latest` then moves it
aside to `<step>.unreadable-<time>/` with a warning and uses the previous
step.

Multi-process runs: every process must create the `Manager` and call
`save`, `restore_latest`, `wait_until_finished` and `close` at the same
points. Orbax coordinates them (barriers through `jax.distributed`): each
process writes the shards it holds and process 0 finalises the step.

Async saves: `save` returns once the state has been copied to host memory;
the files are written in a background thread. Donating the state to the next
train step after `save` returns is therefore safe.
"""

import json
import math
import os
import signal
import threading
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vdm import parallel
from vdm import process

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_MAX_LISTED = 5          # mismatching paths listed in the error message


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
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


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
               async_save: bool = True):
    """Opens (creating it if needed) the checkpoint directory.

    Args:
      directory: `WORKDIR/checkpoints`; local path or a URL Orbax supports
        (`gs://...`). Step folders are named by the step number.
      max_to_keep: how many of the newest steps to keep (>= 1).
      keep_best: also keep the step with the lowest `metrics[best_metric]`.
      best_metric: the metrics key ranking steps, lower is better. A missing
        or NaN value ranks worst.
      async_save: write files in a background thread.
    """
    max_to_keep = process.check_int(
        "max_to_keep", max_to_keep, minimum=1,
        hint="Keep at least the newest checkpoint.")
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self._directory = directory
    self._keep_best = keep_best
    self._best_metric = best_metric
    self._warn_unfinished_saves()

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
        enable_async_checkpointing=async_save,
        # A save is written to `<step>.orbax-checkpoint-tmp-*` and renamed to
        # `<step>` when complete, so a tmp folder is an interrupted save:
        # never restored, deleted here (after the warning above).
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        directory,
        item_names=(_STATE, _METADATA),
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler()},
        options=options)
    self._closed = False

  @property
  def directory(self) -> str:
    return self._directory

  def _metric_value(self, metrics: Optional[Mapping[str, Any]]) -> float:
    """The keep-best score: lower is better; missing or NaN ranks worst."""
    try:
      value = float(metrics[self._best_metric])
    except (KeyError, TypeError, ValueError):
      return math.inf
    return math.inf if math.isnan(value) else value

  def _warn_unfinished_saves(self) -> None:
    if "://" in self._directory or not os.path.isdir(self._directory):
      return
    leftovers = sorted(name for name in os.listdir(self._directory)
                       if ".orbax-checkpoint-tmp" in name)
    for name in leftovers:
      logging.warning(
          "checkpoint %s in %s is an unfinished save (the run stopped while "
          "writing it); it is ignored and will be deleted. Resuming from the "
          "newest complete step.", name, self._directory)

  def save(self, step: int, state: PyTree, *,
           metadata: Optional[Mapping[str, Any]] = None,
           metrics: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Starts saving `state` as step `step` (asynchronously); all processes.

    Args:
      step: the training step (number of updates applied to `state`).
      state: the train state pytree; arrays may be sharded.
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
    """
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
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _METADATA: ocp.args.JsonSave(metadata)})
    return bool(self._manager.save(step, args=args, metrics=metrics,
                                   force=force))

  def latest_step(self) -> Optional[int]:
    """The newest finalised step (not checked for damage), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All finalised steps in the directory, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The kept step with the lowest `best_metric` (newest if no metrics)."""
    return self._manager.best_step()

  def restore_latest(
      self, target_state: PyTree) -> Optional[tuple[PyTree, dict, int]]:
    """Restores the newest readable step into the layout of `target_state`.

    Steps are tried newest first. One whose files cannot be read (truncated,
    missing, bad metadata) is logged with a warning naming it, moved aside to
    `<step>.unreadable-<time>/` (so new saves at that step number work and
    nothing is deleted) and the previous step is tried. In multi-process runs
    the processes agree on each step (all must read it).

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
    self._manager.wait_until_finished()
    self._manager.reload()
    abstract = _abstract_target(target_state)
    expected = _flat_shapes(abstract)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem, restored = None, None
      try:
        tree = self._manager.item_metadata(step)[_STATE]
        if tree is None:
          raise ValueError("no readable state metadata")
        found = _flat_shapes(getattr(tree, "tree", tree))
      except Exception as e:  # pylint: disable=broad-except
        problem = _short(e)
      if problem is None:
        self._check_same_model(step, expected, found)
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(abstract),
              _METADATA: ocp.args.JsonRestore()}))
        except Exception as e:  # pylint: disable=broad-except
          if "RESOURCE_EXHAUSTED" in str(e):
            raise                # out of memory: not the checkpoint's fault
          problem = _short(e)
      if _all_processes_agree(problem is None):
        return restored[_STATE], dict(restored[_METADATA] or {}), step
      problem = problem or "unreadable in another process"
      moved_to = self._move_aside(step)
      logging.warning(
          "checkpoint step %d in %s is unreadable (%s); skipping it and "
          "trying the previous step. It was moved to %s for inspection.",
          step, self._directory, problem, moved_to)
      unreadable.append((step, problem, moved_to))
    if unreadable:
      listed = "; ".join(f"step {s}: {p} (moved to {m})"
                         for s, p, m in unreadable)
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
      stored = self._manager.restore(step, args=ocp.args.Composite(
          **{_METADATA: ocp.args.JsonRestore()}))[_METADATA] or {}
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
    """Renames an unreadable step out of Orbax's view (process 0 only)."""
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
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are on disk (all processes)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources (idempotent)."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()

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
