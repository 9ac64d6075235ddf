#!/usr/bin/env python3
r"""Times the official VDM code's train step, eval step or sampler: one JSON
line.

Written for this project's comparison; it drives the official code
(google-research/vdm at the commit in experiments/official/PINNED, with
official.patch applied: experiments/peer_env.sh sets both up) and is run by
experiments/benchmark_train.py and experiments/benchmark_eval.py with the
official code's own interpreter (experiments/.peer-venv):

  experiments/.peer-venv/bin/python experiments/official/bench_official.py \
      --peer_dir DIR --preset tiny --mode train --batch_size 16

The official code imports itself as the package `vdm`; this script registers
`--peer_dir` under that name (so it must not run in a process that imports
this library). It builds `Experiment_VDM(config)` from the official
configs/cifar10.py as the official main.py does (model, init, AdamW + EMA
train state), with one substitution: `vdm.dataset.create_dataset` returns
random uint8 32x32x3 images (NumPy seed `--seed`), one batch reused, in the
official batch layout. `tiny` sets sm_n_layer=2, sm_n_embd=32; `cifar10`
keeps the config's network (32 blocks, 128 channels).

Modes (each the official function, jitted once, one call per timed step):
  train   `Experiment.train_step` (loss, gradients, AdamW, EMA) under
          `jax.shard_map` over a one-device mesh named 'batch' (its
          `axis_index` / `pmean` are then identities): the official pmap
          path's work without its lax.scan, which XLA:CPU runs ~12x slower
          (backward convolutions inside a while loop).
  eval    `Experiment.eval_step` (the bpd of a batch, EMA parameters, no
          dropout), the same way.
  sample  `Experiment_VDM.sample_fn` (ancestral sampling: `lax.fori_loop`
          over T steps of `VDM.sample`, then `generate_x`), T =
          `--sample_steps` (set as config.model.sm_n_timesteps, which the
          sampler reads; the training loss is not run), batch `--batch_size`.

JSON keys as experiments/_bench.py's `Timing.record()` plus the run's
settings; `step_s_median` is per train step, eval batch or whole sampler
call (`--sample_steps` network evaluations).
"""
import argparse
import functools
import json
import os
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the official code imports TF
sys.dont_write_bytecode = True        # keep a shared (read-only) peer clean
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import _bench  # noqa: E402  (timing, memory, versions; no vdm import)

PINNED = open(os.path.join(HERE, "PINNED")).read().split()[0]
PRESETS = {"tiny": dict(sm_n_layer=2, sm_n_embd=32), "cifar10": {}}
DEFAULT_STEPS = {"train": {"tiny": 20, "cifar10": 5},
                 "eval": {"tiny": 20, "cifar10": 5},
                 "sample": {"tiny": 3, "cifar10": 2}}


def _register_official_package(peer_dir: str) -> None:
  """Makes `import vdm.X` load peer_dir/X.py (the official layout)."""
  if not os.path.exists(os.path.join(peer_dir, "experiment_vdm.py")):
    raise SystemExit(f"--peer_dir {peer_dir!r} holds no experiment_vdm.py; "
                     "run `bash experiments/peer_env.sh` to fetch the "
                     "official code, or pass its folder.")
  package = types.ModuleType("vdm")
  package.__path__ = [peer_dir]
  sys.modules["vdm"] = package
  sys.path.insert(0, peer_dir)          # for `from configs import cifar10`


