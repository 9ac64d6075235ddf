"""Preemption: a stop signal becomes a save at the next step, then an exit.

Cloud schedulers announce preemption with SIGTERM some seconds before a
kill; Ctrl-C sends SIGINT. `PreemptionGuard` turns the first such signal
into a flag the training loop polls once per step (the same answer in every
process), so the loop saves a checkpoint and stops cleanly; a second signal
gets the behaviour installed before.
"""

import os
import signal
import threading
from typing import Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils

from vdm import parallel


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag; the loop saves, then exits cleanly.

  Cloud schedulers announce preemption with SIGTERM some seconds before a
  kill; Ctrl-C sends SIGINT. Inside the `with` block the first such signal
  only sets `requested`; the loop polls `should_stop(step)` once per step,
  saves at that step and leaves the loop. A second signal gets the behaviour
  that was installed before (Ctrl-C twice still interrupts at once). Leaving
  the block restores the previous handlers.

    with preemption.PreemptionGuard() as guard:
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
      none_requested = parallel.all_processes_agree(not self._requested)
      stop = stop or not none_requested
    return bool(stop)
