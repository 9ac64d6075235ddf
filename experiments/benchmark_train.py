r"""Train-step benchmark: this library vs the official VDM code, same model.

  python experiments/benchmark_train.py --preset tiny --batch_size 16
  python experiments/benchmark_train.py --preset cifar10 --batch_size 4 \
      --steps 3 --impl both

Presets (DESIGN.md): `tiny` = the paper's U-Net with 2 blocks, 32 channels;
`cifar10` = 32 blocks, 128 channels; 32x32x3 random uint8 batches, learned
linear schedule, continuous time, AdamW + EMA as configured in
configs/cifar10.py. Each implementation runs in its own process (the
official code registers itself as the package `vdm`, and peak RSS must be
per implementation); the official one runs
../shared/peers/google-research-vdm/bench_official.py --path jit (one jit
call per step; on XLA:CPU its lax.scan path is ~12x slower for reasons
unrelated to VDM, see the peer's README) in experiments/.peer-venv
(experiments/peer_env.sh creates it). This library's step is compiled with
its XLA:CPU options (vdm.parallel.compiler_options(), as in training) and
runs with tcmalloc preloaded when it is installed (as vdm.main does:
vdm.parallel.reexec_with_tcmalloc); --official_with_our_xla_options adds a row
for the official step under the same options and allocator (as XLA_FLAGS and
LD_PRELOAD), to separate what they give from what the code gives.

Prints one JSON line per implementation (keys as bench_official.py's) and a
table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from benchmark_nets import PEER_DIR, PEER_PYTHON  # where the official code is

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny uses 8 GroupNorm groups: at 32 channels the official 32 groups of one
# channel normalise the noise embedding away (same parameters and FLOPs).
PRESETS = {"tiny": dict(n_blocks=2, channels=32, num_groups=8),
           "cifar10": dict(n_blocks=32, channels=128, num_groups=32)}


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(preset: str, batch_size: int, steps: int, warmup: int,
             seed: int) -> dict:
  """Times this library's jitted train step (in this process)."""
  rss_imports_before = _rss_mb()
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from vdm import model as model_lib  # pylint: disable=g-import-not-at-top
  from vdm import parallel  # pylint: disable=g-import-not-at-top
  from vdm import train  # pylint: disable=g-import-not-at-top
  import flax, optax  # pylint: disable=g-import-not-at-top,multiple-imports
  del rss_imports_before
  rss_after_imports = _rss_mb()

  compile_s = [0.0]
  compiles = [0]

  def on_duration(event, duration, **_):
    if event in ("/jax/core/compile/backend_compile_duration",
                 "/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration"):
      compile_s[0] += duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles[0] += 1

  monitoring.register_event_duration_secs_listener(on_duration)

  config = cifar10.get_config()
  config.model.net_kwargs.update(PRESETS[preset])
  model = model_lib.build(config.model, (32, 32, 3), 256, 10)
  tx, lr_fn = train.create_optimizer(config.optimizer, 1000)
  state = train.create_train_state(model, tx, jax.random.key(0))
  param_count = sum(int(np.prod(p.shape))
                    for p in jax.tree.leaves(state.params))
  step = jax.jit(lambda s, b: train.train_step(
      s, b, model=model, base_key=jax.random.key(1),
      ema_decay=config.optimizer.ema_decay, adaptive_decay=0.99,
      learning_rate_fn=lr_fn), donate_argnums=(0,),
      compiler_options=parallel.compiler_options())
  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, 256, (batch_size, 32, 32, 3),
                                 dtype=np.uint8),
           "label": np.zeros((batch_size,), np.int32)}
  batch = jax.device_put(batch)

  jax.block_until_ready((state, batch))
  compile_s[0], compiles[0] = 0.0, 0   # count the train step's compile only
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first_call_s = time.perf_counter() - t0
  bpd_first = float(metrics["loss"])
  compiles_before = compiles[0]
  warm = []
  for _ in range(warmup):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    warm.append(time.perf_counter() - t0)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {
      "impl": "vdm", "preset": preset, "path": "jit", "mode": "train",
      "batch_size": batch_size, "timed_steps": steps,
      "param_count": param_count, "compile_s": round(compile_s[0], 3),
      "xla_compiles_before_timing": compiles_before,
      "xla_compiles_during_timing": compiles[0] - compiles_before,
      "first_call_s": round(first_call_s, 3),
      "warmup_call_s": [round(w, 3) for w in warm],
      "step_s_median": round(median, 4), "step_s_min": round(min(times), 4),
      "images_per_s": round(batch_size / median, 2),
      "peak_rss_mb": round(_rss_mb(), 1),
      "rss_after_imports_mb": round(rss_after_imports, 1),
      "bpd_first": round(bpd_first, 4),
      "bpd_last": round(float(metrics["loss"]), 4),
      "tcmalloc": parallel.tcmalloc_loaded(),
      "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "python": platform.python_version(),
  }


