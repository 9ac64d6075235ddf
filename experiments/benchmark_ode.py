r"""ODE eval throughput of a trained run: images/s and NFE per probe count.

  make demo      # trains runs/demo, the demo's model
  python experiments/benchmark_ode.py --workdir=runs/demo --batch_size=8 \
      --num_probes=1,4

Times the eval's own ODE step (`vdm.train.ode_eval_step`, compiled through
`runtime.jit` as `--mode=eval` compiles it) on one batch of test images spread
over the split: the solve's network evaluations (NFE: each one forward pass
and `num_probes` vjps of the network for the whole batch), its wall time,
images/s and seconds per evaluation. The compile is timed apart (`.lower()
.compile()`), then one solve per probe count (a solve takes minutes on a
CPU: the figure is one run, not a median). One JSON line per probe count.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import _bench

sys.path.insert(0, _bench.REPO)

from vdm import runtime  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a trained run (make demo writes runs/demo)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_probes", default="1,4",
                      help="comma-separated Hutchinson probe counts")
  parser.add_argument("--tol", type=float, default=1e-5,
                      help="the solver's rtol = atol (the eval's default)")
  parser.add_argument("--error_norm", default="separate",
                      choices=("separate", "joint"),
                      help="the solver's error norm (the eval's default: "
                           "separate; joint measured the figures before "
                           "2026-12-07)")
  parser.add_argument("--dequantization", default="truncated_normal",
                      choices=("truncated_normal", "uniform"))
  args = parser.parse_args()
  try:
    probe_counts = [int(p) for p in args.num_probes.split(",")]
  except ValueError:
    parser.error(f"--num_probes={args.num_probes!r}: expected ints, e.g. 1,4")
  if args.batch_size < 1 or min(probe_counts) < 1:
    parser.error("--batch_size and every --num_probes must be >= 1")
  _bench.require_run(parser, args.workdir)
  runtime.reexec_with_allocator()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import vdm
  from vdm import train
  # pylint: enable=g-import-not-at-top
  run = vdm.load_run(args.workdir)
  indices = run.dataset.eval_indices("test", args.batch_size)
  rows = run.dataset.read("test", indices)
  batch = {"image": rows["image"], "label": rows["label"],
           "mask": np.ones(len(indices), bool)}
  for probes in probe_counts:
    step = runtime.jit(functools.partial(
        train.ode_eval_step, model=run.model, eval_key=jax.random.key(1),
        dequantization=args.dequantization, num_draws=1, rtol=args.tol,
        atol=args.tol, num_probes=probes, error_norm=args.error_norm))
    start = time.perf_counter()
    compiled = step.lower(run.params, batch, np.int32(0)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    sums = jax.device_get(compiled(run.params, batch, np.int32(0)))
    solve_s = time.perf_counter() - start
    nfe = int(sums["nfe"])
    bpd = float(sums["ode_total"]) / (len(indices) * run.model.num_dims
                                      * math.log(2.0))
    print(json.dumps({
        "workdir": args.workdir, "step": run.step,
        "batch_size": len(indices), "num_probes": probes, "tol": args.tol,
        "error_norm": args.error_norm,
        "dequantization": args.dequantization, "nfe": nfe,
        "solve_s": round(solve_s, 1), "compile_s": round(compile_s, 1),
        "images_per_s": round(len(indices) / solve_s, 4),
        "s_per_image": round(solve_s / len(indices), 2),
        "s_per_evaluation": round(solve_s / nfe, 4),
        "bpd_ode_of_the_batch": round(bpd, 4),
        **runtime.describe(), **_bench.versions()}), flush=True)


if __name__ == "__main__":
  main()
