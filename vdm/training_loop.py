"""The training loop and the trainer it runs: train, evaluate, sample.

`Trainer` builds what training, `--mode=eval` and `--mode=sample` share (the
dataset, model, mesh, shardings and the compiled steps, through the step
factories of `train.py`). `train_and_evaluate` is the loop; it reads in
data-flow order: config check, workdir lock, mesh, input, model + optimizer,
shardings, steps, restore, loop (step, log, eval, checkpoint, preemption),
final eval + samples (`finish`). `restore_for_inference` gives eval and
sampling the newest valid checkpoint, read-only.

Resuming: the step's noise key and the batch of each step are functions of
(seed, step) (see `train.py`), so a resumed run draws exactly the noise and
data an uninterrupted run would: the checkpoint needs no key and no iterator
state beyond the step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from vdm import checkpointing
from vdm import config_lib
from vdm import evaluate
from vdm import generation
from vdm import input_pipeline
from vdm import model as model_lib
from vdm import parallel
from vdm import preemption
from vdm import reporting
from vdm import runtime
from vdm import train
from vdm import workdir_lock


class Trainer:
  """Everything `train_and_evaluate`, `--mode=eval` and `--mode=sample`
  share: dataset, model, mesh, shardings and the compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_lib.validate(config)
    self.config = config
    self.mesh = parallel.make_mesh(config.training.num_devices or None)
    parallel.check_batch_size(config.training.batch_size, self.mesh)
    parallel.check_batch_size(config.training.eval_batch_size, self.mesh,
                              field="config.training.eval_batch_size")
    data = config.data
    self.ds = input_pipeline.create(
        data.dataset, data_dir=data.data_dir or None,
        seed=config.training.seed, flip=data.flip)
    if data.vocab_size != self.ds.vocab_size:
      raise ValueError(
          f"config.data.vocab_size={data.vocab_size} but dataset "
          f"{data.dataset!r} has {self.ds.vocab_size} levels; set "
          f"--config.data.vocab_size={self.ds.vocab_size}.")
    self.model = model_lib.build(config.model, self.ds.shape,
                                 self.ds.vocab_size, self.ds.num_classes)
    self.tx, self.learning_rate_fn = train.create_optimizer(
        config.optimizer, config.training.num_steps)
    self._init, self.abstract_state, self.state_sharding = train.make_init(
        self.model, self.tx, mesh=self.mesh, fsdp=config.training.fsdp)
    self._key_init = jax.random.key(config.training.seed)
    self.batch_sharding = parallel.data_sharding(self.mesh)
    self.train_step = train.make_train_step(
        self.model, seed=config.training.seed,
        ema_decay=config.optimizer.ema_decay,
        adaptive_decay=config.model.adaptive_decay,
        learning_rate_fn=self.learning_rate_fn,
        state_sharding=self.state_sharding, mesh=self.mesh,
        batch_sharding=self.batch_sharding,
        # Older run configs lack the field: one pass per batch.
        grad_accum_steps=config.training.get("grad_accum_steps", 1))
    self.eval_options = opts = config_lib.eval_options(config)
    strata = opts["strata"] if opts["num_draws"] > 1 else 1
    self.eval_step = train.make_eval_step(
        self.model, eval_seed=config.training.eval_seed,
        params_sharding=self.state_sharding.ema_params, mesh=self.mesh,
        batch_sharding=self.batch_sharding,
        num_draws=opts["num_draws"], strata=strata)
    self.ode_eval_step = runtime.jit(
        functools.partial(
            train.ode_eval_step, model=self.model,
            eval_key=jax.random.key(config.training.eval_seed),
            dequantization=opts["dequantization"],
            num_draws=opts["ode_num_draws"],
            num_probes=opts["ode_num_probes"], rtol=opts["ode_rtol"],
            atol=opts["ode_atol"], error_norm=opts["ode_error_norm"],
            # 'both': each example's ODE figure minus its ELBO, paired.
            elbo_draws=opts["num_draws"] if opts["estimator"] == "both" else 0,
            elbo_strata=strata),
        in_shardings=(self.state_sharding.ema_params, self.batch_sharding,
                      parallel.replicated(self.mesh)),
        out_shardings=parallel.replicated(self.mesh))

  def gather(self, tree):
    """A copy of `tree` replicated on every device, so process 0 can fetch
    it even when the state is FSDP-sharded across processes. Call it from
    every process."""
    return jax.jit(lambda x: x,
                   out_shardings=parallel.replicated(self.mesh))(tree)

  def init_state(self) -> train.TrainState:
    return self._init(self._key_init)

  def local_batch(self, step: int) -> dict:
    """This process's rows of the global batch of `step` (numpy, host)."""
    cfg = self.config.training
    return self.ds.train_batch(step, batch_size=cfg.batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())

  def global_batch(self, step: int) -> dict:
    return parallel.shard_batch(self.mesh, self.local_batch(step))

  def batches(self, start: int):
    """Global batches from step `start` on: host batches are read two steps
    ahead in a background thread; the device copy (shard_batch) is async."""
    host = input_pipeline.prefetch(
        (self.local_batch(step)
         for step in range(start, self.config.training.num_steps)),
        buffer_size=2)
    for local in host:
      yield parallel.shard_batch(self.mesh, local)

  def evaluate(self, params, split: str = "test") -> dict:
    """bpd over the whole split (or config.eval.num_examples of it) by
    config.eval's estimator: 'elbo' (K draws), 'ode' ('bpd' is then the
    ODE's, as 'bpd_ode') or 'both'.

    The ODE runs on config.eval.ode_num_examples of the split when that is
    set (spread evenly over it), else on the ELBO's examples. With 'both'
    it pairs each of its examples with their ELBO ('bpd_ode_minus_elbo'),
    and when it ran on fewer examples than the ELBO, also gives the ODE's
    bpd of all the ELBO's examples by the difference estimator
    ('bpd_ode_estimate', `evaluate.difference_estimate`).
    """
    opts = self.eval_options
    kwargs = dict(split=split, mesh=self.mesh, num_dims=self.model.num_dims,
                  batch_size=self.config.training.eval_batch_size)
    limit = opts["num_examples"] or None
    estimator = opts["estimator"]
    result = {}
    if estimator in ("elbo", "both"):
      result = evaluate.evaluate_split(
          self.eval_step, params, self.ds,
          conditional=self.model.num_classes > 0, limit=limit, **kwargs)
    if estimator in ("ode", "both"):
      ode = evaluate.evaluate_split_ode(
          self.ode_eval_step, params, self.ds,
          limit=opts["ode_num_examples"] or limit, **kwargs)
      ode["dequantization"] = opts["dequantization"]
      ode["ode_num_draws"] = opts["ode_num_draws"]
      ode["ode_num_probes"] = opts["ode_num_probes"]
      for field in ("ode_rtol", "ode_atol", "ode_error_norm"):
        ode[field] = opts[field]
      ode["ode_num_examples"] = ode.pop("num_examples")
      if estimator == "ode":
        result = {"bpd": ode["bpd_ode"], "bpd_se": ode["bpd_ode_se"],
                  "conditional": self.model.num_classes > 0,
                  "num_examples": ode["ode_num_examples"]}
      elif ode["ode_num_examples"] < result["num_examples"]:
        ode.update(evaluate.difference_estimate(result, ode))
      result.update(ode)
    result["estimator"] = estimator
    return result


