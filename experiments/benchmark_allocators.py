r"""Host allocators on this library's real train steps: glibc vs tcmalloc vs
mimalloc, in alternation.

  python experiments/benchmark_allocators.py                 # all presets
  python experiments/benchmark_allocators.py --presets tiny --rounds 1 \
      --steps 3                                              # a smoke run

Each measurement is one child process (this script with --_child) that
builds a train step exactly as a run does and times it, with the allocator
chosen by `vdm.runtime.allocator_environment` under VDM_ALLOCATOR=NAME
(mimalloc gets its `runtime.ALLOCATOR_SETTINGS`, e.g. MIMALLOC_PURGE_DELAY=-1;
'system' is glibc's malloc). The children run round-robin (A B C A B C ...,
`--rounds` rounds per preset), so a change in the load of a shared machine
hits every allocator alike; the summary gives each allocator's median over
the rounds and the ratios of the medians.

Presets: `tiny` and `cifar10` are experiments/_bench.py's (the paper U-Net,
configs/cifar10.py, random 32x32x3 batches; batch 16 and 4 by default);
`demo` is configs/mnist5k.py's step on its real first batch (batch 32).

Per child: median and min wall seconds per step and process CPU seconds per
step (`_bench.time_calls`), minor page faults per step over the timed steps
(glibc's zero-filled fresh mappings show here), peak RSS, and the allocator
the child found loaded (`runtime.loaded_allocator`); a child whose allocator
is not the one asked for (e.g. tcmalloc not installed) is reported and left
out of the summary.
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

import _bench

ALLOCATORS = ("mimalloc", "tcmalloc", "system")
BATCH = {"tiny": 16, "cifar10": 4, "demo": 32}
STEPS = {"tiny": 20, "cifar10": 5, "demo": 30}


def _demo_setup():
  """(step, state, batch) of configs/mnist5k.py as `vdm.main` builds them."""
  sys.path.insert(0, _bench.REPO)
  # pylint: disable=g-import-not-at-top
  from vdm import config_files
  from vdm import training_loop
  # pylint: enable=g-import-not-at-top
  config = config_files.get_config(
      os.path.join(_bench.REPO, "configs", "mnist5k.py"))
  trainer = training_loop.Trainer(config)
  return trainer.train_step, trainer.init_state(), trainer.global_batch(0)


def run_child(preset: str, batch_size: int, steps: int, warmup: int) -> dict:
  """Times the train step of `preset` in this process."""
  sys.path.insert(0, _bench.REPO)
  from vdm import runtime  # pylint: disable=g-import-not-at-top
  if preset == "demo":
    step, state, batch = _demo_setup()
    batch_size = int(batch["image"].shape[0])
  else:
    setup = _bench.train_setup(_bench.PRESETS[preset], num_devices=1)
    step, state, batch = setup.step, setup.init_state(), setup.batch(
        batch_size)

  def call():
    nonlocal state
    state, metrics = step(state, batch)
    return metrics

  _bench.time_calls(call, steps=1, warmup=warmup)       # compile, warm up
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  timing = _bench.time_calls(call, steps=steps, warmup=0)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
  record = timing.record()
  return {
      "preset": preset, "batch_size": batch_size, "mode": "train",
      "allocator": runtime.loaded_allocator(),
      "allocator_asked": os.environ.get(runtime.ENV_ALLOCATOR, ""),
      "mimalloc_purge_delay": os.environ.get("MIMALLOC_PURGE_DELAY"),
      "timed_steps": steps,
      "step_s_median": record["step_s_median"],
      "step_s_min": record["step_s_min"],
      "cpu_s_median": record["cpu_s_median"],
      "xla_compiles_during_timing": record["xla_compiles_during_timing"],
      # over the timed steps and the one untimed call before them
      "minor_faults_per_step": round(faults / (steps + 1)),
      "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
      **_bench.versions(),
  }


def _child_environment(allocator: str) -> dict[str, str]:
  sys.path.insert(0, _bench.REPO)
  from vdm import runtime  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", runtime.ENV_MALLOC)}
  env[runtime.ENV_ALLOCATOR] = allocator
  env.setdefault("JAX_PLATFORMS", "cpu")
  return runtime.allocator_environment(env)


def _summary(records: list[dict], presets: list[str],
             allocators: list[str]) -> None:
  print(f"\nmachine={platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} commit={_bench.commit()}")
  print(f"{'preset':<9}{'allocator':<10}{'runs':>5}{'step_s':>9}"
        f"{'cpu_s':>9}{'faults/step':>13}{'peak_MB':>9}"
        f"{'vs system':>11}{'vs tcmalloc':>13}")
  for preset in presets:
    medians = {}
    rows = []
    for name in allocators:
      mine = [r for r in records
              if r["preset"] == preset and r["allocator"] == name
              and r["allocator_asked"] == name]
      if not mine:
        continue
      medians[name] = statistics.median(r["step_s_median"] for r in mine)
      rows.append((name, mine))
    for name, mine in rows:
      ratios = []
      for base in ("system", "tcmalloc"):
        ratios.append(f"{medians[base] / medians[name]:.3f}x"
                      if base in medians else "-")
      print(f"{preset:<9}{name:<10}{len(mine):>5}{medians[name]:>9.4f}"
            f"{statistics.median(r['cpu_s_median'] for r in mine):>9.4f}"
            f"{statistics.median(r['minor_faults_per_step'] for r in mine):>13,.0f}"
            f"{max(r['peak_rss_mb'] for r in mine):>9.0f}"
            f"{ratios[0]:>11}{ratios[1]:>13}")
  print("ratios: the baseline's median step time / this allocator's "
        "(> 1: faster than the baseline)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,cifar10,demo",
                      help="comma-separated, of " + ", ".join(BATCH))
  parser.add_argument("--allocators", default=",".join(ALLOCATORS),
                      help="comma-separated, of " + ", ".join(ALLOCATORS))
  parser.add_argument("--rounds", type=int, default=3,
                      help="children per allocator and preset")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per child (default: tiny 20, "
                      "cifar10 5, demo 30)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=None,
                      help="tiny/cifar10 batch (default 16 / 4)")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  presets = [p for p in args.presets.split(",") if p]
  allocators = [a for a in args.allocators.split(",") if a]
  for name, valid, values in (("--presets", BATCH, presets),
                              ("--allocators", ALLOCATORS, allocators)):
    bad = [v for v in values if v not in valid]
    if bad or not values:
      parser.error(f"{name}: {bad or values} not among {list(valid)}")
  if args.rounds < 1 or (args.steps is not None and args.steps < 1):
    parser.error("--rounds and --steps must be >= 1")
  if args._child:   # pylint: disable=protected-access
    preset = args._child  # pylint: disable=protected-access
    print(json.dumps(run_child(
        preset, args.batch_size or BATCH[preset],
        args.steps or STEPS[preset], args.warmup)))
    return
  records = []
  for preset in presets:
    for _ in range(args.rounds):
      for name in allocators:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", preset,
               "--warmup", str(args.warmup)]
        if args.steps:
          cmd += ["--steps", str(args.steps)]
        if args.batch_size:
          cmd += ["--batch_size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              check=False, env=_child_environment(name))
        if proc.returncode != 0:
          print(f"[{preset} {name}] failed:\n{proc.stderr[-3000:]}",
                file=sys.stderr)
          continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        if record["allocator"] != name:
          print(f"[{preset} {name}] ran with {record['allocator']} (not "
                "installed?); left out", file=sys.stderr)
        print(json.dumps(record), flush=True)
        records.append(record)
  _summary(records, presets, allocators)


if __name__ == "__main__":
  main()
