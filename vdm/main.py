r"""Command line: train, evaluate or sample a VDM.

  python -m vdm.main --config=configs/mnist5k.py --workdir=runs/demo
  python -m vdm.main --config=configs/mnist5k.py --workdir=runs/demo \
      --mode=eval --split=test
  python -m vdm.main --config=configs/mnist5k.py --workdir=runs/demo \
      --mode=sample --config.sampling.num_samples=16

`--config.a.b=value` overrides any field (a misspelt field is an error).
Train resumes from the newest valid checkpoint in WORKDIR/checkpoints.
Multi-host: on TPU VMs nothing is needed; elsewhere pass
--coordinator_address/--num_processes/--process_id (or VDM_COORDINATOR,
VDM_NUM_PROCESSES, VDM_PROCESS_ID).
"""

from __future__ import annotations

import json
import math

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdm import config_lib
from vdm import evaluate
from vdm import generation
from vdm import input_pipeline
from vdm import parallel
from vdm import runtime
from vdm import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"],
                          "What to do.")
_SPLIT = flags.DEFINE_string("split", "test", "Split for --mode=eval.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (multi-process).")

# Measured once on mnist5k's test split by the project (not recomputed by the
# demo: EM over 4,000 x 784 x 256 takes minutes): a 100-component EM mixture
# of per-pixel categoricals.
MNIST5K_MIXTURE100_BPD = 1.692


def print_summary(ds, config, result: dict, workdir: str):
  """The demo's closing table: the model's test bpd next to baselines."""
  rows = [("VDM (this run, EMA params)", result["bpd"])]
  if config.training.report_baselines:
    rows.append(("uniform over the levels", math.log2(ds.vocab_size)))
    rows.append(("per-pixel categorical, add-one (fit on train)",
                 input_pipeline.baseline_bpd(ds, split="test")))
    if ds.name == "mnist5k":
      rows.append(("100-component mixture of per-pixel categoricals "
                   "(reference)", MNIST5K_MIXTURE100_BPD))
  print(f"\n{ds.name} test split, {result['num_examples']} examples, "
        "bits per dim (lower is better):")
  for name, bpd in rows:
    print(f"  {name:<62s} {bpd:7.4f}")
  print(f"  VDM terms: recon {result['bpd_recon']:.4f}  prior "
        f"{result['bpd_prior']:.4f}  diffusion {result['bpd_diff']:.4f}")
  print(f"outputs in {workdir}: eval/*.json, samples/*.png, plots/*.png, "
        "TensorBoard events")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  if not flags.FLAGS["verbosity"].present:
    # Progress goes to stdout; keep library INFO chatter (Orbax) out of the
    # console unless asked for with --verbosity=0.
    logging.set_verbosity(logging.WARNING)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  config = _CONFIG.value
  config_lib.validate(config)
  parallel.check_config_agreement(config_lib.fingerprint(config))
  workdir = _WORKDIR.value
  if _MODE.value == "train":
    result = train.train_and_evaluate(config, workdir)
    if result and parallel.is_main_process():
      ds = input_pipeline.create(config.data.dataset,
                                 data_dir=config.data.data_dir or None,
                                 seed=config.training.seed)
      print_summary(ds, config, result, workdir)
    return
  trainer = train.Trainer(config)
  state, step = train.restore_for_inference(trainer, workdir)
  if _MODE.value == "eval":
    result = trainer.evaluate(state.ema_params, split=_SPLIT.value)
    if parallel.is_main_process():
      path = evaluate.write_eval_json(workdir, _SPLIT.value, step, result,
                                      dataset_version=trainer.ds.version)
      print(json.dumps({k: v for k, v in result.items()}, indent=2))
      print(f"wrote {path}")
  else:
    params = trainer.gather(state.ema_params)   # on every process (FSDP)
    if parallel.is_main_process():
      path = generation.write_samples(
          trainer.model, params, workdir, step,
          generation.SamplingOptions.from_config(config.sampling))
      print(f"wrote {path}")


if __name__ == "__main__":
  runtime.reexec_with_allocator()  # on CPU: mimalloc or tcmalloc, ~1.2x faster
  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)