def _fetch_mean(metric_list: list[dict]) -> dict[str, float]:
  stacked = jax.device_get(metric_list)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _check_finite(metrics: dict[str, float], first_step: int, last_step: int,
                  last_good: int | None):
  bad = [k for k, v in metrics.items() if not math.isfinite(v)]
  if bad:
    where = (f"the last good checkpoint is step {last_good}" if last_good
             is not None else "no checkpoint was written")
    raise RuntimeError(
        f"non-finite {', '.join(bad)} between steps {first_step} and "
        f"{last_step}; training stopped and this state was NOT saved; {where}."
        " Lower optimizer.learning_rate or set optimizer.grad_clip.")


class Preempted(Exception):
  """Training stopped on a signal (SIGTERM, SIGINT) after saving its step.

  Attributes:
    signum: the signal.
    step: the step saved (rerun the same command to resume from it).
  """

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by signal {signum} after saving step {step}; "
                     "rerun the same command to resume.")
    self.signum = signum
    self.step = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       config_path: str | None = None,
                       on_unsaved: Callable[[bool], None] | None = None
                       ) -> dict:
  """Trains (resuming from WORKDIR/checkpoints), evaluates and samples.

  The workdir is one run: a new run writes its config to
  WORKDIR/config.json once; a resume is refused (ValueError, before
  anything is compiled or written) if `config` changes a field outside
  `config_lib.CHANGEABLE_FIELDS`.

  Args:
    config: the run's config.
    workdir: the run directory.
    config_path: the config file it came from, shown in the console header.
    on_unsaved: called with True once the run has trained a step not yet
      saved and with False once everything is saved (the command line ends
      the process at once on a signal while nothing is unsaved).
  Returns:
    The final eval result ({'bpd', 'bpd_recon', ...}) or {} if eval is off.
  Raises:
    Preempted: a SIGTERM or SIGINT stopped the run after saving.
    ValueError: a bad config, or one that is not this workdir's run.
    workdir_lock.WorkdirInUseError: another training run holds `workdir`.
  """
  config_lib.validate(config)
  cfg = config.training
  main_process = parallel.is_main_process()
  # One training run per workdir, locked before anything is written to it
  # (by process 0; the kernel releases the lock however the process ends).
  with workdir_lock.WorkdirLock(workdir, enabled=main_process):
    stored = config_lib.load_run_config(workdir)
    if stored is not None:         # a resume: the same run, or refused
      config_lib.check_changes(stored, config, workdir)
    trainer = Trainer(config)
    os.makedirs(workdir, exist_ok=True)
    if main_process:
      config_lib.write_once(config, workdir)
    ckpt = checkpointing.Manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
        keep_best=True, best_metric="bpd")
    writer = reporting.MetricWriter(workdir, enabled=main_process)
    # Closing the manager waits for in-flight async saves, also when a
    # non-finite loss (or any error) stops the run: the last good checkpoint
    # is always complete on disk before the exception leaves this function.
    with ckpt, contextlib.closing(writer):
      return _train_loop(trainer, workdir, ckpt, writer, config_path,
                         on_unsaved or (lambda unsaved: None))


