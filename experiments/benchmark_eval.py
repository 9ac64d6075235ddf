r"""Eval and sampling benchmark: this library vs the official VDM code.

  python experiments/benchmark_eval.py --mode eval --preset tiny --batch_size 16
  python experiments/benchmark_eval.py --mode sample --preset tiny \
      --batch_size 16 --sample_steps 100

Same model and presets as experiments/benchmark_train.py (the paper U-Net,
configs/cifar10.py; `tiny` = 2 blocks, 32 channels; `cifar10` = 32 blocks,
128 channels), random 32x32x3 uint8 data, each implementation in its own
process.

- `--mode eval`: one eval batch, as the whole-split eval runs it: ours is
  `vdm.train.make_eval_step` (the per-example ELBO terms with the EMA
  parameters, forward only, summed over the batch), the official one its
  `Experiment.eval_step` (the batch's bpd, EMA parameters, no dropout).
  `images_per_s` is the split's throughput at this batch size.
- `--mode sample`: ancestral sampling of `--batch_size` images in
  `--sample_steps` steps, decoded to integers: ours is
  `vdm.generation.make_sampler` (one compiled lax.scan), the official one its
  `Experiment_VDM.sample_fn` (a lax.fori_loop over `VDM.sample`). x_hat is
  not clipped in either (the official sampler does not clip; --clip_x turns
  it on for ours, as configs' `sampling.clip_x`).

The official code runs experiments/official/bench_official.py in
experiments/.peer-venv (experiments/peer_env.sh); ours runs with the
allocator and XLA options a run uses. --official_with_our_xla_options adds
the official code under the same runtime settings. One JSON line per
implementation (keys as benchmark_train.py's), then a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import _bench
import benchmark_train

PRESETS = benchmark_train.PRESETS
DEFAULT_STEPS = {"eval": {"tiny": 20, "cifar10": 5},
                 "sample": {"tiny": 3, "cifar10": 2}}


def run_ours(mode: str, preset: str, batch_size: int, steps: int,
             warmup: int, seed: int, sample_steps: int,
             clip_x: bool) -> dict:
  """Times this library's eval step or sampler in this process."""
  sys.path.insert(0, _bench.REPO)
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from vdm import generation
  from vdm import parallel
  from vdm import runtime
  from vdm import train
  # pylint: enable=g-import-not-at-top
  rss_after_imports = _bench.peak_rss_mb()
  setup = _bench.train_setup(PRESETS[preset], num_devices=1)
  params = setup.init_state().ema_params
  extra = {}
  if mode == "eval":
    step = train.make_eval_step(
        setup.model, eval_seed=1, mesh=setup.mesh,
        params_sharding=jax.tree.map(lambda x: x.sharding, params))
    rng = np.random.default_rng(seed)
    batch = parallel.shard_batch(setup.mesh, {
        "image": rng.integers(0, 256, (batch_size, *_bench.IMAGE_SHAPE),
                              dtype=np.uint8),
        "label": np.zeros((batch_size,), np.int32),
        "mask": np.ones((batch_size,), bool)})
    bpd, index = [], [0]
    dims = float(np.prod(_bench.IMAGE_SHAPE))

    def call():
      sums = step(params, batch, np.int32(index[0]))
      index[0] += 1
      bpd.append(sums)
      return sums

    step_fn = "vdm.train.make_eval_step"
  else:
    run = generation.make_sampler(setup.model, sampler="ancestral",
                                  num_steps=sample_steps,
                                  num_samples=batch_size, clip_x=clip_x)
    labels = generation.sample_labels(setup.model, batch_size)
    key = jax.random.key(seed)

    def call():
      return run(params, key, labels)

    step_fn = "vdm.generation.make_sampler (ancestral, lax.scan)"
    extra = {"sample_steps": sample_steps, "clip_x": clip_x}
  timing = _bench.time_calls(call, steps=steps, warmup=warmup)
  record = {
      "impl": "vdm", "preset": preset, "path": "jit", "mode": mode,
      "step_fn": step_fn, "batch_size": batch_size,
      "param_count": setup.param_count, **timing.record(),
      "images_per_s": round(batch_size / timing.median_s, 2),
      "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
      "rss_after_imports_mb": round(rss_after_imports, 1),
      **extra, **runtime.describe(), **_bench.versions()}
  if mode == "eval":
    for name, sums in (("bpd_first", bpd[0]), ("bpd_last", bpd[-1])):
      record[name] = round(float(sums["total"]) / float(sums["count"])
                           / (dims * np.log(2.0)), 4)
  else:
    record["s_per_sampler_step"] = round(timing.median_s / sample_steps, 5)
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=sorted(DEFAULT_STEPS),
                      default="eval")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=None,
                      help="timed calls (default: eval 20 tiny, 5 cifar10; "
                      "sample 3 / 2)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--sample_steps", type=int, default=100)
  parser.add_argument("--clip_x", action="store_true",
                      help="sample mode: clip x_hat in ours")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--impl", choices=["vdm", "official", "both"],
                      default="both")
  parser.add_argument("--official_with_our_xla_options", action="store_true",
                      help="also time the official code under this "
                      "library's XLA:CPU options and allocator")
  parser.add_argument("--_child", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.batch_size, args.sample_steps) < 1 or (
      args.steps is not None and args.steps < 1):
    parser.error("--batch_size, --steps and --sample_steps must be >= 1")
  steps = args.steps or DEFAULT_STEPS[args.mode][args.preset]
  if args._child:   # pylint: disable=protected-access
    print(json.dumps(run_ours(args.mode, args.preset, args.batch_size, steps,
                              args.warmup, args.seed, args.sample_steps,
                              args.clip_x)))
    return
  records = []
  if args.impl in ("vdm", "both"):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child",
           "--mode", args.mode, "--preset", args.preset,
           "--batch_size", str(args.batch_size), "--steps", str(steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--sample_steps", str(args.sample_steps)]
    if args.clip_x:
      cmd.append("--clip_x")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=benchmark_train._allocator_environment())  # pylint: disable=protected-access
    if proc.returncode != 0:
      print(f"[vdm] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    else:
      records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  if args.impl in ("official", "both"):
    extra = ("--sample_steps", str(args.sample_steps))
    for ours_opts in (False, True)[:1 + args.official_with_our_xla_options]:
      record = benchmark_train.run_official(
          args.preset, args.batch_size, steps, args.warmup, args.seed,
          our_xla_options=ours_opts, mode=args.mode, extra_args=extra)
      if record:
        records.append(record)
  for record in records:
    print(json.dumps(record))
  print(f"\nmode={args.mode} preset={args.preset} batch={args.batch_size} "
        f"steps={steps}"
        + (f" sample_steps={args.sample_steps}" if args.mode == "sample"
           else "")
        + f" machine={platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} commit={_bench.commit()}")
  print(f"{'impl':<14}{'compile_s':>11}{'call_s':>9}{'img/s':>9}"
        f"{'peak_MB':>10}{'allocator':>11}")
  for r in records:
    print(f"{r['impl']:<14}{r['compile_s']:>11.1f}{r['step_s_median']:>9.3f}"
          f"{r['images_per_s']:>9.2f}{r['peak_rss_mb']:>10.0f}"
          f"{r['allocator']:>11}")
  if len(records) >= 2 and records[0]["impl"] == "vdm":
    ours = records[0]
    for theirs in records[1:]:
      print(f"speed-up ({theirs['impl']} call time / ours): "
            f"{theirs['step_s_median'] / ours['step_s_median']:.2f}x")


if __name__ == "__main__":
  main()
