"""Process- and backend-specific settings: XLA compile options, the allocator.

Nothing here changes a number the model computes; it changes how fast (and
with how much memory) XLA runs it on this machine. Two settings, each applied
in one place:

- `jit(fun, **kwargs)`: `jax.jit` with this backend's compile options
  (`compiler_options()`). The train and eval steps (`train.make_train_step`,
  `train.make_eval_step`), the sampler and every benchmark compile through it,
  so what a benchmark times is what a run ships. Set VDM_XLA_CPU_DEFAULTS=0 to
  compile with XLA's defaults.
- `reexec_with_tcmalloc()`: the entry points' first statement; restarts the
  process with tcmalloc preloaded on CPU when it is installed. Set
  VDM_TCMALLOC=0 to keep the system allocator.

Why each setting helps, and what was measured and tried: docs/performance.md.

Example (a script of your own, as `python -m vdm.main` does):

  from vdm import runtime
  runtime.reexec_with_tcmalloc()       # before JAX starts
  step = runtime.jit(my_step, donate_argnums=(0,))
"""

import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Any, Callable, Optional

from absl import logging
import jax
import numpy as np

# XLA:CPU: convolutions on XLA's own (Eigen) kernels, whose weight gradient
# runs at about twice YNNPACK's speed; dots (each unfused, so no dot fusion
# pulls a neighbouring convolution back in) and reductions stay on YNNPACK.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
ENV_XLA_CPU_DEFAULTS = "VDM_XLA_CPU_DEFAULTS"  # '0': XLA's default options


def compiler_options() -> Optional[dict[str, Any]]:
  """`compiler_options=` for `jax.jit` of the heavy steps on this backend.

  Use `jit`, which applies them; this function is for reports.

  Returns:
    `CPU_COMPILER_OPTIONS` on CPU; None (XLA's defaults) on GPU/TPU, when
    VDM_XLA_CPU_DEFAULTS=0, or when this jaxlib does not know an option
    (checked once by compiling a one-op function; a warning says so).
  """
  if (jax.default_backend() != "cpu"
      or os.environ.get(ENV_XLA_CPU_DEFAULTS) == "0"):
    return None
  return _supported_cpu_options()


@functools.cache
def _supported_cpu_options() -> Optional[dict[str, Any]]:
  """`CPU_COMPILER_OPTIONS` if this jaxlib compiles with them, else None."""
  options = dict(CPU_COMPILER_OPTIONS)
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(
        np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("XLA:CPU options %s not supported by this jaxlib (%s); "
                    "compiling with XLA's defaults.", options,
                    str(e).splitlines()[0][:200])
    return None
  return options


def jit(fun: Callable, **jit_kwargs) -> Any:
  """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()`.

  The one place where compile options are applied: build every heavy jitted
  function (train, eval and sample steps, benchmarks) with it.

  Args:
    fun: the function to compile.
    **jit_kwargs: any other `jax.jit` argument (`in_shardings`,
      `out_shardings`, `donate_argnums`, `static_argnames`, ...).
  Returns:
    The jitted function (a `jax.stages.Wrapped`).
  Raises:
    TypeError: `compiler_options` given; it is this function's to set.
  """
  if "compiler_options" in jit_kwargs:
    raise TypeError("runtime.jit sets compiler_options itself; drop the "
                    "argument (VDM_XLA_CPU_DEFAULTS=0 selects XLA's "
                    "defaults), or call jax.jit for a light function.")
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)


def cpu_xla_flags() -> list[str]:
  """`CPU_COMPILER_OPTIONS` as XLA_FLAGS entries, for a process that does not
  compile through `jit` (e.g. the official code in benchmark_train.py)."""
  return [f"--{name}={value}" for name, value in CPU_COMPILER_OPTIONS.items()]


# tcmalloc: XLA:CPU mallocs each step's large temporaries on its worker
# threads; glibc maps (and page-faults in) such blocks afresh on every call,
# tcmalloc keeps the freed pages for reuse.
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
ENV_TCMALLOC = "VDM_TCMALLOC"                 # '0': never preload tcmalloc
_TCMALLOC_TRIED = "VDM_TCMALLOC_TRIED"        # set by the re-exec (no loop)


def find_tcmalloc() -> Optional[str]:
  """The installed tcmalloc's library name (for LD_PRELOAD), or None.

  Debian/Ubuntu: `apt install libtcmalloc-minimal4`; conda: gperftools.
  """
  for name in TCMALLOC_LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def tcmalloc_loaded() -> bool:
  """Whether this process runs with tcmalloc (e.g. via LD_PRELOAD)."""
  try:
    with open("/proc/self/maps") as f:
      return "libtcmalloc" in f.read()
  except OSError:
    return False


def tcmalloc_environment(env: Optional[dict[str, str]] = None
                         ) -> dict[str, str]:
  """`env` (default os.environ) with tcmalloc added to LD_PRELOAD, for a
  child process that computes on the CPU; unchanged when tcmalloc is not
  installed or VDM_TCMALLOC=0."""
  env = dict(os.environ if env is None else env)
  library = find_tcmalloc()
  if library is None or env.get(ENV_TCMALLOC) == "0":
    return env
  preload = env.get("LD_PRELOAD", "")
  if library not in preload.split() and "libtcmalloc" not in preload:
    env["LD_PRELOAD"] = " ".join(p for p in (library, preload) if p)
  return env


def reexec_with_tcmalloc() -> None:
  """Restarts this process (same pid, argv, environment) with tcmalloc
  preloaded, when that helps and is possible; else returns.

  For the entry points (`python -m vdm.main`, the benchmarks), as the first
  statement, before JAX starts. Returns without restarting when tcmalloc is
  already loaded or not installed (then it logs how to install it), when JAX
  may run on a GPU/TPU (host allocations matter little there), when
  VDM_TCMALLOC=0, or after one attempt.
  """
  if (tcmalloc_loaded() or os.environ.get(ENV_TCMALLOC) == "0"
      or os.environ.get(_TCMALLOC_TRIED) or sys.platform != "linux"
      or not _cpu_backend_expected()):
    return
  env = tcmalloc_environment()
  if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
    logging.warning(
        "tcmalloc not found: CPU train steps run up to ~1.2x faster with it "
        "(Debian/Ubuntu: apt install libtcmalloc-minimal4; set %s=0 to "
        "silence this).", ENV_TCMALLOC)
    return
  env[_TCMALLOC_TRIED] = "1"
  argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)


def _cpu_backend_expected() -> bool:
  """Whether JAX will compute on the CPU, decided without starting it."""
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    pass
  else:
    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return False
  return all(importlib.util.find_spec(name) is None
             for name in ("libtpu", "libtpu_nightly"))


def describe() -> dict[str, Any]:
  """The runtime settings in effect, for benchmark records and logs."""
  return {"xla_compiler_options": compiler_options(),
          "tcmalloc": tcmalloc_loaded()}
