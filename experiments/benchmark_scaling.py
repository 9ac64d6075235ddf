r"""Train-step time vs device count (weak and strong scaling) and MFU.

  python experiments/benchmark_scaling.py                  # tiny, 1/2/4/8
  python experiments/benchmark_scaling.py --preset cifar10 --dtype bfloat16 \
      --per_device_batch 128 --modes weak --find_max_batch  # on a GPU / TPU

Measures the train step a run ships (`vdm.train.make_train_step`, through
experiments/_bench.py: the model, AdamW + EMA, shardings, key and XLA
options of a real run; the paper U-Net `vdm_unet` of configs/cifar10.py at a
preset size) on random 32x32x3 uint8 batches, on 1, 2, 4, ... devices of one
mesh (`vdm.parallel.make_mesh`):

- weak scaling: a fixed batch per device (`--per_device_batch`), so the
  global batch grows with the devices; ideal: constant step time.
- strong scaling: a fixed global batch (`--global_batch`); ideal: step time
  falling as 1 / devices.

Each device count runs in its own subprocess. Without an accelerator the
devices are fake CPU devices (`--xla_force_host_platform_device_count`, set
in the subprocess before jax is imported): they share the machine's cores,
so CPU numbers measure the overhead of sharding and collectives, not a
speed-up.

Model FLOPs utilisation (MFU) on an accelerator: FLOPs per step from XLA's
cost analysis of the lowered step (`jitted.lower(...).cost_analysis()
['flops']`: the whole program before XLA's backend passes, multiply-add = 2
FLOPs, also counting elementwise ops; the compiled program's count misses
convolutions on GPU, which become cuDNN calls), divided by the devices, the
step time and the chip's peak FLOP/s from `PEAK_FLOPS` (dense, i.e. without
structured sparsity). On CPU MFU is n/a.

Presets (experiments/_bench.py): `tiny` = 2 blocks, 32 channels; `small` =
8 blocks, 64 channels; `cifar10` = the paper's 32 blocks, 128 channels.
`--num_res_blocks` and `--channels` override a preset (GroupNorm groups:
`_bench.num_groups_for`). `--dtype bfloat16` sets the nets' compute dtype
(`config.model.net_kwargs.dtype`); parameters, optimizer and ELBO stay
float32.

Prints one JSON line per measurement (keys as benchmark_train.py's where
they apply) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import _bench

REPO = _bench.REPO

# Peak dense FLOP/s per chip: (device_kind substring, bf16, float32 as XLA
# runs it by default). First match wins, so specific names come first.
# NVIDIA float32: XLA's default precision runs f32 matmuls/convolutions on
# the TF32 tensor cores of A100/H100/H200, so the TF32 peak is the ceiling.
# TPU float32: the default precision multiplies in one bf16 MXU pass, so the
# bf16 peak is the ceiling.
_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet (SXM5), without sparsity"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (SXM), without sparsity"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet, without sparsity"
PEAK_FLOPS = [
    ("H100 PCIe", 756e12, 378e12,
     "NVIDIA H100 Tensor Core GPU datasheet (PCIe), without sparsity"),
    ("H100 NVL", 835e12, 418e12,
     "NVIDIA H100 Tensor Core GPU datasheet (NVL), without sparsity"),
    ("H100", 989e12, 495e12, _H100_SXM),
    ("H200 NVL", 835e12, 418e12,
     "NVIDIA H200 Tensor Core GPU datasheet (NVL), without sparsity"),
    ("H200", 989e12, 495e12, _H200),
    ("A100", 312e12, 156e12, _A100),
    ("TPU v4", 275e12, 275e12, "Google Cloud TPU docs, TPU v4 system "
     "architecture: 275 TFLOPS bf16 per chip"),
    ("TPU v5 lite", 197e12, 197e12, "Google Cloud TPU docs, TPU v5e: 197 "
     "TFLOPS bf16 per chip"),
    ("TPU v5e", 197e12, 197e12, "Google Cloud TPU docs, TPU v5e: 197 TFLOPS "
     "bf16 per chip"),
    ("TPU v5", 459e12, 459e12, "Google Cloud TPU docs, TPU v5p: 459 TFLOPS "
     "bf16 per chip"),
    ("TPU v6 lite", 918e12, 918e12, "Google Cloud TPU docs, TPU v6e "
     "(Trillium): 918 TFLOPS bf16 per chip"),
]


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of one chip for `dtype`, source), or (None, why not)."""
  for name, bf16, fp32, source in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return (bf16 if dtype == "bfloat16" else fp32), source
  return None, f"no peak FLOP/s known for {device_kind!r}"


