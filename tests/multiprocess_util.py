"""Runs a snippet in several local processes joined by jax.distributed (CPU).

Each process gets `VDM_COORDINATOR=localhost:<free port>`,
`VDM_NUM_PROCESSES`, `VDM_PROCESS_ID` (read by
`vdm.parallel.initialize_distributed()`), `devices_per_process` fake CPU
devices and the Gloo CPU collectives, with the repository root and `tests/`
on `PYTHONPATH` (so a snippet can `import vdm` and test modules).

  outputs = multiprocess_util.run_processes(
      "from vdm import parallel; parallel.initialize_distributed(); ...",
      num_processes=2, devices_per_process=2, timeout_s=120,
      env={"MY_OUT": str(tmp_path)})

If a process fails, the others are killed at once (they would otherwise wait
in a barrier until jax's timeouts); on failure or timeout an AssertionError
carries every process's output tail.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def cpu_multiprocess_unsupported_reason() -> Optional[str]:
  """None if this jax can run multi-process on CPU, else why not."""
  import jax  # pylint: disable=g-import-not-at-top
  if not hasattr(jax.distributed, "is_initialized"):
    return f"jax {jax.__version__} lacks jax.distributed.is_initialized"
  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
    return (f"jax {jax.__version__} has no CPU cross-process collectives "
            "(jax_cpu_collectives_implementation)")
  return None


def free_port() -> int:
  """A TCP port free on localhost right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _tail(text: str, limit: int = 4000) -> str:
  return text if len(text) <= limit else "...\n" + text[-limit:]


def run_processes(code: str, *, num_processes: int = 2,
                  devices_per_process: int = 1, timeout_s: float = 120.0,
                  env: Optional[Mapping[str, str]] = None,
                  args: tuple[str, ...] = ()) -> list[str]:
  """Runs `python -c code *args` in `num_processes` joined processes.

  Args:
    code: Python source; it should call
      `vdm.parallel.initialize_distributed()` before any other JAX call.
    num_processes: how many processes.
    devices_per_process: fake CPU devices in each process.
    timeout_s: wall-clock limit for the whole group.
    env: extra environment variables for every process.
    args: extra command-line arguments (`sys.argv[1:]`).
  Returns:
    Each process's combined stdout and stderr, by process id.
  Raises:
    AssertionError: a process failed or the group timed out.
  """
  port = free_port()
  base_env = dict(os.environ)
  python_path = [REPO_ROOT, TESTS_DIR]
  if base_env.get("PYTHONPATH"):
    python_path.append(base_env["PYTHONPATH"])
  base_env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": ("--xla_force_host_platform_device_count="
                    f"{devices_per_process}"),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "VDM_COORDINATOR": f"localhost:{port}",
      "VDM_NUM_PROCESSES": str(num_processes),
      "PYTHONPATH": os.pathsep.join(python_path),
      "TF_CPP_MIN_LOG_LEVEL": "3",
  })
  base_env.update(env or {})
  procs, logs = [], []
  try:
    for process_id in range(num_processes):
      log = tempfile.TemporaryFile(mode="w+")   # no pipe to fill up
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, "-c", code, *args],
          env={**base_env, "VDM_PROCESS_ID": str(process_id)},
          cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    failure = None
    while True:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        break
      if any(c is not None and c != 0 for c in codes):
        failure = f"a process failed (exit codes {codes})"
        break
      if time.monotonic() > deadline:
        failure = f"timed out after {timeout_s:.0f} s (exit codes {codes})"
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  if failure:
    details = "\n".join(f"--- process {i} ---\n{_tail(out)}"
                        for i, out in enumerate(outputs))
    raise AssertionError(f"multi-process run: {failure}\n{details}")
  return outputs
