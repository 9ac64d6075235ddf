"""The command line's machinery: argv, one-line errors, exit codes, signals.

What `vdm.main` (the `vdm` console script and `python -m vdm.main`) does
around its modes, kept apart from them:

- `expand_argv`: `vdm COMMAND ...` becomes `--mode=COMMAND`, and a run's
  stored WORKDIR/config.json becomes `--config` when none is given.
- `parse_flags`: the flags parser; a misspelt `--config.a.b=` override is
  one `error:` line that says "did you mean".
- `exit_code_for_error`: an exception becomes one `error:` line and an exit
  code (`EXIT_USAGE`, `EXIT_FAILED`); VDM_DEBUG=1 or --debug keeps the
  traceback.
- `SignalExit` and `exit_code_for_signal`: SIGTERM / SIGINT end the process
  at once (128 + the signal number) while nothing is unsaved.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from vdm import checkpointing
from vdm import config_lib
from vdm import workdir_lock

COMMANDS = ("train", "eval", "sample", "prepare", "info", "import-official")
EXIT_USAGE = 2      # a usage or configuration error: nothing was run
EXIT_FAILED = 1     # the run failed (diverged, checkpoint not written, bug)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Loads WORKDIR/config.json as a config file, so `--config.a.b=` overrides
# work on a stored config as on a file.
STORED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "stored_config.py")


def exit_code_for_signal(signum: int) -> int:
  """The exit code after a stop by `signum`: 128 + signum, as a shell reports
  a process killed by it (SIGTERM 143, SIGINT 130)."""
  return 128 + int(signum)


class SignalExit:
  """Ends the process at once on SIGTERM / SIGINT while nothing is unsaved.

  A Python signal handler runs only between bytecodes of the main thread,
  so a signal during a long call into C++ (the first XLA compile, a
  restore, an eval) would wait for that call to end. Here the C-level
  handler also writes the signal number into a pipe (`signal.set_wakeup_fd`)
  and a watcher thread reads it: while the run holds no unsaved progress
  (before its first train step, after its last save, always in eval and
  sample) it ends the process with `exit_code_for_signal` through
  `os._exit`, skipping an interpreter shutdown that would first wait for the
  compile. While training steps are unsaved, the training loop's
  `preemption.PreemptionGuard` takes the signal: it saves at the next step
  and `training_loop.Preempted` carries the signal out; a second stop signal
  then ends the process at once (the checkpoints on disk stay intact: a save
  cut short is only a tmp folder).

  Single-process runs only: in a multi-process run every process must stop
  at the same step, which the guard arranges.
  """

  def __init__(self, *, enabled: bool = True):
    self._enabled = (enabled and threading.current_thread() is
                     threading.main_thread())
    self._lock = threading.Lock()
    self._unsaved = False
    self._signals_while_unsaved = 0
    self._previous = {}
    self._write_fd = None
    self._old_wakeup_fd = -1

  def set_unsaved(self, unsaved: bool) -> None:
    """Whether the run now holds trained steps not yet saved."""
    with self._lock:
      self._unsaved = bool(unsaved)

  @staticmethod
  def _python_handler(signum, frame) -> None:
    del signum, frame    # the watcher thread acts on the signal

  def __enter__(self) -> "SignalExit":
    if not self._enabled:
      return self
    read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    for signum in STOP_SIGNALS:
      self._previous[signum] = signal.signal(signum, self._python_handler)
    self._old_wakeup_fd = signal.set_wakeup_fd(self._write_fd,
                                               warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                     name="vdm-signal-exit").start()
    return self

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:          # the write end was closed: __exit__
        os.close(read_fd)
        return
      for signum in data:
        if signum not in STOP_SIGNALS:
          continue
        with self._lock:
          if self._unsaved:
            self._signals_while_unsaved += 1
            if self._signals_while_unsaved < 2:
              continue            # the training loop saves, then stops
          _stop_now(signum, saved=not self._unsaved)

  def __exit__(self, *exc_info) -> None:
    if not self._enabled or self._write_fd is None:
      return
    signal.set_wakeup_fd(self._old_wakeup_fd)
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    os.close(self._write_fd)
    self._write_fd = None


def _stop_now(signum: int, *, saved: bool) -> None:
  """Flushes the console (without risking a wait on a busy stream) and
  ends the process with `exit_code_for_signal(signum)`."""
  code = exit_code_for_signal(signum)
  flusher = threading.Thread(
      target=lambda: (sys.stdout.flush(), sys.stderr.flush()), daemon=True)
  flusher.start()
  flusher.join(1.0)
  state = ("nothing unsaved was lost" if saved else
           "stopped at once on the second signal; the last checkpoint is "
           "intact")
  os.write(2, (f"stopped by {signal.Signals(signum).name} ({state}); "
               f"exit code {code}. Rerun the same command to resume.\n"
               ).encode())
  os._exit(code)   # pylint: disable=protected-access


def exit_now(code: int) -> None:
  """Flushes the console and the log and ends the process with `code`,
  without the interpreter's shutdown (which joins library threads: Orbax's
  after a failed save, the prefetcher's)."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  os._exit(code)   # pylint: disable=protected-access


