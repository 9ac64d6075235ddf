"""What the benchmarks share: presets, the train step, timing, memory, versions.

Importable without this library and without JAX at module level: the official
code's process (experiments/_peer_nets.py, in experiments/.peer-venv) times
its network with the same helpers. Everything that needs `vdm` imports it
inside the function.

Timing (STYLE.md, Benchmarks): the first call (trace, lowering, XLA compile
and one run) is timed apart from the steady state; every call ends in
`jax.block_until_ready`; a figure is the median of the timed calls.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The official code and the interpreter that runs it (PEER_DIR / PEER_PYTHON
# in the environment override both, e.g. on a machine with its own venv):
# ../shared/peers where it exists (offline), else the clone at the pinned
# commit that experiments/peer_env.sh makes, patched by
# experiments/official/official.patch.
_SHARED_PEER = os.path.join(REPO, "..", "shared", "peers",
                            "google-research-vdm")
PEER_DIR = os.environ.get("PEER_DIR") or (
    _SHARED_PEER if os.path.isdir(_SHARED_PEER)
    else os.path.join(HERE, ".peer-src"))
PEER_PYTHON = os.environ.get("PEER_PYTHON") or os.path.join(
    HERE, ".peer-venv", "bin", "python")
IMAGE_SHAPE = (32, 32, 3)


def num_groups_for(channels: int) -> int:
  """GroupNorm groups for a paper U-Net of `channels` channels.

  The official code uses Flax's default of 32 groups at every width (its
  ScoreUNet calls `nn.GroupNorm()`). At 128 channels (cifar10) ours uses the
  same 32. At 32 channels (tiny) 32 groups would hold one channel each, which
  normalises the additive noise embedding away; our ResnetBlock refuses that,
  so narrow presets keep 4 channels per group (tiny: 8). The group count
  changes neither the parameters nor the FLOPs of a GroupNorm, so the two
  codes' steps still do the same work.
  """
  return max(1, min(32, channels // 4))


def _preset(num_res_blocks: int, channels: int) -> dict[str, int]:
  return dict(num_res_blocks=num_res_blocks, channels=channels,
              num_groups=num_groups_for(channels))


# Sizes of the paper U-Net (`vdm_unet`, net_kwargs on top of
# configs/cifar10.py): `tiny` and `cifar10` are the official benchmark's
# presets (DESIGN.md); `small` is for scaling runs only.
PRESETS = {"tiny": _preset(2, 32), "small": _preset(8, 64),
           "cifar10": _preset(32, 128)}
# The official ScoreUNet's settings at the presets it has.
OFFICIAL_PRESETS = {"tiny": dict(sm_n_layer=2, sm_n_embd=32),
                    "cifar10": dict(sm_n_layer=32, sm_n_embd=128)}


def require_run(parser, workdir: str) -> None:
  """Stops the script with a one-line message when `workdir` holds no
  trained run (the scripts that read one call this before importing JAX)."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    parser.error(f"{workdir} holds no run (config.json); train one first, "
                 "e.g. `make demo` for runs/demo")


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB


def versions() -> dict[str, Any]:
  """Package versions and the machine, for every JSON record."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "python": platform.python_version()}


def commit() -> str:
  """This checkout's commit (with `-dirty` for local changes), or ''."""
  return subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                        capture_output=True, text=True,
                        check=False).stdout.strip()


# ------------------------------------------------------------------ timing


class _CompileMonitor:
  """Seconds and count of JAX compilations (trace, lowering to MLIR, XLA
  backend compile) since the last `reset`, from JAX's monitoring events."""

  _EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    self.seconds, self.compiles = 0.0, 0
    monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_duration(self, event: str, duration: float, **_):
    if event in self._EVENTS:
      self.seconds += duration
    if event == self._EVENTS[-1]:
      self.compiles += 1

  def reset(self):
    self.seconds, self.compiles = 0.0, 0


_MONITOR: list[_CompileMonitor] = []


@dataclasses.dataclass
class Timing:
  """Wall (and process CPU) seconds of one benchmarked call."""
  compile_s: float             # JAX compile work during the first call
  first_call_s: float          # compile + one run
  warmup_call_s: list[float]   # untimed calls after the first
  times_s: list[float]         # the timed (steady-state) calls
  cpu_times_s: list[float]     # process CPU seconds of each timed call
  compiles_before_timing: int  # XLA compiles in the first and warm-up calls
  compiles_during_timing: int  # should be 0: a recompile is a bug
  output: Any                  # what the last call returned

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  def record(self) -> dict[str, Any]:
    """The JSON keys of bench_official.py that a timing fills."""
    return {
        "compile_s": round(self.compile_s, 3),
        "xla_compiles_before_timing": self.compiles_before_timing,
        "xla_compiles_during_timing": self.compiles_during_timing,
        "first_call_s": round(self.first_call_s, 4),
        "warmup_call_s": [round(t, 4) for t in self.warmup_call_s],
        "timed_steps": len(self.times_s),
        "step_s_median": round(self.median_s, 5),
        "step_s_min": round(min(self.times_s), 5),
        # CPU seconds of this process per call (all threads): less sensitive
        # than wall time to other processes on a shared machine.
        "cpu_s_median": round(statistics.median(self.cpu_times_s), 5),
    }


