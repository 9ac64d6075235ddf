r"""The ODE eval's solver error, per image, against a tight reference solve.

  python experiments/ode_tolerance.py --workdir=runs/long --num_images=20 \
      --reference=separate:1e-6 \
      --settings=joint:1e-4,joint:1e-5,separate:1e-4,separate:1e-5

For each test image (spread over the split, as `--mode=eval` picks them) one
dequantisation draw and one Hutchinson probe are fixed (the same key in every
solve), so the solves differ only in the solver's error: each setting
(`error_norm:tol`, rtol = atol = tol, optionally `:gamma` to integrate in
log-SNR) is compared with the reference setting image by image. One JSON line
per setting: the batch-mean bits/dim, its mean error against the reference
(the bias that would enter an eval's figure), the RMS and largest per-image
error, NFE per batch and seconds per image. A setting's figures are one run on
whatever machine ran it: compare rows of one run.
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


def _parse_setting(text: str) -> tuple[str, float, str]:
  parts = text.split(":")
  if len(parts) not in (2, 3):
    raise ValueError(f"setting {text!r}: expected error_norm:tol[:t|gamma], "
                     "e.g. separate:1e-5")
  norm, time_variable = parts[0], parts[2] if len(parts) == 3 else "t"
  try:
    tol = float(parts[1])
  except ValueError:
    tol = -1.0
  if (norm not in ("separate", "joint") or time_variable not in ("t", "gamma")
      or not 0 < tol < 1):
    raise ValueError(f"setting {text!r}: expected error_norm:tol[:t|gamma] "
                     "with error_norm separate or joint and 0 < tol < 1, "
                     "e.g. separate:1e-5")
  return norm, tol, time_variable


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a trained run (make demo writes runs/demo)")
  parser.add_argument("--num_images", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=10)
  parser.add_argument("--reference", default="separate:1e-6")
  parser.add_argument("--settings",
                      default="joint:1e-4,joint:1e-5,separate:1e-4,"
                              "separate:1e-5")
  parser.add_argument("--dequantization", default="truncated_normal",
                      choices=("truncated_normal", "uniform"))
  parser.add_argument("--max_steps", type=int, default=16384)
  parser.add_argument("--out", default="",
                      help="also write every image's figures here (JSON)")
  args = parser.parse_args()
  try:
    reference = _parse_setting(args.reference)
    settings = [_parse_setting(s) for s in args.settings.split(",")]
  except ValueError as error:
    parser.error(str(error))
  if args.num_images < 1 or args.batch_size < 1:
    parser.error("--num_images and --batch_size must be >= 1")
  _bench.require_run(parser, args.workdir)
  runtime.reexec_with_allocator()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import vdm
  from vdm import likelihood
  # pylint: enable=g-import-not-at-top
  run = vdm.load_run(args.workdir)
  if run.model.num_classes:
    parser.error(f"{args.workdir} is class-conditional; this script solves "
                 "the unconditional model only")
  indices = run.dataset.eval_indices("test", args.num_images)
  images = run.dataset.read("test", indices)["image"]
  to_bpd = -1.0 / (run.model.num_dims * math.log(2.0))

  def solve(setting):
    norm, tol, time_variable = setting
    fn = runtime.jit(lambda params, x, key: likelihood.dequantized_log_likelihood(
        run.model.eps_fn(params, None), run.model.gamma_fn(params), x,
        run.model.vocab_size, key, dequantization=args.dequantization,
        rtol=tol, atol=tol, time_variable=time_variable, error_norm=norm,
        max_steps=args.max_steps))
    bpd, nfe, seconds = [], [], 0.0
    for start in range(0, len(indices), args.batch_size):
      x = images[start:start + args.batch_size]
      key = jax.random.fold_in(jax.random.key(7), start)
      if start == 0:       # compile apart from the timed solves
        fn.lower(run.params, x, key).compile()
      begin = time.perf_counter()
      bound, n = jax.device_get(fn(run.params, x, key))
      seconds += time.perf_counter() - begin
      bpd.append(np.asarray(bound, np.float64) * to_bpd)
      nfe.append(int(n))
    return np.concatenate(bpd), nfe, seconds / len(indices)

  def name(setting):
    return ":".join(map(str, setting))

  ref_bpd, ref_nfe, ref_s = solve(reference)
  rows = {"reference": name(reference), "indices": indices.tolist(),
          name(reference): ref_bpd.tolist()}
  print(json.dumps({"setting": name(reference), "reference": True,
                    "bpd": round(float(ref_bpd.mean()), 5),
                    "nfe_per_batch": ref_nfe, "s_per_image": round(ref_s, 2),
                    "num_images": len(indices), "step": run.step}), flush=True)
  for setting in settings:
    bpd, nfe, seconds = solve(setting)
    err = bpd - ref_bpd
    rows[name(setting)] = bpd.tolist()
    print(json.dumps({
        "setting": name(setting), "bpd": round(float(bpd.mean()), 5),
        "mean_error": round(float(err.mean()), 5),
        "mean_error_se": round(float(err.std(ddof=1) / math.sqrt(len(err))),
                               5) if len(err) > 1 else None,
        "rms_error": round(float(np.sqrt(np.mean(err ** 2))), 5),
        "max_abs_error": round(float(np.max(np.abs(err))), 5),
        "nfe_per_batch": nfe, "s_per_image": round(seconds, 2)}), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**rows, **runtime.describe(), **_bench.versions()}, f)


if __name__ == "__main__":
  main()
