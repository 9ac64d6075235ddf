r"""Where the train step's time goes: per-XLA-op time of the compiled step.

  python experiments/profile_step.py --preset tiny --batch_size 16
  python experiments/profile_step.py --preset cifar10 --batch_size 4 --top 30
  VDM_XLA_CPU_DEFAULTS=0 python experiments/profile_step.py ...  # XLA defaults

Compiles the same train step as experiments/benchmark_train.py (this
library's, with `vdm.parallel.compiler_options()`), runs a few steps under
`jax.profiler.trace`, and joins the trace's per-op events (XLA:CPU thunks,
XLA:GPU kernels) with the compiled HLO's `op_name` metadata. Prints the time
per step by kind (forward / backward convolution, dot, reduction, transpose,
elementwise, ...) and the top ops by the model code that made them (block
indices folded, so `up_*/norm_1` sums over blocks), with XLA's FLOPs per
step. Op times can overlap when XLA runs independent ops concurrently, so
their sum may exceed the wall time; XLA:CPU's own (Eigen) convolutions
record no event and show as the gap between the two.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
# Opcodes that decide an op's kind, strongest first.
_KEY_OPCODES = ("convolution", "dot", "reduce", "transpose", "copy")


def _describe_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Top-level op name -> (kind, source op_name), looking inside fusions."""
  inside = collections.defaultdict(list)     # computation -> [(opcode, op)]
  top = []                                   # (name, opcode, op, callee)
  computation = None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      computation = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or computation is None:
      continue
    op = _OP_NAME.search(line)
    op = op.group(1) if op else ""
    inside[computation].append((match.group(2), op))
    callee = _CALLS.search(line)
    top.append((match.group(1), match.group(2), op,
                callee.group(1) if callee else None))
  described = {}
  for name, opcode, op, callee in top:
    ops = inside.get(callee, []) + [(opcode, op)]
    any_op_name = next((o for _, o in reversed(ops) if o), "")
    for key in _KEY_OPCODES:
      if any(c == key for c, _ in ops):
        source = next((o for c, o in ops if c == key and o), any_op_name)
        break
    else:
      key, source = "elementwise", any_op_name
    described[name] = (_kind(key, source), _source(source))
  return described


def _kind(key: str, op_name: str) -> str:
  backward = " backward" if "transpose(" in op_name else " forward"
  return {"convolution": "convolution" + backward, "dot": "dot" + backward,
          "reduce": "reduction", "transpose": "transpose / copy",
          "copy": "transpose / copy"}.get(key, "elementwise / other")


def _source(op_name: str) -> str:
  """op_name without the jit/jvp wrappers and with block indices folded."""
  tail = op_name.split("VDMUNet)")[-1] if "VDMUNet)" in op_name else op_name
  tail = re.sub(r"(down|up)_\d+", r"\1_*", tail).lstrip(")/")
  return tail[-60:] or "(no op_name)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=["tiny", "cifar10"], default="tiny")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=2,
                      help="profiled steps (after two warm-up steps)")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args()
  if args.batch_size < 1 or args.steps < 1 or args.top < 1:
    parser.error("--batch_size, --steps and --top must be >= 1")

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmark_train import PRESETS  # pylint: disable=g-import-not-at-top
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from vdm import model as model_lib  # pylint: disable=g-import-not-at-top
  from vdm import parallel  # pylint: disable=g-import-not-at-top
  from vdm import train  # pylint: disable=g-import-not-at-top

  config = cifar10.get_config()
  config.model.net_kwargs.update(PRESETS[args.preset])
  model = model_lib.build(config.model, (32, 32, 3), 256, 10)
  tx, lr_fn = train.create_optimizer(config.optimizer, 1000)
  state = train.create_train_state(model, tx, jax.random.key(0))
  step = jax.jit(lambda s, b: train.train_step(
      s, b, model=model, base_key=jax.random.key(1),
      ema_decay=config.optimizer.ema_decay, adaptive_decay=0.99,
      learning_rate_fn=lr_fn), donate_argnums=(0,),
      compiler_options=parallel.compiler_options())
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), np.uint8),
      "label": np.zeros((args.batch_size,), np.int32)})
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))
  described = _describe_ops(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)

  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                      recursive=True)
    if not paths:
      sys.exit("the profiler wrote no perfetto trace; is this jaxlib built "
               "with profiler support?")
    with gzip.open(paths[0]) as f:
      events = json.load(f)["traceEvents"]

  per_op = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in described:
      per_op[event["name"]] += event.get("dur", 0) / 1e6 / args.steps
  by_kind, by_source = collections.Counter(), collections.Counter()
  for name, seconds in per_op.items():
    kind, source = described[name]
    by_kind[kind] += seconds
    by_source[(kind, source)] += seconds

  wall = statistics.median(walls)
  traced = sum(per_op.values())
  print(f"preset={args.preset} batch={args.batch_size} "
        f"backend={jax.default_backend()} options="
        f"{parallel.compiler_options()}")
  print(f"wall {wall:.4f} s/step (median of {args.steps}, under the "
        f"profiler); ops with events {traced:.4f} s/step; XLA FLOPs "
        f"{flops / 1e9:.1f} G/step = {flops / 1e9 / wall:.0f} GFLOP/s\n")
  print(f"{'kind':<24}{'s/step':>9}{'share':>8}")
  for kind, seconds in by_kind.most_common():
    print(f"{kind:<24}{seconds:>9.4f}{seconds / wall:>8.1%}")
  print(f"{'(no event: gap)':<24}{max(wall - traced, 0.0):>9.4f}\n")
  print(f"{'kind':<24}{'source op':<62}{'s/step':>9}")
  for (kind, source), seconds in by_source.most_common(args.top):
    print(f"{kind:<24}{source:<62}{seconds:>9.4f}")


if __name__ == "__main__":
  from vdm import parallel  # pylint: disable=g-import-not-at-top
  parallel.reexec_with_tcmalloc()   # profile the step as vdm.main runs it
  main()
