#!/usr/bin/env python3
"""Forward + backward time and memory of the score networks at CIFAR shapes.

  bash experiments/peer_env.sh     # once: venv for the official network
  .venv/bin/python experiments/benchmark_nets.py                  # all nets
  .venv/bin/python experiments/benchmark_nets.py --nets vdm_unet \\
      --presets tiny --batch_sizes 4,16 --rounds 3

One measurement = one process (so peak RSS is that measurement's own): build
the net, jit `value_and_grad` of mean((net(z_t, gamma_t) - eps)^2) w.r.t. the
parameters with dropout on (train=True, a fresh dropout key per step), time
lower + compile apart, run `--warmup` untimed steps, then `--steps` timed steps,
each ending in `jax.block_until_ready`; report the median. Inputs: z_t, eps ~
N(0, 1) [B, 32, 32, 3], gamma_t uniform in [-13.3, 5] (numpy, fixed seed).
Our nets compile through `vdm.runtime.jit`, as a run's steps do; with
VDM_XLA_CPU_DEFAULTS=0 they compile under XLA's defaults like the official
net (code against code, the README's table).

With `--official auto|yes`, the official VDM network (google-research/vdm,
`ScoreUNet`, same blocks/channels, dropout 0.1, Fourier features, no block
attention) is timed the same way by experiments/_peer_nets.py in
experiments/.peer-venv (a separate process: the official code registers
itself as the package `vdm`), and the table gives official / ours per
setting (> 1: ours faster).

Prints a table and one JSON line per measurement (keys as in the peer's
bench_official.py where they apply). Timings on a shared machine are noisy:
the JSON records the 1-minute load average before and after each run, and
`cpu_s_median` (process CPU seconds per step), which other processes disturb
less than wall time; `--rounds N` alternates ours and the official N times.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import _bench

HERE = _bench.HERE
REPO = _bench.REPO
PEER_DIR, PEER_PYTHON = _bench.PEER_DIR, _bench.PEER_PYTHON
IMAGE_SHAPE = _bench.IMAGE_SHAPE
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0

# Net settings per preset. vdm_unet: the benchmarks' shared presets
# (_bench.PRESETS; the paper's CIFAR-10 model is 32 blocks at 128 channels)
# with dropout on. unet / mlp: same width as vdm_unet's preset,
# multi-resolution / flattened.
PRESETS = {
    "vdm_unet": {name: dict(_bench.PRESETS[name], dropout=0.1)
                 for name in _bench.OFFICIAL_PRESETS},
    "unet": {
        "tiny": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(16,), dropout=0.1),
        "cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2),
                        num_res_blocks=2, attention_resolutions=(16,),
                        dropout=0.1),
    },
    "mlp": {
        "tiny": dict(hidden=256, num_res_blocks=3, dropout=0.1),
        "cifar10": dict(hidden=1024, num_res_blocks=4, dropout=0.1),
    },
}
OFFICIAL_PRESETS = _bench.OFFICIAL_PRESETS
peak_rss_mb = _bench.peak_rss_mb
versions = _bench.versions


def make_inputs(batch_size: int, seed: int = 0):
  """Identical numpy inputs for ours and the official net."""
  import numpy as np
  rs = np.random.RandomState(seed)
  z_t = rs.normal(size=(batch_size,) + IMAGE_SHAPE).astype(np.float32)
  eps = rs.normal(size=(batch_size,) + IMAGE_SHAPE).astype(np.float32)
  gamma_t = rs.uniform(GAMMA_MIN, GAMMA_MAX, batch_size).astype(np.float32)
  return z_t, gamma_t, eps


def measure(apply_fn, params, batch_size: int, *, jit, steps: int,
            warmup: int, seed: int = 0) -> dict:
  """Times jit(value_and_grad(mse(apply_fn(params, z, g, key), eps))).

  Args:
    apply_fn: (params, z_t, gamma_t, key_dropout) -> [B, 32, 32, 3].
    params: parameter pytree.
    batch_size: B.
    jit: how to compile: `vdm.runtime.jit` for ours (as training does),
      `jax.jit` for the official net (as its code does).
    steps: timed steps.
    warmup: untimed steps after the first call.
  Returns:
    dict of timings (seconds) and XLA memory figures (MB).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  z_t, gamma_t, eps = (jnp.asarray(a) for a in make_inputs(batch_size, seed))

  def loss(params, key):
    return jnp.mean(jnp.square(apply_fn(params, z_t, gamma_t, key) - eps))

  key = jax.random.key(seed + 1)
  _, compiled, compile_s = _bench.compile_timed(
      jit(jax.value_and_grad(loss)), params, key)
  memory = {}
  try:
    stats = compiled.memory_analysis()
    memory = {"xla_temp_mb": round(stats.temp_size_in_bytes / 2**20, 1),
              "xla_args_mb": round(stats.argument_size_in_bytes / 2**20, 1)}
  except Exception:  # pylint: disable=broad-except  (not on every backend)
    pass
  calls = [0]

  def call():   # a fresh dropout key per step
    calls[0] += 1
    return compiled(params, jax.random.fold_in(key, calls[0] - 1))

  timing = _bench.time_calls(call, steps=steps, warmup=warmup)
  _, grads = timing.output
  grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in
                                 jax.tree_util.tree_leaves(grads))))
  record = timing.record()
  record["compile_s"] = round(compile_s, 3)   # lowering + compiling, apart
  return {
      "param_count": int(sum(np.prod(x.shape)
                             for x in jax.tree_util.tree_leaves(params))),
      **record,
      "images_per_s": round(batch_size / timing.median_s, 2),
      "grad_norm": round(grad_norm, 4),   # finite = the backward ran
      **memory,
  }


