r"""Where the train step's time goes: per-XLA-op time of the compiled step.

  python experiments/profile_step.py --preset tiny --batch_size 16
  python experiments/profile_step.py --preset cifar10 --batch_size 4 --top 30
  VDM_XLA_CPU_DEFAULTS=0 python experiments/profile_step.py ...  # XLA defaults

Compiles the train step a run ships (`vdm.train.make_train_step` through
experiments/_bench.py, as experiments/benchmark_train.py; compiled with
`vdm.runtime.jit`'s XLA options), runs a few steps under
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
import sys
import tempfile

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
  parser.add_argument("--preset", choices=["tiny", "small", "cifar10"],
                      default="tiny")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=2,
                      help="profiled steps (after two warm-up steps)")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args()
  if args.batch_size < 1 or args.steps < 1 or args.top < 1:
    parser.error("--batch_size, --steps and --top must be >= 1")

  import jax  # pylint: disable=g-import-not-at-top
  import _bench  # pylint: disable=g-import-not-at-top
  from vdm import runtime  # pylint: disable=g-import-not-at-top

  setup = _bench.train_setup(_bench.PRESETS[args.preset], num_devices=1)
  state = setup.init_state()
  batch = setup.batch(args.batch_size)
  _, compiled, _ = _bench.compile_timed(setup.step, state, batch)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))
  described = _describe_ops(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)

  def call():
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      timing = _bench.time_calls(call, steps=args.steps, warmup=0)
    num_calls = 1 + args.steps              # the first call is traced too
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
      per_op[event["name"]] += event.get("dur", 0) / 1e6 / num_calls
  by_kind, by_source = collections.Counter(), collections.Counter()
  for name, seconds in per_op.items():
    kind, source = described[name]
    by_kind[kind] += seconds
    by_source[(kind, source)] += seconds

  wall = timing.median_s
  traced = sum(per_op.values())
  print(f"preset={args.preset} batch={args.batch_size} "
        f"backend={jax.default_backend()} runtime={runtime.describe()}")
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
  from vdm import runtime  # pylint: disable=g-import-not-at-top
  runtime.reexec_with_allocator()   # profile the step as vdm.main runs it
  main()
