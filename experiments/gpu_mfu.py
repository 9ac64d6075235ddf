r"""MFU of the paper's CIFAR-10 train step on one GPU, fused GroupNorm off/on.

  python experiments/gpu_mfu.py                  # H100: < 8 minutes
  python experiments/gpu_mfu.py --flag_sets all  # + XLA:GPU flag variants
  python experiments/gpu_mfu.py --smoke          # CPU check: tiny, batch 2

For each GroupNorm kernel setting (`fused_norm` off = XLA's unfused graph,
on = the Pallas kernel of vdm/nets/fused_norm.py) and each batch (128, 256
and the largest that fits): the train step `train.make_train_step` builds
(bf16 compute, float32 parameters and ELBO), its FLOPs from the lowered
program's cost analysis (as experiments/benchmark_scaling.py), the median
step time and MFU = FLOPs / time / peak (bf16 dense peak of the chip).

The largest batch is found without running failed sizes: each candidate is
only compiled and its `memory_analysis()` (arguments + outputs + temporaries
- aliased) compared with the device's memory limit; doubling from 256, then
bisection on multiples of 64, within --search_budget_s. Only the winner is
timed.

XLA:GPU flags that may help (each run in a child process, since XLA reads
its flags once; an unknown flag fails only that child) are in `FLAG_SETS`;
`--flag_sets NAME,...` or `all` adds them after the baseline. The official
network's step runs too when its code is present
(experiments/benchmark_train.py --impl official). One JSON line per
measurement, then a table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _bench  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> XLA_FLAGS added, with why each might help this step (unmeasured
# until a GPU run; results go to docs/performance.md).
FLAG_SETS = {
    # Replay each step's kernels as a CUDA graph: the U-Net launches
    # thousands of small kernels per step.
    "command_buffers": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,"
                       "CUDNN,CUSTOM_CALL",
    # Let XLA's Triton emitter fuse the 1x1 dense layers with neighbours.
    "triton_gemm_any": "--xla_gpu_triton_gemm_any=true",
    # Fewer, larger reduction fusions (GroupNorm statistics).
    "priority_fusion_off": "--xla_gpu_enable_priority_fusion=false",
    # Exhaustive convolution autotuning (slower compile).
    "autotune_5": "--xla_gpu_autotune_level=5",
}


def _worker(args) -> list[dict]:
  """Measures in this process (XLA_FLAGS already set by the parent)."""
  import jax  # pylint: disable=g-import-not-at-top
  import benchmark_scaling  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  peak, peak_source = benchmark_scaling.peak_flops(device.device_kind,
                                                   args.dtype)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  preset = dict(_bench.PRESETS[args.preset])
  records = []
  deadline = time.monotonic() + args.budget_s
  for fused in args.fused:
    setup = _bench.train_setup(dict(preset, fused_norm=fused),
                               dtype=args.dtype)

    abstract_state = jax.eval_shape(setup.init_state)

    def bytes_needed(batch_size):
      lowered = setup.step.lower(abstract_state, setup.batch(batch_size))
      mem = lowered.compile().memory_analysis()
      if mem is None:
        return None
      return (mem.argument_size_in_bytes + mem.output_size_in_bytes +
              mem.temp_size_in_bytes - mem.alias_size_in_bytes)

    sizes = list(args.batch_sizes)
    if args.search and limit:
      largest = _largest_batch(bytes_needed, limit, start=max(sizes),
                               deadline=min(deadline, time.monotonic() +
                                            args.search_budget_s))
      if largest and largest not in sizes:
        sizes.append(largest)
    for batch_size in sizes:
      if time.monotonic() > deadline:
        print(f"# budget spent: skipping batch {batch_size}", flush=True)
        continue
      record = _time_step(setup, batch_size, args, peak)
      record.update(fused_norm=fused, peak_flops=peak,
                    peak_flops_source=peak_source, memory_limit=limit,
                    device_kind=device.device_kind,
                    xla_flags=os.environ.get("XLA_FLAGS", ""),
                    flag_set=args.flag_set)
      print(json.dumps(record), flush=True)
      records.append(record)
  return records


def _largest_batch(bytes_needed, limit, *, start, deadline):
  """Largest batch whose compiled step fits `limit` bytes (compile only)."""
  fits, fails = None, None
  size = start
  while time.monotonic() < deadline:
    need = bytes_needed(size)
    print(f"# batch {size}: {need and need / 2**30:.2f} GiB of "
          f"{limit / 2**30:.2f}", flush=True)
    if need is not None and need <= limit:
      fits = size
      if fails is None:
        size *= 2
        continue
    else:
      fails = size
    if fits is None:                 # even `start` does not fit
      size //= 2
      if size < 1:
        return None
      continue
    step = max(64, (fails - fits) // 2 // 64 * 64)
    if fails - fits <= 64:
      break
    size = fits + step
  return fits


def _time_step(setup, batch_size, args, peak) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import benchmark_scaling  # pylint: disable=g-import-not-at-top
  state = setup.init_state()
  batch = setup.batch(batch_size)
  lowered, compiled, compile_s = _bench.compile_timed(setup.step, state,
                                                      batch)
  flops = benchmark_scaling._cost_flops(lowered)  # pylint: disable=protected-access

  def call():
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics

  timing = _bench.time_calls(call, steps=args.steps, warmup=1)
  median = statistics.median(timing.times_s)
  mem = compiled.memory_analysis()
  del state
  jax.clear_caches()
  return {
      "impl": "vdm", "preset": args.preset, "dtype": args.dtype,
      "batch_size": batch_size, "compile_s": round(compile_s, 2),
      "step_s_median": round(median, 5),
      "images_per_s": round(batch_size / median, 1),
      "flops_per_step": flops,
      "mfu": (round(flops / median / peak, 4) if flops and peak else None),
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }


def _official(args) -> list[dict]:
  """The official network's step at the same batches, if its code is here."""
  if not os.path.exists(_bench.PEER_PYTHON):
    print("# official code not set up (experiments/peer_env.sh): skipped",
          flush=True)
    return []
  out = []
  for batch_size in args.batch_sizes:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "benchmark_train.py"),
         "--preset", args.preset, "--batch_size", str(batch_size),
         "--impl", "official", "--steps", str(args.steps)],
        capture_output=True, text=True, timeout=args.budget_s, check=False)
    for line in proc.stdout.splitlines():
      if line.startswith("{"):
        print(line, flush=True)
        out.append(json.loads(line))
    if proc.returncode:
      print(f"# official step at batch {batch_size} failed: "
            f"{proc.stderr[-500:]}", flush=True)
  return out


