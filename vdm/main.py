r"""Command line: train, evaluate, sample, prepare data, inspect a run.

  vdm train --config=configs/mnist5k.py --workdir=runs/demo
  vdm eval --workdir=runs/demo --split=test
  vdm sample --workdir=runs/demo --config.sampling.num_samples=16
  vdm prepare cifar10 --data_dir=DIR
  vdm info --workdir=runs/demo
  vdm import-official OFFICIAL_WORKDIR --workdir=runs/c10_official

`python -m vdm.main --mode=train|eval|sample ...` is the same command.
`--config` is needed only to start a run: a run writes its config into
WORKDIR/config.json once, and resume, eval and sample read it from there.
`--config.a.b=value` overrides a field (a misspelt field is an error that
says "did you mean"); on an existing run only the fields of
`config_lib.CHANGEABLE_FIELDS` may change. Train resumes from the newest
valid checkpoint in WORKDIR/checkpoints.

Exit codes: 0 done; 2 a usage or configuration error (one line
`error: ...` on stderr; VDM_DEBUG=1 or --debug shows the traceback); 1 the
run failed (diverged, a checkpoint could not be written, a bug);
128 + the signal number when stopped by a signal: 143 for SIGTERM, 130 for
SIGINT (Ctrl-C), after saving a checkpoint if the run had trained steps not
yet saved; rerun the same command to resume.
Multi-host: on TPU VMs nothing is needed; elsewhere pass
--coordinator_address/--num_processes/--process_id (or VDM_COORDINATOR,
VDM_NUM_PROCESSES, VDM_PROCESS_ID).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdm import checkpointing
from vdm import cli
from vdm import config_lib
from vdm import evaluate
from vdm import generation
from vdm import input_pipeline
from vdm import parallel
from vdm import runtime
from vdm import training_loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py); needed to start a "
    "run, optional for resume, eval and sample (they read "
    "WORKDIR/config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_MODE = flags.DEFINE_enum("mode", "train", list(cli.COMMANDS),
                          "What to do (or give it as the first argument).")
_SPLIT = flags.DEFINE_string("split", "test", "Split for eval.")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "Parameters for eval and sample: the EMA or the "
                            "raw (last optimizer step) ones.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "prepare: tfds data_dir (default: tfds').")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "prepare: manual downloads (default: "
    "DATA_DIR/downloads/manual).")
_OFFICIAL_CONFIG = flags.DEFINE_string(
    "official_config", None, "import-official: the official config the "
    "checkpoint was trained with (.py or .json); default: the official "
    "configs/cifar10.py.")
_BASE_CONFIG = flags.DEFINE_string(
    "base_config", None, "import-official: our config the translation starts "
    "from (default: configs/cifar10.py of this checkout).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks of usage errors "
                           "(also VDM_DEBUG=1).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index (multi-process).")

# Not recomputed by the demo (EM takes ~30 s to minutes): computed by
# `experiments/baselines.py` (mnist5k test split; 100-component EM mixture of
# per-pixel categoricals, Dirichlet alpha 0.1 picked on 500 held-out train
# images, seed 0; 2026-12-06).
MNIST5K_MIXTURE100_BPD = 1.7168


def print_summary(ds, config, result: dict, workdir: str):
  """The demo's closing table: the model's test bpd next to baselines, each
  saying whether this run computed it or experiments/baselines.py did."""
  rows = [("VDM (this run, EMA params)", result["bpd"])]
  if config.training.report_baselines:
    rows.append(("uniform over the levels (computed now)",
                 math.log2(ds.vocab_size)))
    # Images: one categorical per pixel; other data (toy2d's 2-D points):
    # one per coordinate.
    element = "pixel" if len(ds.shape) == 3 else "coordinate"
    rows.append((f"per-{element} categorical, add-one, fit on train "
                 "(computed now)", input_pipeline.baseline_bpd(ds,
                                                               split="test")))
    if ds.name == "mnist5k":
      rows.append(("mixture of 100 per-pixel categoricals "
                   "(experiments/baselines.py)", MNIST5K_MIXTURE100_BPD))
  print(f"\n{ds.name} test split, {result['num_examples']} examples, "
        "bits per dim (lower is better):")
  for name, bpd in rows:
    print(f"  {name:<64s} {bpd:7.4f}")
  if result.get("bpd_se") and "num_groups" in result:   # the ELBO's
    print(f"  VDM's Monte Carlo standard error: {result['bpd_se']:.4f} "
          f"({result['num_draws']} draws of (t, eps) per example, "
          f"{result['num_groups']} independent groups)")
  if "bpd_recon" in result:     # the ELBO's terms (not with estimator 'ode')
    print(f"  VDM terms: recon {result['bpd_recon']:.4f}  prior "
          f"{result['bpd_prior']:.4f}  diffusion {result['bpd_diff']:.4f}")
  if "bpd_ode" in result:
    print(f"  VDM by the probability-flow ODE ({result['dequantization']} "
          f"dequantisation, {result['ode_num_examples']} examples): "
          f"{result['bpd_ode']:.4f} +- {result['bpd_ode_se'] or 0:.4f}, "
          f"{result['nfe']:.0f} network evaluations per batch")
  if "bpd_ode_minus_elbo" in result:
    print(f"  ODE minus ELBO, paired on those examples: "
          f"{result['bpd_ode_minus_elbo']:+.4f} +- "
          f"{result['bpd_ode_minus_elbo_se'] or 0:.4f}")
  if "bpd_ode_estimate" in result:
    se = result["bpd_ode_estimate_se"]
    print(f"  ODE over all {result['num_examples']} examples, ELBO + that "
          f"difference: {result['bpd_ode_estimate']:.4f}"
          + (f" +- {se:.4f}" if se is not None else
             " (error unknown: one group of ELBO draws)"))
  print(f"outputs in {workdir}: eval/*.json, samples/*.png, plots/*.png, "
        "TensorBoard events")


def main(argv):
  try:
    return _main(argv)
  except Exception as error:  # pylint: disable=broad-except
    if cli.debug_requested(sys.argv) or _DEBUG.value:
      raise
    code = cli.exit_code_for_error(error)
    if code is None:
      raise
    if isinstance(error, checkpointing.CheckpointSaveError):
      # Orbax's background threads of a failed save can wait minutes for a
      # signal that never comes (a step folder that could not be created);
      # the interpreter's shutdown would wait for them. Everything that
      # could be saved is on disk and the error is printed: stop now.
      cli.exit_now(code)
    return code


def _main(argv) -> int:
  if not flags.FLAGS["verbosity"].present:
    # Progress goes to stdout; keep library INFO chatter (Orbax, jax's
    # backend search) out of the console unless asked for (--verbosity=0).
    logging.set_verbosity(logging.WARNING)
  mode = _MODE.value
  if mode == "prepare":
    return _prepare(argv)
  if mode == "info":
    return _info(argv)
  if mode == "import-official":
    return _import_official(argv)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError(f"--workdir is required for {mode}.")
  exists = os.path.isdir(workdir)
  if mode != "train" and not exists:
    raise FileNotFoundError(
        f"no run in {workdir}: the folder does not exist. Train first (vdm "
        f"train --config=... --workdir={workdir}) or fix --workdir.")
  if _CONFIG.value is None:
    if mode == "train":
      raise app.UsageError(f"--config is required to start a run: {workdir} "
                           f"has no {config_lib.CONFIG_FILE} yet.")
    raise FileNotFoundError(
        f"{workdir} has no {config_lib.CONFIG_FILE} (not a run, or one from "
        "before runs recorded their config): pass --config=<the config file "
        "it was trained with>.")
  config = _CONFIG.value
  config_lib.validate(config, mode=mode)
  # Refused before anything is compiled or written (train checks again
  # under the workdir lock).
  stored = config_lib.load_run_config(workdir) if exists else None
  if stored is not None:
    config_lib.check_changes(stored, config, workdir)
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  parallel.check_config_agreement(config_lib.fingerprint(config))
  with cli.SignalExit(enabled=jax.process_count() == 1) as stopper:
    if mode == "train":
      return _train(config, workdir, stopper.set_unsaved)
    return _eval_or_sample(config, workdir, mode)


def _train(config, workdir: str, on_unsaved: Callable[[bool], None]) -> int:
  try:
    result = training_loop.train_and_evaluate(
        config, workdir, on_unsaved=on_unsaved,
        config_path=config_flags.get_config_filename(flags.FLAGS["config"]))
  except training_loop.Preempted as stop:
    code = cli.exit_code_for_signal(stop.signum)
    if jax.process_count() == 1:
      # Everything is saved and closed. Skip the interpreter's shutdown: it
      # stops the still-running library threads (the batch prefetcher,
      # Orbax's and XLA's pools) by unwinding them, which aborted (exit 134)
      # in about half of the runs stopped this way.
      cli.exit_now(code)
    return code
  if result and parallel.is_main_process():
    ds = input_pipeline.create(config.data.dataset,
                               data_dir=config.data.data_dir or None,
                               seed=config.training.seed)
    print_summary(ds, config, result, workdir)
  return 0


def _eval_or_sample(config, workdir: str, mode: str) -> int:
  trainer = training_loop.Trainer(config)
  state, step = training_loop.restore_for_inference(trainer, workdir)
  params = state.ema_params if _PARAMS.value == "ema" else state.params
  if mode == "eval":
    result = trainer.evaluate(params, split=_SPLIT.value)
    if parallel.is_main_process():
      name, record = config_lib.eval_output(config, _SPLIT.value, step,
                                            _PARAMS.value)
      path = evaluate.write_eval_json(workdir, _SPLIT.value, step, result,
                                      dataset_version=trainer.ds.version,
                                      name=name, record=record)
      print(json.dumps(dict(result), indent=2))
      print(f"wrote {path}")
    return 0
  params = trainer.gather(params)   # on every process (FSDP)
  if parallel.is_main_process():
    options = generation.SamplingOptions.from_config(config.sampling)
    name = config_lib.sample_output(config, step, _PARAMS.value)
    if options.num_samples > options.chunk_size:
      # Many samples (FID-scale): chunks of one compiled size, resumable.
      path = generation.sample_to_dir(
          trainer.model, params, workdir, name, options,
          progress=lambda done, total: print(
              f"chunk {done}/{total} written", flush=True))
      print(f"wrote {options.num_samples} samples to {path} "
            "(vdm.generation.load_samples reads them; rerun the same "
            "command to finish an interrupted run)")
    else:
      path = generation.write_samples(trainer.model, params, workdir, step,
                                      options, name=name)
      print(f"wrote {path}")
  return 0


def _prepare(argv) -> int:
  if len(argv) != 2:
    raise app.UsageError("usage: vdm prepare NAME [--data_dir=DIR] "
                         f"[--manual_dir=DIR]; NAME one of "
                         f"{', '.join(input_pipeline.DATASETS)}.")
  name = argv[1]
  if name not in input_pipeline.DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: "
                     f"{', '.join(input_pipeline.DATASETS)}.")
  from vdm import datasets_tfds  # pylint: disable=g-import-not-at-top
  if name in datasets_tfds.TFDS_DATASETS:
    path = datasets_tfds.prepare(name, data_dir=_DATA_DIR.value,
                                 manual_dir=_MANUAL_DIR.value)
    print(f"prepared {name} in {path}")
  ds = input_pipeline.create(name, data_dir=_DATA_DIR.value)
  print(ds)
  print(f"uniform: {input_pipeline.uniform_bpd(ds):.3f} bits/dim; "
        "per-element categorical (fit on train): "
        f"{input_pipeline.baseline_bpd(ds):.3f} bits/dim on test")
  return 0


def run_info(workdir: str) -> str:
  """What `vdm info` prints about the run in `workdir`: its config summary,
  fingerprint, checkpoints (steps, newest), eval and sample files. Reads
  only; never writes."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no run in {workdir}: the folder does not "
                            "exist.")
  config = config_lib.load_run_config(workdir)
  lines = [f"run {os.path.abspath(workdir)}"]
  if config is None:
    lines.append(f"  no {config_lib.CONFIG_FILE}: not a run, or one from "
                 "before runs recorded their config")
  else:
    model, data, cfg = config.model, config.data, config.training
    lines += [
        f"  fingerprint {config_lib.run_fingerprint(config)}",
        f"  data {data.dataset} ({data.vocab_size} levels, flip "
        f"{data.flip})",
        f"  model net {model.net}, schedule {model.schedule}, "
        f"parameterization {model.parameterization}, weighting "
        f"{model.weighting}, conditional {model.conditional}",
        f"  training {cfg.num_steps} steps, batch {cfg.batch_size}, lr "
        f"{config.optimizer.learning_rate}, seed {cfg.seed}"]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in (os.listdir(ckpt_dir) if os.path.isdir(
      ckpt_dir) else []) if n.isdigit())
  if steps:
    lines.append(f"  checkpoints: steps {', '.join(map(str, steps))} "
                 f"(newest {steps[-1]})")
    try:
      with open(os.path.join(ckpt_dir, str(steps[-1]), "metadata",
                             "metadata")) as f:
        saved = json.load(f).get("config_hash")
      if saved and config is not None:
        same = saved == config_lib.run_fingerprint(config)
        lines.append(f"  newest checkpoint fingerprint {saved}"
                     f"{'' if same else ' (DIFFERS from config.json)'}")
    except (OSError, ValueError):
      lines.append("  newest checkpoint metadata unreadable")
  else:
    lines.append("  checkpoints: none")
  for folder in ("eval", "samples"):
    path = os.path.join(workdir, folder)
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    names = [n for n in names if n.endswith((".json", ".png"))]
    lines.append(f"  {folder}: {', '.join(names) if names else 'none'}")
  return "\n".join(lines)


