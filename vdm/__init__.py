"""vdm: Variational Diffusion Models in JAX/Flax.

  import vdm
  run = vdm.load_run("runs/demo")        # a trained run: config, model, EMA
  bpd = run.bpd(x, key=jax.random.key(0))   # [B] bits/dim of a batch
  x = run.sample(16, seed=0)             # [16, ...] integer samples

The math (`vdm.elbo`, `vdm.schedules`, `vdm.weighting`, `vdm.sampling`, ...)
and the system (`vdm.train`, `vdm.training_loop`, `vdm.evaluate`, ...) are
submodules, imported on first use so that `import vdm` stays cheap (no jax,
TensorFlow or Orbax until something needs them).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Submodules reachable as attributes of `vdm` (imported on first access).
_SUBMODULES = (
    "adaptive", "checkpointing", "checks", "checksums", "config_files",
    "config_lib", "decoder", "elbo", "evaluate", "frechet", "generation",
    "input_pipeline", "learned_schedules", "likelihood", "main", "model",
    "model_options", "nets", "parallel", "preemption", "process",
    "reporting", "runs", "runtime", "sampling", "schedules", "train",
    "training_loop", "weighting", "workdir_lock")
# Names re-exported from a submodule: name -> module.
_EXPORTS = {"load_run": "runs", "Run": "runs"}

__all__ = ["__version__", "load_run", "Run", *_SUBMODULES]


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"vdm.{_EXPORTS[name]}"), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"vdm.{name}")
  else:
    raise AttributeError(f"module 'vdm' has no attribute {name!r}; public "
                         f"names: {', '.join(sorted(__all__))}.")
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