def _child(args, flag_set: str, timeout_s: float) -> list[dict]:
  env = dict(os.environ)
  extra = FLAG_SETS.get(flag_set, "")
  env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), extra)
                              if f)
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker",
         "--flag_set", flag_set, "--preset", args.preset, "--dtype",
         args.dtype, "--steps", str(args.steps), "--budget_s",
         str(timeout_s), "--search_budget_s", str(args.search_budget_s),
         "--batch_sizes", ",".join(map(str, args.batch_sizes)),
         "--fused", ",".join(args.fused)]
  if not args.search:
    cmd.append("--no_search")
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout_s + 60, check=False)
  except subprocess.TimeoutExpired as error:
    print(f"# {flag_set}: over {timeout_s:.0f} s, stopped", flush=True)
    stdout = error.stdout or ""
    stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    proc = subprocess.CompletedProcess(cmd, 124, stdout, "")
  records = []
  for line in proc.stdout.splitlines():
    print(line, flush=True)
    if line.startswith("{"):
      records.append(json.loads(line))
  if proc.returncode:
    print(f"# {flag_set} exited {proc.returncode}: "
          f"{(proc.stderr or '')[-800:]}", flush=True)
  return records


def _table(records: list[dict]) -> None:
  print(f"\n{'flags':<20}{'fused':>6}{'batch':>7}{'step s':>9}{'img/s':>9}"
        f"{'TFLOP':>8}{'MFU':>8}{'compile s':>10}")
  for r in records:
    if r.get("impl") != "vdm":
      print(f"{'official':<20}{'-':>6}{r.get('batch_size', 0):>7}"
            f"{r.get('step_s_median', 0):>9.4f}"
            f"{r.get('images_per_s', 0):>9.1f}")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    tflop = (f"{r['flops_per_step'] / 1e12:.2f}" if r.get("flops_per_step")
             else "n/a")
    print(f"{r['flag_set']:<20}{r['fused_norm']:>6}{r['batch_size']:>7}"
          f"{r['step_s_median']:>9.4f}{r['images_per_s']:>9.1f}{tflop:>8}"
          f"{mfu:>8}{r['compile_s']:>10.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="CPU check: tiny preset, batch 2, 2 steps, no "
                      "search, no official step.")
  parser.add_argument("--preset", default="cifar10",
                      choices=sorted(_bench.PRESETS))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch_sizes", default="128,256")
  parser.add_argument("--fused", default="off,on")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--flag_sets", default="",
                      help=f"'all' or names of {sorted(FLAG_SETS)}")
  parser.add_argument("--budget_s", type=float, default=300,
                      help="the baseline child's wall-clock budget")
  parser.add_argument("--search_budget_s", type=float, default=90)
  parser.add_argument("--no_search", dest="search", action="store_false")
  parser.add_argument("--no_official", dest="official",
                      action="store_false")
  parser.add_argument("--flag_set", default="baseline",
                      help=argparse.SUPPRESS)
  parser.add_argument("--_worker", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.preset, args.batch_sizes, args.steps = "tiny", "2", 2
    args.search, args.official = False, False
  args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
  args.fused = str(args.fused).split(",")
  if args._worker:  # pylint: disable=protected-access
    _worker(args)
    return
  started = time.monotonic()
  records = _child(args, "baseline", args.budget_s)
  names = (sorted(FLAG_SETS) if args.flag_sets == "all"
           else [n for n in args.flag_sets.split(",") if n])
  for name in names:
    if name not in FLAG_SETS:
      raise SystemExit(f"unknown flag set {name!r}; known: "
                       f"{', '.join(sorted(FLAG_SETS))}")
    records += _child(args, name, args.budget_s / 2)
  if args.official:
    records += _official(args)
  _table(records)
  print(f"\n{time.monotonic() - started:.0f} s in all; commit "
        f"{_bench.commit()}")
  if not any(r.get("impl") == "vdm" for r in records):
    raise SystemExit("no measurement succeeded (see the lines above).")


if __name__ == "__main__":
  main()