def run_single(args) -> dict:
  """One measurement of this library's net, in this process."""
  import jax
  import jax.numpy as jnp
  from vdm import nets
  from vdm import runtime

  kwargs = dict(PRESETS[args.net][args.preset],
                gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)
  if args.dtype == "bfloat16":
    kwargs["dtype"] = jnp.bfloat16
  net = nets.get(args.net, **kwargs)
  z_t, gamma_t, _ = make_inputs(args.batch_size)
  params = jax.jit(net.init)(jax.random.key(0), z_t, gamma_t)["params"]

  def apply_fn(params, z, gamma, key):
    return net.apply({"params": params}, z, gamma, train=True,
                     rngs={"dropout": key})

  load_before = os.getloadavg()[0]
  result = measure(apply_fn, params, args.batch_size, jit=runtime.jit,
                   steps=args.steps, warmup=args.warmup)
  return {"impl": "vdm", "net": args.net, "preset": args.preset,
          "batch_size": args.batch_size, "dtype": args.dtype, **result,
          "peak_rss_mb": round(peak_rss_mb(), 1),
          "load_avg_1m": [round(load_before, 2),
                          round(os.getloadavg()[0], 2)],
          **runtime.describe(), **versions(),
          "net_kwargs": PRESETS[args.net][args.preset]}


def _subprocess_json(cmd: list[str], timeout: float) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS=os.environ.get(
      "JAX_PLATFORMS", "cpu"))
  env.pop("XLA_FLAGS", None)      # one device, like the official benchmark
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n"
                       f"{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def official_available() -> tuple[bool, str]:
  if not os.path.isfile(os.path.join(PEER_DIR, "model_vdm.py")):
    return False, f"official code not found at {os.path.normpath(PEER_DIR)}"
  if not os.access(PEER_PYTHON, os.X_OK):
    return False, ("peer venv missing: run `bash experiments/peer_env.sh` "
                   f"to create {os.path.relpath(PEER_PYTHON, REPO)}")
  return True, ""


def aggregate(rows: list[dict]) -> list[dict]:
  """One row per (impl, net, preset, batch): medians over rounds."""
  groups = {}
  for r in rows:
    groups.setdefault((r["impl"], r["net"], r["preset"], r["batch_size"]),
                      []).append(r)
  out = []
  for group in groups.values():
    row = dict(group[0], rounds=len(group))
    for key in ("step_s_median", "cpu_s_median", "compile_s", "peak_rss_mb"):
      row[key] = statistics.median(r[key] for r in group)
    row["images_per_s"] = row["batch_size"] / row["step_s_median"]
    row["load_avg_1m"] = [max(x for r in group for x in r["load_avg_1m"])]
    out.append(row)
  return out


