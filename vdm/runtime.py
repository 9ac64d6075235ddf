"""Process- and backend-specific settings: XLA compile options, the allocator.

Nothing here changes a number the model computes; it changes how fast (and
with how much memory) XLA runs it on this machine. Two settings, each applied
in one place:

- `jit(fun, **kwargs)`: `jax.jit` with this backend's compile options
  (`compiler_options()`). The train and eval steps (`train.make_train_step`,
  `train.make_eval_step`), the sampler and every benchmark compile through it,
  so what a benchmark times is what a run ships. Set VDM_XLA_CPU_DEFAULTS=0 to
  compile with XLA's defaults.
- `reexec_with_allocator()`: the entry points' first statement; on CPU,
  restarts the process with a fast allocator preloaded: mimalloc (the
  cmeel-mimalloc wheel, installed with this package on Linux) or else
  tcmalloc when the system has it. VDM_ALLOCATOR=mimalloc|tcmalloc|system
  picks one; VDM_MALLOC=0 keeps the system allocator.

Why each setting helps, and what was measured and tried: docs/performance.md.

Example (a script of your own, as `python -m vdm.main` does):

  from vdm import runtime
  runtime.reexec_with_allocator()      # before JAX starts
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


# The host allocator: XLA:CPU mallocs each step's large temporaries on its
# worker threads; glibc maps (and page-faults in) such blocks afresh on every
# call, mimalloc and tcmalloc keep the freed pages for reuse. mimalloc comes
# from the package index (the cmeel-mimalloc wheel, a dependency on Linux), so
# no root is needed; tcmalloc (a system package) is the fallback.
ALLOCATORS = ("mimalloc", "tcmalloc")   # in order of preference
ENV_ALLOCATOR = "VDM_ALLOCATOR"   # 'mimalloc', 'tcmalloc' or 'system'
ENV_MALLOC = "VDM_MALLOC"         # '0': keep the system allocator
_ALLOCATOR_TRIED = "VDM_ALLOCATOR_TRIED"  # set by the re-exec (no loop)
# Settings an allocator gets unless the environment sets them already.
# mimalloc: keep freed pages instead of returning them to the OS after 10 ms
# (its default), which would page-fault them in again on the next step.
ALLOCATOR_SETTINGS = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
                      "tcmalloc": {}}
_TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
_MIMALLOC_WHEEL = ("cmeel-mimalloc", "cmeel.prefix/lib/libmimalloc.so")


def find_allocator(name: str) -> Optional[str]:
  """The library to preload for allocator `name`, or None if not installed.

  Args:
    name: 'mimalloc' (the cmeel-mimalloc wheel's libmimalloc.so, a path) or
      'tcmalloc' (the system's, a library name: Debian/Ubuntu `apt install
      libtcmalloc-minimal4`, conda gperftools).
  Returns:
    A path or library name for LD_PRELOAD, or None.
  Raises:
    ValueError: `name` is not one of `ALLOCATORS`.
  """
  if name not in ALLOCATORS:
    raise ValueError(f"unknown allocator {name!r}; expected one of "
                     f"{ALLOCATORS} (or 'system' in {ENV_ALLOCATOR}).")
  if name == "mimalloc":
    distribution, relative = _MIMALLOC_WHEEL
    try:
      path = importlib.metadata.distribution(distribution).locate_file(
          relative)
    except importlib.metadata.PackageNotFoundError:
      return None
    return str(path) if os.path.exists(str(path)) else None
  for library in _TCMALLOC_LIBRARIES:
    found = ctypes.util.find_library(library)
    if found:
      return found
  return None


def choose_allocator(env: Optional[dict[str, str]] = None) -> str:
  """The allocator a CPU process with environment `env` should run with.

  Args:
    env: the environment (default os.environ); VDM_MALLOC=0 or
      VDM_ALLOCATOR=system select the system allocator, VDM_ALLOCATOR=NAME
      one of `ALLOCATORS`; unset: the first installed one of `ALLOCATORS`.
  Returns:
    'mimalloc', 'tcmalloc' or 'system' (also when the one asked for is not
    installed: then a warning says so).
  Raises:
    ValueError: VDM_ALLOCATOR holds an unknown name.
  """
  env = os.environ if env is None else env
  wanted = env.get(ENV_ALLOCATOR, "").strip().lower()
  if env.get(ENV_MALLOC) == "0" or wanted == "system":
    return "system"
  if wanted and wanted not in ALLOCATORS:
    raise ValueError(f"{ENV_ALLOCATOR}={wanted!r}; expected one of "
                     f"{ALLOCATORS + ('system',)} (or unset: the first "
                     "installed of " + ", ".join(ALLOCATORS) + ").")
  for name in (wanted,) if wanted else ALLOCATORS:
    if find_allocator(name):
      return name
  if wanted:
    logging.warning("%s=%s but %s is not installed (mimalloc: pip install "
                    "cmeel-mimalloc; tcmalloc: apt install "
                    "libtcmalloc-minimal4); using the system allocator.",
                    ENV_ALLOCATOR, wanted, wanted)
  return "system"


def loaded_allocator() -> str:
  """The allocator this process runs with: 'mimalloc', 'tcmalloc' (e.g.
  preloaded) or 'system'."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "system"
  for name in ALLOCATORS:
    if f"lib{name}" in maps:
      return name
  return "system"


def allocator_environment(env: Optional[dict[str, str]] = None
                          ) -> dict[str, str]:
  """`env` (default os.environ) with the chosen allocator (`choose_allocator`)
  in LD_PRELOAD and its `ALLOCATOR_SETTINGS`, for a child process that
  computes on the CPU; unchanged for 'system' or when LD_PRELOAD already
  holds an allocator of `ALLOCATORS`."""
  env = dict(os.environ if env is None else env)
  name = choose_allocator(env)
  preload = env.get("LD_PRELOAD", "")
  if name == "system" or any(f"lib{a}" in preload for a in ALLOCATORS):
    return env
  env["LD_PRELOAD"] = " ".join(p for p in (find_allocator(name), preload) if p)
  for key, value in ALLOCATOR_SETTINGS[name].items():
    env.setdefault(key, value)
  return env


def reexec_with_allocator() -> None:
  """Restarts this process (same pid, argv, environment) with the fast
  allocator preloaded (`allocator_environment`), when that helps and is
  possible; else returns.

  For the entry points (`python -m vdm.main`, the benchmarks), as the first
  statement, before JAX starts. Returns without restarting when an
  allocator of `ALLOCATORS` is already loaded, none is installed or the
  environment selects the system's (`choose_allocator`), when JAX may run on
  a GPU/TPU (host allocations matter little there), off Linux, or after one
  attempt.
  """
  if (loaded_allocator() != "system" or os.environ.get(_ALLOCATOR_TRIED)
      or sys.platform != "linux" or not _cpu_backend_expected()):
    return
  env = allocator_environment()
  if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
    return
  env[_ALLOCATOR_TRIED] = "1"
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
          "allocator": loaded_allocator()}