def _official_xla_flags() -> str:
  """XLA_FLAGS giving the official process this library's XLA:CPU options."""
  sys.path.insert(0, REPO)
  from vdm import parallel  # pylint: disable=g-import-not-at-top
  flags = [f"--{k}={v}" for k, v in parallel.CPU_COMPILER_OPTIONS.items()]
  return " ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip()


def _tcmalloc_environment() -> dict[str, str]:
  """This environment with tcmalloc preloaded (if installed), as vdm.main
  runs."""
  sys.path.insert(0, REPO)
  from vdm import parallel  # pylint: disable=g-import-not-at-top
  return parallel.tcmalloc_environment()


def run_official(preset: str, batch_size: int, steps: int, warmup: int,
                 seed: int, our_xla_options: bool = False) -> dict | None:
  if not os.path.exists(PEER_PYTHON):
    print(f"[official] skipped: {PEER_PYTHON} missing; create it with "
          "bash experiments/peer_env.sh", file=sys.stderr)
    return None
  cmd = [PEER_PYTHON, os.path.join(PEER_DIR, "bench_official.py"),
         "--preset", preset, "--path", "jit", "--batch_size", str(batch_size),
         "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed)]
  env = dict(os.environ)
  if our_xla_options:
    env = _tcmalloc_environment()
    env["XLA_FLAGS"] = _official_xla_flags()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=env)
  if proc.returncode != 0:
    print(f"[official] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None
  line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
  record = json.loads(line)
  record["impl"] = "official+opts" if our_xla_options else "official"
  record["tcmalloc"] = "tcmalloc" in env.get("LD_PRELOAD", "")
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps (default 20 tiny, 5 cifar10)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--impl", choices=["vdm", "official", "both"],
                      default="both")
  parser.add_argument("--official_with_our_xla_options", action="store_true",
                      help="also time the official step compiled with this "
                      "library's XLA:CPU options (vdm.parallel."
                      "CPU_COMPILER_OPTIONS, as XLA_FLAGS) and allocator "
                      "(tcmalloc, as LD_PRELOAD, when installed): how much "
                      "of the speed-up is the runtime and how much the "
                      "code")
  parser.add_argument("--_child", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.batch_size < 1:
    parser.error(f"--batch_size must be >= 1; got {args.batch_size}")
  steps = args.steps or (20 if args.preset == "tiny" else 5)
  if args._child:   # pylint: disable=protected-access
    print(json.dumps(run_ours(args.preset, args.batch_size, steps,
                              args.warmup, args.seed)))
    return
  records = []
  if args.impl in ("vdm", "both"):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child",
           "--preset", args.preset, "--batch_size", str(args.batch_size),
           "--steps", str(steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env=_tcmalloc_environment())
    records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  if args.impl in ("official", "both"):
    record = run_official(args.preset, args.batch_size, steps, args.warmup,
                          args.seed)
    if record:
      records.append(record)
    if args.official_with_our_xla_options:
      record = run_official(args.preset, args.batch_size, steps, args.warmup,
                            args.seed, our_xla_options=True)
      if record:
        records.append(record)
  for record in records:
    print(json.dumps(record))
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  print(f"\npreset={args.preset} batch={args.batch_size} steps={steps} "
        f"machine={platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} commit={commit}")
  print(f"{'impl':<14}{'params':>12}{'compile_s':>11}{'step_s':>9}"
        f"{'img/s':>9}{'peak_MB':>10}{'tcmalloc':>10}")
  for r in records:
    print(f"{r['impl']:<14}{r['param_count']:>12,}{r['compile_s']:>11.1f}"
          f"{r['step_s_median']:>9.3f}{r['images_per_s']:>9.2f}"
          f"{r['peak_rss_mb']:>10.0f}{'yes' if r['tcmalloc'] else 'no':>10}")
  if len(records) >= 2 and records[0]["impl"] == "vdm":
    ours = records[0]
    for theirs in records[1:]:
      print(f"speed-up ({theirs['impl']} step time / ours): "
            f"{theirs['step_s_median'] / ours['step_s_median']:.2f}x; "
            f"memory (ours / {theirs['impl']} peak RSS): "
            f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
  main()