def print_table(rows: list[dict]) -> None:
  """Human table; the last two columns: official / ours (> 1: ours faster)."""
  header = (f"{'impl':9} {'net':9} {'preset':8} {'B':>3} {'params':>11} "
            f"{'compile_s':>9} {'step_s':>7} {'cpu_s':>7} {'img/s':>7} "
            f"{'rss_MB':>7} {'xla_tmp_MB':>10} {'load':>5} {'x_wall':>6} "
            f"{'x_cpu':>6}")
  print(header)
  print("-" * len(header))
  official = {(r["preset"], r["batch_size"]): r
              for r in rows if r["impl"] == "official"}
  for r in rows:
    ratio_wall = ratio_cpu = ""
    ref = official.get((r["preset"], r["batch_size"]))
    if r["impl"] == "vdm" and r["net"] == "vdm_unet" and ref:
      ratio_wall = f"{ref['step_s_median'] / r['step_s_median']:.2f}"
      ratio_cpu = f"{ref['cpu_s_median'] / r['cpu_s_median']:.2f}"
    print(f"{r['impl']:9} {r['net']:9} {r['preset']:8} {r['batch_size']:>3} "
          f"{r['param_count']:>11,} {r['compile_s']:>9.1f} "
          f"{r['step_s_median']:>7.3f} {r['cpu_s_median']:>7.3f} "
          f"{r['images_per_s']:>7.1f} {r['peak_rss_mb']:>7.0f} "
          f"{r.get('xla_temp_mb', float('nan')):>10.0f} "
          f"{max(r['load_avg_1m']):>5.1f} {ratio_wall:>6} {ratio_cpu:>6}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", default="vdm_unet,unet,mlp",
                 help="comma-separated: vdm_unet, unet, mlp")
  p.add_argument("--presets", default="tiny,cifar10",
                 help="comma-separated: tiny, cifar10")
  p.add_argument("--batch_sizes", default="4,16")
  p.add_argument("--steps", type=int, default=None,
                 help="timed steps (default 10 tiny, 3 cifar10)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--rounds", type=int, default=1,
                 help="repeat every measurement (alternating ours and the "
                      "official) and report medians over rounds")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--official", choices=["auto", "yes", "no"], default="auto",
                 help="also time the official ScoreUNet (vdm_unet presets)")
  p.add_argument("--timeout", type=float, default=1800.0,
                 help="seconds per measurement process")
  # Internal: one measurement in this process.
  p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--net", help=argparse.SUPPRESS)
  p.add_argument("--preset", help=argparse.SUPPRESS)
  p.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in args.nets.split(","):
    if name not in PRESETS:
      p.error(f"--nets: unknown net {name!r}; known: {', '.join(PRESETS)}")
  for preset in args.presets.split(","):
    if preset not in OFFICIAL_PRESETS:
      p.error(f"--presets: unknown preset {preset!r}; known: tiny, cifar10")
  if (args.warmup < 0 or args.rounds < 1
      or (args.steps is not None and args.steps < 1)):
    p.error("--steps and --rounds must be >= 1 and --warmup >= 0")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.single:
    sys.path.insert(0, REPO)
    print(json.dumps(run_single(args)), flush=True)
    return []
  use_official = args.official != "no" and "vdm_unet" in args.nets.split(",")
  if use_official:
    ok, why = official_available()
    if not ok:
      if args.official == "yes":
        sys.exit(f"--official=yes but {why}")
      print(f"# official network skipped: {why}", flush=True)
      use_official = False
  rows = []
  for preset in args.presets.split(","):
    steps = args.steps or (3 if preset == "cifar10" else 10)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
      for name in [n for _ in range(args.rounds)
                   for n in args.nets.split(",")]:
        common = ["--preset", preset, "--batch_size", str(batch_size),
                  "--steps", str(steps), "--warmup", str(args.warmup)]
        rows.append(_subprocess_json(
            [sys.executable, os.path.abspath(__file__), "--single", "--net",
             name, "--dtype", args.dtype] + common, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
        if name == "vdm_unet" and use_official:
          rows.append(_subprocess_json(
              [PEER_PYTHON, os.path.join(HERE, "_peer_nets.py"),
               "--peer_dir", PEER_DIR] + common, args.timeout))
          print(json.dumps(rows[-1]), flush=True)
  print()
  print(f"forward+backward of the score network, {IMAGE_SHAPE} inputs, "
        f"dropout on; {platform.node()}, {os.cpu_count()} CPUs, "
        f"{rows[0]['backend'] if rows else '?'}; step_s (wall) and cpu_s "
        "(process CPU) per step, medians; x_wall, x_cpu = official / ours "
        "(> 1: ours faster); load = max 1-min load average")
  print_table(aggregate(rows))
  return rows


if __name__ == "__main__":
  main()
