"""The workdir lock: one training run per workdir.

A training run holds `WorkdirLock(workdir)`, an OS file lock on
`WORKDIR/.lock`, for its whole life, so a second trainer started on the same
workdir is refused at once, before it writes anything. The kernel releases
the lock when the process dies, however it dies (kill -9 included), so a
stale lock cannot happen. Eval and sampling take no lock: they open the
checkpoints read-only (`checkpointing.Manager(..., read_only=True)`) and may
run beside the training run.
"""

import json
import os
import socket

try:
  import fcntl
except ImportError:           # not POSIX: no OS file lock (see WorkdirLock)
  fcntl = None

from absl import logging

_LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another process holds the workdir's lock (a training run)."""


class WorkdirLock:
  """An exclusive OS lock on a workdir: one training run per workdir.

  Takes `flock(LOCK_EX | LOCK_NB)` on `WORKDIR/.lock` and writes the holder's
  host and pid into it. The kernel releases the lock when the process exits,
  however it exits (kill -9 included), so a stale lock cannot happen; the
  file itself stays and is harmless. A second holder is refused at once with
  `WorkdirInUseError` naming the holder.

    with workdir_lock.WorkdirLock(
        workdir, enabled=parallel.is_main_process()):
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