def _random_dataset(seed: int):
  """A `create_dataset(config, rng)` of random uint8 images, official
  layout: train [devices, substeps, B, 32, 32, 3], eval [devices, B, ...]."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def forever(item):
    while True:
      yield item

  class _Batches:          # the official loop calls both next(it), it.next()
    def __init__(self, batch):
      self._items = forever(batch)

    def __iter__(self):
      return self

    def __next__(self):
      return next(self._items)

    next = __next__

  def create_dataset(config, data_rng):
    del data_rng
    rng = np.random.RandomState(seed)
    devices = jax.local_device_count()

    def batches(batch_size, lead):
      dims = [devices] + lead + [batch_size // jax.device_count()]
      return _Batches({
          "images": rng.randint(0, 256, dims + [32, 32, 3]).astype(np.uint8),
          "conditioning": np.zeros(dims, np.uint8)})

    return (batches(config.training.batch_size_train,
                    [config.training.substeps]),
            batches(config.training.batch_size_eval, []))

  return create_dataset


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peer_dir", default=_bench.PEER_DIR,
                      help="the official code, patched (peer_env.sh)")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--mode", choices=sorted(DEFAULT_STEPS),
                      default="train")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=None,
                      help="timed calls (default: train/eval 20 tiny, 5 "
                      "cifar10; sample 3 / 2)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--sample_steps", type=int, default=100,
                      help="sample mode: T, the sampler's steps")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  steps = args.steps or DEFAULT_STEPS[args.mode][args.preset]
  if min(args.batch_size, steps, args.sample_steps) < 1 or args.warmup < 0:
    parser.error("--batch_size, --steps and --sample_steps must be >= 1, "
                 "--warmup >= 0")
  _register_official_package(os.path.abspath(args.peer_dir))

  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from absl import logging
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from configs import cifar10 as official_config
  import vdm.dataset
  import vdm.experiment_vdm
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  rss_after_imports = _bench.peak_rss_mb()

  config = official_config.get_config()
  config.model.update(PRESETS[args.preset])
  if args.mode == "sample":
    config.model.sm_n_timesteps = args.sample_steps
  config.training.batch_size_train = args.batch_size
  config.training.batch_size_eval = args.batch_size
  config.training.substeps = 1
  config.training.steps_per_logging = 1
  vdm.dataset.create_dataset = _random_dataset(args.seed)
  exp = vdm.experiment_vdm.Experiment_VDM(config)
  param_count = sum(int(np.prod(p.shape))
                    for p in jax.tree_util.tree_leaves(exp.state.params))

  mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
  on_mesh = functools.partial(jax.device_put,
                              device=NamedSharding(mesh, PartitionSpec()))

  def one_device(fn):   # binds the axis name 'batch' the official code uses
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(),
                                 out_specs=PartitionSpec(), check_vma=False))

  key_train, key_eval, key_sample = jax.random.split(
      jax.random.PRNGKey(config.training.seed + 1000), 3)
  bpd = []
  if args.mode == "train":
    batch = on_mesh(jax.tree_util.tree_map(lambda x: np.asarray(x[0, 0]),
                                           next(exp.train_iter)))
    state = on_mesh(exp.state)
    fn = one_device(functools.partial(exp.train_step, key_train))
    step_fn = "jit(shard_map(official train_step))"

    def call():
      nonlocal state
      state, metrics = fn(state, batch)
      bpd.append(metrics["scalars"]["train_bpd"])
      return metrics
  elif args.mode == "eval":
    batch = on_mesh(jax.tree_util.tree_map(lambda x: np.asarray(x[0]),
                                           next(exp.eval_iter)))
    params = on_mesh(exp.state.ema_params)
    fn = one_device(functools.partial(exp.eval_step, key_eval))
    step_fn = "jit(shard_map(official eval_step))"
    batch_index = [0]

    def call():
      metrics = fn(params, batch, on_mesh(np.int32(batch_index[0])))
      batch_index[0] += 1
      bpd.append(metrics["scalars"]["eval_bpd"])
      return metrics
  else:
    params = on_mesh(exp.state.ema_params)
    dummy = np.zeros((args.batch_size, 32, 32, 3), np.uint8)
    fn = one_device(lambda p: exp.sample_fn(dummy_inputs=dummy,
                                            rng=key_sample, params=p))
    step_fn = "jit(shard_map(official sample_fn)), fori_loop over T"

    def call():
      return fn(params)

  timing = _bench.time_calls(call, steps=steps, warmup=args.warmup)
  record = {
      "peer": f"google-research/vdm@{PINNED[:7]}", "impl": "official",
      "preset": args.preset, "path": "jit", "mode": args.mode,
      "step_fn": step_fn, "batch_size": args.batch_size,
      "param_count": param_count,
      "sm_n_layer": config.model.sm_n_layer,
      "sm_n_embd": config.model.sm_n_embd, **timing.record(),
      "images_per_s": round(args.batch_size / timing.median_s, 2),
      "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
      "rss_after_imports_mb": round(rss_after_imports, 1),
      **_bench.versions()}
  if args.mode == "sample":
    record["sample_steps"] = args.sample_steps
    record["s_per_sampler_step"] = round(
        timing.median_s / args.sample_steps, 5)
  else:
    record["bpd_first"] = round(float(bpd[0]), 4)
    record["bpd_last"] = round(float(bpd[-1]), 4)
  print(json.dumps(record), flush=True)
  return record


if __name__ == "__main__":
  main()