# ------------------------------------------------------------------ worker


def _worker_env(args) -> None:
  """Sets up jax's environment; must run before jax is imported."""
  if args.fake_cpu_devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append("--xla_force_host_platform_device_count="
                 f"{args.fake_cpu_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def probe(args) -> dict:
  """The platform this machine gives jax (a subprocess: the parent never
  initialises a backend, which would reserve accelerator memory)."""
  _worker_env(args)
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_count": jax.device_count(),
          "device_kind": device.device_kind}


def _cost_flops(stage) -> float | None:
  """XLA's FLOP count of a `jax.stages.Lowered` or `Compiled`, or None."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def measure(args) -> list[dict]:
  """Times the train step on `args.num_devices` devices, one record per
  requested (mode, global batch)."""
  _worker_env(args)
  # pylint: disable=g-import-not-at-top
  import jax
  from vdm import parallel
  from vdm import runtime
  # pylint: enable=g-import-not-at-top

  net_kwargs = dict(_bench.PRESETS[args.preset])
  net_kwargs.update(num_res_blocks=args.num_res_blocks, channels=args.channels,
                    num_groups=_bench.num_groups_for(args.channels))
  setup = _bench.train_setup(net_kwargs, num_devices=args.num_devices,
                             fsdp=args.fsdp, dtype=args.dtype)
  mesh = setup.mesh
  device = mesh.devices.flat[0]
  peak, peak_source = (peak_flops(device.device_kind, args.dtype)
                       if jax.default_backend() != "cpu"
                       else (None, "CPU: n/a"))
  records, compiled_sizes = [], set()
  for mode, batch_size in json.loads(args.batches):
    parallel.check_batch_size(batch_size, mesh)
    batch = setup.batch(batch_size, args.seed)
    state = setup.init_state()
    lowered, compiled, compile_s = _bench.compile_timed(setup.step, state,
                                                        batch)
    # FLOPs of the whole step from the HLO before XLA's backend passes: on
    # GPU those turn convolutions into cuDNN custom calls that the compiled
    # program's cost analysis counts as 0 FLOPs (seen on an H100: 0.66 of
    # 19.6 TFLOP per cifar10 step at batch 128). Before SPMD partitioning,
    # hence / devices.
    flops_total = _cost_flops(lowered)
    flops_per_device = (flops_total / args.num_devices if flops_total
                        else _cost_flops(compiled))

    def call():
      nonlocal state
      state, metrics = compiled(state, batch)
      return state, metrics

    # The first call counts as one of the --warmup calls.
    timing = _bench.time_calls(call, steps=args.steps,
                               warmup=max(0, args.warmup - 1))
    median = timing.median_s
    loss = float(timing.output[1]["loss"])
    mfu = None
    if peak and flops_per_device:
      mfu = flops_per_device / median / peak
    memory = getattr(device, "memory_stats", lambda: None)() or {}
    records.append({
        "impl": "vdm", "bench": "scaling", "preset": args.preset,
        "num_res_blocks": args.num_res_blocks, "channels": args.channels,
        "mode": mode, "num_devices": args.num_devices,
        "batch_size": batch_size,
        "per_device_batch": batch_size // args.num_devices,
        "dtype": args.dtype, "fsdp": args.fsdp,
        "param_count": setup.param_count,
        "compile_s": round(compile_s, 3),
        # The same shapes were compiled for an earlier mode: jit's cache.
        "compile_cached": batch_size in compiled_sizes,
        "timed_steps": args.steps,
        "step_s_median": round(median, 5),
        "step_s_min": round(min(timing.times_s), 5),
        "images_per_s": round(batch_size / median, 2),
        "flops_per_step": (flops_per_device * args.num_devices
                           if flops_per_device else None),
        "flops_per_step_per_device": flops_per_device,
        "achieved_flops_per_device": (round(flops_per_device / median)
                                      if flops_per_device else None),
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "loss_bpd_last": round(loss, 4),
        "device_peak_bytes": memory.get("peak_bytes_in_use"),
        "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
        "device_kind": device.device_kind,
        "fake_cpu_devices": bool(args.fake_cpu_devices),
        **runtime.describe(), **_bench.versions(),
    })
    compiled_sizes.add(batch_size)
    del state, batch, compiled, timing
  return records


# ------------------------------------------------------------------ parent


def _run_worker(args, extra: list[str], timeout_s: float
                ) -> tuple[list[dict], str]:
  """Runs this script as a worker; (its JSON records, error text or '')."""
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", *extra,
         "--preset", args.preset,
         "--num_res_blocks", str(args.num_res_blocks),
         "--channels", str(args.channels), "--dtype", args.dtype,
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--seed", str(args.seed)] + (["--fsdp"] if args.fsdp else [])
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return [], f"timed out after {timeout_s:.0f} s"
  records = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith("{")]
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-3:]
    return records, " | ".join(tail) or f"exit code {proc.returncode}"
  return records, ""


def _default_device_counts(available: int) -> list[int]:
  counts, n = [], 1
  while n <= available:
    counts.append(n)
    n *= 2
  if counts[-1] != available:
    counts.append(available)
  return counts


def _fmt(value, spec: str, missing: str = "n/a") -> str:
  return missing if value is None else format(value, spec)


def print_table(records: list[dict], info: dict, args) -> None:
  commit = _bench.commit()
  first = records[0] if records else {}
  print(f"\nvdm train-step scaling: preset={args.preset} (num_res_blocks="
        f"{args.num_res_blocks}, channels={args.channels}, "
        f"{first.get('param_count', 0):,} params), dtype={args.dtype}, "
        f"fsdp={args.fsdp}, {args.steps} timed steps (median)")
  print(f"device={info['device_kind']} backend={info['backend']} "
        f"machine={platform.machine()} cpus={os.cpu_count()} "
        f"jax={first.get('jax', '?')} commit={commit or '?'}")
  if info["backend"] == "cpu":
    print("NOTE: fake CPU devices share the same "
          f"{os.cpu_count()} cores: this measures the overhead of sharding "
          "and collectives, not a speed-up. MFU is n/a on CPU.")
  header = (f"{'mode':<7}{'devices':>8}{'batch':>7}{'/dev':>6}"
            f"{'compile_s':>10}{'step_ms':>10}{'img/s':>9}{'scaling':>9}"
            f"{'GFLOP/step':>11}{'TFLOP/s/dev':>12}{'MFU':>7}")
  print(header)
  print("-" * len(header))
  base = {}
  for r in records:
    # weak: efficiency t(1) / t(n) at the same batch per device (ideal
    # 100%); strong: speed-up t(1) / t(n) at the same global batch (ideal n).
    key = (r["mode"], r["per_device_batch"] if r["mode"] == "weak"
           else r["batch_size"])
    ref = base.setdefault(key, r)
    scaling = ref["step_s_median"] / r["step_s_median"]
    label = {"weak": f"{100 * scaling:.0f}%", "strong": f"{scaling:.2f}x"
             }.get(r["mode"], "-")
    flops = r["flops_per_step"]
    achieved = r["achieved_flops_per_device"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    compile_s = "cached" if r["compile_cached"] else f"{r['compile_s']:.1f}"
    print(f"{r['mode']:<7}{r['num_devices']:>8}{r['batch_size']:>7}"
          f"{r['per_device_batch']:>6}{compile_s:>10}"
          f"{1e3 * r['step_s_median']:>10.1f}{r['images_per_s']:>9.1f}"
          f"{label:>9}{_fmt(flops and flops / 1e9, '.2f'):>11}"
          f"{_fmt(achieved and achieved / 1e12, '.3f'):>12}{mfu:>7}")
  print("scaling: weak = efficiency t(1 device) / t(n) at the same batch per "
        "device (ideal 100%); strong = speed-up t(1) / t(n) at the same "
        "global batch (ideal n).")
  if records and records[0]["peak_flops_source"]:
    print(f"peak FLOP/s: {records[0]['peak_flops_source']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(_bench.PRESETS),
                      default="tiny")
  parser.add_argument("--num_res_blocks", type=int, default=None,
                      help="override the preset's ResNet blocks")
  parser.add_argument("--channels", type=int, default=None,
                      help="override the preset's channels")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                      default="float32", help="compute dtype of the net")
  parser.add_argument("--devices", default=None,
                      help="comma-separated device counts (default: 1, 2, 4, "
                      "... up to all accelerators, or 1,2,4,8 fake CPU "
                      "devices)")
  parser.add_argument("--modes", default="weak,strong",
                      help="comma-separated: weak, strong")
  parser.add_argument("--per_device_batch", type=int, default=4,
                      help="weak scaling: examples per device")
  parser.add_argument("--global_batch", type=int, default=16,
                      help="strong scaling: examples per step in total")
  parser.add_argument("--find_max_batch", action="store_true",
                      help="also double the per-device batch on the most "
                      "devices until it no longer fits, reporting each")
  parser.add_argument("--max_per_device_batch", type=int, default=4096)
  parser.add_argument("--fsdp", action="store_true",
                      help="shard params/optimizer state (FSDP-style)")
  parser.add_argument("--cpu", action="store_true",
                      help="fake CPU devices even if an accelerator exists")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout_s", type=float, default=1800.0,
                      help="per device count (subprocess)")
  parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--num_devices", type=int, default=1,
                      help=argparse.SUPPRESS)
  parser.add_argument("--fake_cpu_devices", type=int, default=0,
                      help=argparse.SUPPRESS)
  parser.add_argument("--batches", default="[]", help=argparse.SUPPRESS)
  args = parser.parse_args()
  for name in ("num_res_blocks", "channels"):
    if getattr(args, name) is None:
      setattr(args, name, _bench.PRESETS[args.preset][name])
  for name in ("per_device_batch", "global_batch", "steps", "channels",
               "num_res_blocks"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  if args._probe:   # pylint: disable=protected-access
    print(json.dumps(probe(args)))
    return
  if args._worker:  # pylint: disable=protected-access
    for record in measure(args):
      print(json.dumps(record), flush=True)
    return

  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  unknown = set(modes) - {"weak", "strong"}
  if unknown:
    parser.error(f"--modes: unknown {sorted(unknown)}; use weak, strong")
  probe_cmd = [sys.executable, os.path.abspath(__file__), "--_probe"]
  if args.cpu:
    probe_cmd += ["--fake_cpu_devices", "1"]
  info = json.loads(subprocess.run(
      probe_cmd, capture_output=True, text=True, check=True
  ).stdout.strip().splitlines()[-1])
  fake = info["backend"] == "cpu"
  if args.devices:
    counts = [int(n) for n in args.devices.split(",")]
  else:
    counts = [1, 2, 4, 8] if fake else _default_device_counts(
        info["device_count"])
  if not fake and max(counts) > info["device_count"]:
    parser.error(f"--devices {args.devices}: only {info['device_count']} "
                 f"{info['backend']} devices here.")

  records = []
  for n in counts:
    batches = []
    if "weak" in modes:
      batches.append(("weak", args.per_device_batch * n))
    if "strong" in modes:
      if args.global_batch % n:
        print(f"[strong] skipping {n} devices: global batch "
              f"{args.global_batch} is not divisible by {n}", file=sys.stderr)
      else:
        batches.append(("strong", args.global_batch))
    extra = ["--num_devices", str(n), "--batches", json.dumps(batches),
             "--fake_cpu_devices", str(n if fake else 0)]
    got, error = _run_worker(args, extra, args.timeout_s)
    for record in got:
      print(json.dumps(record), flush=True)
    records += got
    if error:
      print(f"[{n} devices] failed: {error}", file=sys.stderr)

  if args.find_max_batch:
    n, per_device = max(counts), args.per_device_batch
    if any(r["mode"] == "weak" and r["num_devices"] == n for r in records):
      per_device *= 2             # the weak run measured this batch already
    while per_device <= args.max_per_device_batch:
      extra = ["--num_devices", str(n),
               "--batches", json.dumps([("max", per_device * n)]),
               "--fake_cpu_devices", str(n if fake else 0)]
      got, error = _run_worker(args, extra, args.timeout_s)
      for record in got:
        print(json.dumps(record), flush=True)
      records += got
      if error or not got:
        print(f"[max] per-device batch {per_device} does not fit (or "
              f"failed): {error[:300]}", file=sys.stderr)
        break
      per_device *= 2
  order = {"weak": 0, "strong": 1, "max": 2}
  records.sort(key=lambda r: (order[r["mode"]], r["num_devices"],
                              r["batch_size"]))
  print_table(records, info, args)


if __name__ == "__main__":
  main()
