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
experiments/official/bench_official.py --mode train (the official train step,
one jit call per step; on XLA:CPU its lax.scan path is ~12x slower for
reasons unrelated to VDM) in experiments/.peer-venv on the official code at
its pinned commit with the project's compatibility patch
(experiments/peer_env.sh sets both up). This library's step is the one a run
ships: built by `vdm.train.make_train_step` (through experiments/_bench.py)
with the run's shardings, key and XLA:CPU options (`vdm.runtime.jit`), on a
one-device mesh, and run with the allocator vdm.main preloads (mimalloc, else
tcmalloc: `vdm.runtime.allocator_environment`; VDM_ALLOCATOR=system or
VDM_MALLOC=0 for glibc's), named in the JSON's `allocator`;
--official_with_our_xla_options adds a row for the official step under the
same options and allocator (as XLA_FLAGS and LD_PRELOAD), to separate what
they give from what the code gives.

Prints one JSON line per implementation (keys as bench_official.py's) and a
table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import _bench

PRESETS = {name: _bench.PRESETS[name] for name in _bench.OFFICIAL_PRESETS}


def run_ours(preset: str, batch_size: int, steps: int, warmup: int,
             seed: int) -> dict:
  """Times this library's train step (in this process), as a run builds it:
  `vdm.train.make_train_step` with the run's shardings and key."""
  sys.path.insert(0, _bench.REPO)
  # pylint: disable=g-import-not-at-top
  from vdm import runtime
  # The loop's module, which imports train.py and the rest of the system a
  # run loads (Orbax, TensorBoard, ...), as `vdm.train` did before the split.
  from vdm import training_loop  # noqa: F401  (counted in rss_after_imports_mb)
  # pylint: enable=g-import-not-at-top
  rss_after_imports = _bench.peak_rss_mb()

  setup = _bench.train_setup(PRESETS[preset], num_devices=1)
  state = setup.init_state()
  batch = setup.batch(batch_size, seed)
  bpd = []

  def call():
    nonlocal state
    state, metrics = setup.step(state, batch)
    bpd.append(metrics["loss"])
    return metrics

  timing = _bench.time_calls(call, steps=steps, warmup=warmup)
  return {
      "impl": "vdm", "preset": preset, "path": "jit", "mode": "train",
      "batch_size": batch_size, "param_count": setup.param_count,
      **timing.record(),
      "images_per_s": round(batch_size / timing.median_s, 2),
      "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
      "rss_after_imports_mb": round(rss_after_imports, 1),
      "bpd_first": round(float(bpd[0]), 4),
      "bpd_last": round(float(bpd[-1]), 4),
      **runtime.describe(), **_bench.versions(),
  }


def _official_xla_flags() -> str:
  """XLA_FLAGS giving the official process this library's XLA:CPU options."""
  sys.path.insert(0, _bench.REPO)
  from vdm import runtime  # pylint: disable=g-import-not-at-top
  return " ".join([os.environ.get("XLA_FLAGS", "")]
                  + runtime.cpu_xla_flags()).strip()


def _allocator_environment() -> dict[str, str]:
  """This environment with the allocator vdm.main runs with preloaded."""
  sys.path.insert(0, _bench.REPO)
  from vdm import runtime  # pylint: disable=g-import-not-at-top
  return runtime.allocator_environment()


def _preloaded_allocator(env: dict[str, str]) -> str:
  """The allocator LD_PRELOAD in `env` names, or 'system'."""
  preload = env.get("LD_PRELOAD", "")
  for name in ("mimalloc", "tcmalloc"):
    if f"lib{name}" in preload:
      return name
  return "system"


OFFICIAL_SCRIPT = os.path.join(_bench.HERE, "official", "bench_official.py")


def run_official(preset: str, batch_size: int, steps: int, warmup: int,
                 seed: int, our_xla_options: bool = False, mode: str = "train",
                 extra_args: tuple[str, ...] = ()) -> dict | None:
  """Times the official code's `mode` step in its own process
  (experiments/official/bench_official.py in experiments/.peer-venv).

  With `our_xla_options`, under this library's XLA:CPU options (as
  XLA_FLAGS) and allocator (as LD_PRELOAD). Returns its JSON record, or None
  (with the reason on stderr) when the peer venv is missing or it failed.
  """
  if not os.path.exists(_bench.PEER_PYTHON):
    print(f"[official] skipped: {_bench.PEER_PYTHON} missing; create it with "
          "bash experiments/peer_env.sh", file=sys.stderr)
    return None
  cmd = [_bench.PEER_PYTHON, OFFICIAL_SCRIPT, "--peer_dir", _bench.PEER_DIR,
         "--preset", preset, "--mode", mode, "--batch_size", str(batch_size),
         "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed),
         *extra_args]
  env = dict(os.environ)
  if our_xla_options:
    env = _allocator_environment()
    env["XLA_FLAGS"] = _official_xla_flags()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=env)
  if proc.returncode != 0:
    print(f"[official] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None
  line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
  record = json.loads(line)
  record["impl"] = "official+opts" if our_xla_options else "official"
  record["allocator"] = _preloaded_allocator(env)
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
                      "library's XLA:CPU options (vdm.runtime."
                      "CPU_COMPILER_OPTIONS, as XLA_FLAGS) and allocator "
                      "(as LD_PRELOAD): how much "
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
                          env=_allocator_environment())
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
  commit = _bench.commit()
  print(f"\npreset={args.preset} batch={args.batch_size} steps={steps} "
        f"machine={platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} commit={commit}")
  print(f"{'impl':<14}{'params':>12}{'compile_s':>11}{'step_s':>9}"
        f"{'img/s':>9}{'peak_MB':>10}{'allocator':>11}")
  for r in records:
    print(f"{r['impl']:<14}{r['param_count']:>12,}{r['compile_s']:>11.1f}"
          f"{r['step_s_median']:>9.3f}{r['images_per_s']:>9.2f}"
          f"{r['peak_rss_mb']:>10.0f}{r['allocator']:>11}")
  if len(records) >= 2 and records[0]["impl"] == "vdm":
    ours = records[0]
    for theirs in records[1:]:
      print(f"speed-up ({theirs['impl']} step time / ours): "
            f"{theirs['step_s_median'] / ours['step_s_median']:.2f}x; "
            f"memory (ours / {theirs['impl']} peak RSS): "
            f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
  main()