def _check_fingerprint(metadata: dict, fingerprint: str, step: int,
                       workdir: str) -> None:
  """Refuses a checkpoint saved by another run (config.json replaced)."""
  saved = metadata.get("config_hash")
  if saved is not None and saved != fingerprint:
    raise ValueError(
        f"checkpoint step {step} in {workdir} was saved by a run with "
        f"fingerprint {saved}, but this config has {fingerprint} (data or "
        "model differ): the workdir's config.json no longer matches its "
        "checkpoints. Use the config that trained them, or a new --workdir.")


def _header(trainer: Trainer, workdir: str, config_path: str | None,
            resumed_step: int | None) -> str:
  cfg, ds = trainer.config, trainer.ds
  return reporting.run_header(
      workdir=workdir, config_path=config_path, resumed_step=resumed_step,
      devices=list(trainer.mesh.devices.flat),
      process_count=jax.process_count(), dataset=ds.name,
      split_sizes={s: ds.num_examples(s) for s in ("train", "test")},
      data_shape=ds.shape, vocab_size=ds.vocab_size,
      num_classes=ds.num_classes, net=cfg.model.net,
      num_params=sum(x.size for x in jax.tree.leaves(
          trainer.abstract_state.params)),
      num_steps=cfg.training.num_steps, batch_size=cfg.training.batch_size)


def _train_loop(trainer: Trainer, workdir: str, ckpt: checkpointing.Manager,
                writer: reporting.MetricWriter,
                config_path: str | None = None,
                on_unsaved: Callable[[bool], None] = lambda unsaved: None
                ) -> dict:
  cfg = trainer.config.training
  main_process = parallel.is_main_process()
  single_process = jax.process_count() == 1
  fingerprint = config_lib.run_fingerprint(trainer.config)
  # Restore or init: 1) fresh state with the final shardings; 2) replace it
  # by the newest valid checkpoint (skipping corrupt ones, with a warning).
  state = trainer.init_state()
  restored = ckpt.restore_latest(state)
  last_good = None
  if restored is not None:
    state, metadata, last_good = restored
    _check_fingerprint(metadata, fingerprint, last_good, workdir)
    logging.info("resumed from step %d", last_good)
  start = int(jax.device_get(state.step))
  progress = reporting.Progress(cfg.num_steps, start, enabled=main_process)
  progress.message(_header(trainer, workdir, config_path, last_good))
  # The config as text in TensorBoard, indented: a markdown code block.
  writer.write_text(start, "config", "\n".join(
      "    " + line for line in trainer.config.to_json_best_effort(
          indent=2, sort_keys=True).splitlines()))
  pending, window_start = [], start
  result = {}

  batches = trainer.batches(start)
  # The guard saves on a signal; `on_unsaved` tells the command line when
  # there is something to save (from the first step to the last save).
  with preemption.PreemptionGuard() as guard, contextlib.closing(batches):
    for step, batch in zip(range(start, cfg.num_steps), batches):
      if step == start:   # compiles; timed apart so rate and ETA exclude it
        progress.message("compiling the train step ...")
        compile_start = time.monotonic()
        state, metrics = jax.block_until_ready(
            trainer.train_step(state, batch))
        progress.compiled(step + 1, time.monotonic() - compile_start)
      else:
        state, metrics = trainer.train_step(state, batch)
      if step == start:
        on_unsaved(True)
      pending.append(metrics)
      done = step + 1
      is_last = done == cfg.num_steps
      log_now = (cfg.log_every and done % cfg.log_every == 0) or is_last
      save_now = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
      eval_now = cfg.eval_every and done % cfg.eval_every == 0 and not is_last
      preempted = guard.should_stop(done)  # same answer on every process
      sync_point = log_now or save_now or eval_now or preempted
      # A failed background save stops the run within a step of the
      # failure (multi-process: at the next point all processes share).
      if single_process or sync_point:
        ckpt.check_for_errors(collective=not single_process)
      if sync_point:
        mean = _fetch_mean(pending)
        _check_finite(mean, window_start + 1, done, last_good)
        pending, window_start = [], done
        if log_now:
          progress.update(done, mean)
          writer.write_scalars(done, {f"train/{k}": v for k, v in mean.items()})
          if progress.rate is not None:
            writer.write_scalars(done, {"train/steps_per_s": progress.rate})
      eval_metrics = None
      if eval_now:
        progress.message(f"step {done}: evaluating the test split ...")
        result = trainer.evaluate(state.ema_params)
        eval_metrics = {"bpd": result["bpd"]}
        writer.write_scalars(done, {f"eval/{k}": v for k, v in result.items()
                                    if k != "split"})
        progress.message(f"step {done}: test bpd {result['bpd']:.4f}")
      if save_now or preempted or is_last:
        ckpt.save(done, state,
                  metadata={"data_step": done, "config_hash": fingerprint},
                  metrics=eval_metrics, force=True)
        last_good = done
      if preempted:
        ckpt.wait_until_finished()
        on_unsaved(False)
        progress.message(f"preempted: saved step {done}; rerun the same "
                         "command to resume.")
        raise Preempted(guard.signal or 0, done)
    ckpt.wait_until_finished()
    on_unsaved(False)
    if guard.requested:          # a signal after the last step: all saved
      raise Preempted(guard.signal or 0, last_good or start)
  progress.close()

  if cfg.num_steps > start or not result:
    result = finish(trainer, state, workdir, writer, ckpt)
  return result