def debug_requested(argv) -> bool:
  """Whether VDM_DEBUG (not 0) or --debug asks for tracebacks."""
  return (os.environ.get("VDM_DEBUG", "") not in ("", "0") or
          "--debug" in argv)


def one_line(error: BaseException) -> str:
  """`error`'s message on one line (its type name when it has none)."""
  text = (error.args[0] if isinstance(error, KeyError) and error.args
          and isinstance(error.args[0], str) else str(error))
  return " ".join(text.split()) or type(error).__name__


def print_error(message: str) -> None:
  """Writes `error: message` to stderr, after what stdout holds."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr)


def _raw_flag(argv, name: str) -> Optional[str]:
  """The value of --name in argv as given (last one wins), or None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def expand_argv(argv: list[str]) -> list[str]:
  """`vdm COMMAND ...` -> `... --mode=COMMAND`; a run's stored config as
  `--config` when none is given and WORKDIR/config.json exists.

  Raises:
    app.UsageError: the command is given twice, or --config names no file.
  """
  argv = list(argv)
  if len(argv) > 1 and argv[1] in COMMANDS:
    if _raw_flag(argv, "mode") is not None:
      raise app.UsageError(f"give the command once: either `{argv[1]}` or "
                           "--mode, not both.")
    argv = [argv[0], f"--mode={argv[1]}"] + argv[2:]
  mode = _raw_flag(argv, "mode") or "train"
  workdir = _raw_flag(argv, "workdir")
  config = _raw_flag(argv, "config")
  if config is not None:
    path = config.split(":", 1)[0]
    if not os.path.isfile(path):
      raise app.UsageError(f"--config={config}: no such file; pass a config "
                           "file such as configs/digits.py.")
  elif workdir and mode in config_lib.MODES:
    stored = os.path.join(os.path.abspath(workdir), config_lib.CONFIG_FILE)
    if os.path.isfile(stored):
      argv.insert(1, f"--config={STORED_CONFIG}:{stored}")
  return argv


def _flag_error(error: BaseException, argv) -> str:
  """One line for an error of the flags parser (unknown flag, misspelt or
  badly typed config override)."""
  text = one_line(error)
  if not isinstance(error, (KeyError, AttributeError)):
    return text
  # ml_collections names the missing part and, when one is close, the
  # existing key: 'trainin' ... Did you mean "training" instead of "trainin"?
  found = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  missing = found.group(2) if found else re.sub(r"\W", "", text.split()[0])
  for arg in argv[1:]:
    flag = arg.split("=", 1)[0]
    if not flag.startswith(("--config.", "--noconfig.")):
      continue
    parts = flag.split(".")
    if missing in parts[1:]:
      field = ".".join(parts[1:])
      if found:
        parts[parts.index(missing, 1)] = found.group(1)
        return (f"{flag}: the config has no field {missing!r}; did you mean "
                f"{'.'.join(parts)}?")
      return (f"{flag}: the config has no field {missing!r} (in {field!r}); "
              "see the config file for its fields.")
  return f"unknown config field: {text}"


def parse_flags(argv):
  """The flags parser for `app.run`: a parse error is one `error:` line and
  exit `EXIT_USAGE` (the traceback with VDM_DEBUG=1 or --debug)."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    if debug_requested(argv):
      raise
    print_error(_flag_error(error, argv))
    sys.exit(EXIT_USAGE)


def _usage_errors() -> tuple[type[BaseException], ...]:
  return (ValueError, TypeError, KeyError, FileNotFoundError,
          NotADirectoryError, app.UsageError, flags.Error,
          workdir_lock.WorkdirInUseError)


def _is_run_failure(error: BaseException) -> bool:
  """A failure of the run the library reports with its own message."""
  if isinstance(error, (checkpointing.NonFiniteStateError,
                        checkpointing.CheckpointSaveError)):
    return True
  if type(error) is not RuntimeError or error.__traceback__ is None:
    return False
  innermost = traceback.extract_tb(error.__traceback__)[-1].filename
  return os.path.dirname(os.path.abspath(innermost)) == os.path.dirname(
      os.path.abspath(__file__))


def exit_code_for_error(error: Exception) -> Optional[int]:
  """Prints `error` as one `error:` line and returns its exit code: a usage
  or configuration error `EXIT_USAGE`, a failure of the run the library
  reports with its own message `EXIT_FAILED`; None for anything else (a
  bug), which the caller re-raises so its traceback shows."""
  if isinstance(error, _usage_errors()):
    print_error(one_line(error))
    return EXIT_USAGE
  if _is_run_failure(error):
    print_error(one_line(error))
    return EXIT_FAILED
  return None