def time_calls(call: Callable[[], Any], *, steps: int,
               warmup: int = 1) -> Timing:
  """Times `call()`: the first call apart, `warmup` more, then `steps`.

  Args:
    call: runs one step and returns its outputs (a closure that threads a
      donated state through `nonlocal` does the same as the train loop).
      Each call is followed by `jax.block_until_ready` on what it returns.
    steps: timed calls (>= 1).
    warmup: untimed calls after the first.
  Returns:
    The `Timing`; `compile_s` counts the JAX compile work done inside these
    calls (0 for a function compiled beforehand, e.g. by `compile_timed`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps must be >= 1 and warmup >= 0; got steps={steps},"
                     f" warmup={warmup}.")
  if not _MONITOR:
    _MONITOR.append(_CompileMonitor())
  monitor = _MONITOR[0]
  monitor.reset()
  t0 = time.perf_counter()
  output = jax.block_until_ready(call())
  first_call_s = time.perf_counter() - t0
  compile_s = monitor.seconds
  warm = []
  for _ in range(warmup):
    t0 = time.perf_counter()
    output = jax.block_until_ready(call())
    warm.append(time.perf_counter() - t0)
  compiles_before = monitor.compiles
  times, cpu_times = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    output = jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  return Timing(compile_s=compile_s, first_call_s=first_call_s,
                warmup_call_s=warm, times_s=times, cpu_times_s=cpu_times,
                compiles_before_timing=compiles_before,
                compiles_during_timing=monitor.compiles - compiles_before,
                output=output)


def compile_timed(jitted, *args) -> tuple[Any, Any, float]:
  """(lowered, compiled, seconds of lowering + compiling) of a jitted
  function at `args`; for FLOP counts, HLO text and memory analysis."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  return lowered, compiled, time.perf_counter() - t0


# ------------------------------------------------------ this library's step


@dataclasses.dataclass
class TrainSetup:
  """This library's train step at a preset, as `vdm.training_loop.Trainer`
  builds it (same factory, shardings and key), on random 32x32x3 batches."""
  model: Any
  mesh: Any
  step: Any                    # train.make_train_step(...)
  init_state: Callable[[], Any]
  param_count: int

  def batch(self, batch_size: int, seed: int = 0) -> dict:
    """A random uint8 batch, sharded over the mesh as the loop's are."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vdm import parallel  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    return parallel.shard_batch(self.mesh, {
        "image": rng.integers(0, 256, (batch_size, *IMAGE_SHAPE),
                              dtype=np.uint8),
        "label": np.zeros((batch_size,), np.int32)})


def train_setup(net_kwargs: dict[str, Any], *, num_devices: int = 1,
                fsdp: bool = False, dtype: str = "float32") -> TrainSetup:
  """configs/cifar10.py with `net_kwargs`, built as a run builds it.

  Args:
    net_kwargs: overrides of `config.model.net_kwargs` (a `PRESETS` entry).
    num_devices: devices of the mesh.
    fsdp: split the train state over the mesh.
    dtype: the net's compute dtype (parameters, optimizer and ELBO stay
      float32).
  """
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vdm import config_files
  from vdm import model as model_lib
  from vdm import parallel
  from vdm import train
  # pylint: enable=g-import-not-at-top
  config = config_files.get_config(
      os.path.join(REPO, "configs", "cifar10.py"))
  config.model.net_kwargs.update(net_kwargs)
  config.model.net_kwargs.dtype = dtype
  model = model_lib.build(config.model, IMAGE_SHAPE, 256, 10)
  tx, learning_rate_fn = train.create_optimizer(config.optimizer,
                                                config.training.num_steps)
  mesh = parallel.make_mesh(num_devices)
  init, abstract, state_sharding = train.make_init(model, tx, mesh=mesh,
                                                   fsdp=fsdp)
  step = train.make_train_step(
      model, seed=config.training.seed, ema_decay=config.optimizer.ema_decay,
      adaptive_decay=config.model.adaptive_decay,
      learning_rate_fn=learning_rate_fn, state_sharding=state_sharding,
      mesh=mesh)
  key_init = jax.random.key(config.training.seed)
  param_count = sum(int(np.prod(p.shape))
                    for p in jax.tree.leaves(abstract.params))
  return TrainSetup(model=model, mesh=mesh, step=step,
                    init_state=lambda: init(key_init),
                    param_count=param_count)