def finish(trainer: Trainer, state: train.TrainState, workdir: str, writer,
           ckpt) -> dict:
  """Final eval over the whole test split, JSON, samples and plots."""
  config = trainer.config
  step = int(jax.device_get(state.step))
  main_process = parallel.is_main_process()
  # The final eval always runs (eval_every only sets the periodic ones).
  reporting.say(f"final eval: test split, {trainer.ds.num_examples('test'):,}"
                " examples ...", enabled=main_process)
  started = time.monotonic()
  result = trainer.evaluate(state.ema_params)
  reporting.say(f"final eval: {result['bpd']:.4f} bits/dim in "
                f"{time.monotonic() - started:.1f} s", enabled=main_process)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                              if k != "split"})
  if main_process:
    name, record = config_lib.eval_output(config, "test", step)
    evaluate.write_eval_json(workdir, "test", step, result,
                             dataset_version=trainer.ds.version, name=name,
                             record=record)
  if config.sampling.num_samples > 0:
    params = trainer.gather(state.ema_params)   # on every process (FSDP)
    if main_process:
      smp = config.sampling
      reporting.say(f"sampling {smp.num_samples} ({smp.sampler}, "
                    f"{smp.num_steps} steps) and plotting ...")
      started = time.monotonic()
      path = generation.write_samples(
          trainer.model, params, workdir, step,
          generation.SamplingOptions.from_config(config.sampling),
          writer=writer, name=config_lib.sample_output(config, step))
      paths = reporting.write_plots(
          trainer.model, params, workdir, step,
          next(iter(trainer.ds.eval_batches("test", batch_size=64))))
      reporting.say(f"wrote {path} and {len(paths)} plots in "
                    f"{time.monotonic() - started:.1f} s")
  return result


def restore_for_inference(trainer: Trainer, workdir: str
                          ) -> tuple[train.TrainState, int]:
  """The newest valid checkpoint of WORKDIR for eval or sampling.

  Returns:
    (state with the trainer's shardings, its step).
  Raises:
    FileNotFoundError: WORKDIR/checkpoints holds no valid checkpoint.
  """
  directory = os.path.join(workdir, "checkpoints")
  # Read-only: may run beside the training run and never touches its files.
  with checkpointing.Manager(directory, read_only=True) as ckpt:
    restored = ckpt.restore_latest(trainer.init_state())
  if restored is None:
    raise FileNotFoundError(
        f"no checkpoint in {directory}; train first: python -m vdm.main "
        f"--config=... --workdir={workdir}")
  state, metadata, step = restored
  _check_fingerprint(metadata, config_lib.run_fingerprint(trainer.config),
                     step, workdir)
  return state, step