def _info(argv) -> int:
  workdir = _WORKDIR.value or (argv[1] if len(argv) == 2 else None)
  if not workdir or (len(argv) > 1 and _WORKDIR.value):
    raise app.UsageError("usage: vdm info --workdir=DIR (or vdm info DIR).")
  print(run_info(workdir))
  return 0


def _import_official(argv) -> int:
  if len(argv) != 2 or not _WORKDIR.value:
    raise app.UsageError("usage: vdm import-official OFFICIAL_CHECKPOINT "
                         "--workdir=DIR [--official_config=PATH] "
                         "[--base_config=PATH]")
  from vdm import official  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  base_config = _BASE_CONFIG.value or official.DEFAULT_BASE_CONFIG
  if not os.path.isfile(base_config):
    # A wheel install has no configs/ beside the package.
    raise FileNotFoundError(
        f"no base config {base_config}: pass --base_config=PATH to "
        "configs/cifar10.py of a checkout of this project.")
  config, step = official.import_checkpoint(
      argv[1], workdir, official_config=_OFFICIAL_CONFIG.value,
      base_config=base_config)
  print(f"imported step {step} ({config.model.net_kwargs.num_res_blocks} "
        f"blocks x {config.model.net_kwargs.channels} channels, schedule "
        f"{config.model.schedule}) into {workdir}; evaluate with: vdm eval "
        f"--workdir={workdir}")
  return 0


def console_main(argv: Optional[list[str]] = None) -> None:
  """The `vdm` console script and `python -m vdm.main`."""
  runtime.reexec_with_allocator()  # on CPU: mimalloc or tcmalloc, ~1.2x faster
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = cli.expand_argv(argv)
  except app.UsageError as error:
    if cli.debug_requested(argv):
      raise
    cli.print_error(cli.one_line(error))
    sys.exit(cli.EXIT_USAGE)
  jax.config.config_with_absl()
  app.run(main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  console_main()
