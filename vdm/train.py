"""Train state, optimizer, the jitted train/eval steps and the training loop.

The loop (`train_and_evaluate`) reads in data-flow order: config check, mesh,
input, model + optimizer, shardings, steps, restore, loop (step, log, eval,
checkpoint, preemption), final eval + samples.

Determinism: the step's noise key is `fold_in(fold_in(key(seed), 1),
state.step)` (stream 1 keeps it apart from the init key) and the
batch of step s is a pure function of (seed, s) (`input_pipeline`), so a
resumed run draws exactly the noise and data an uninterrupted run would: the
checkpoint needs no key and no iterator state beyond the step.

`make_train_step` and `make_eval_step` are the only way a step is compiled:
the loop, the benchmarks and the profiler all use them, so what is timed is
what a run ships.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from typing import Any, Callable

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm import checkpointing
from vdm import config_lib
from vdm import evaluate
from vdm import generation
from vdm import input_pipeline
from vdm import likelihood
from vdm import model as model_lib
from vdm import parallel
from vdm import reporting
from vdm import runtime


class TrainState(train_state.TrainState):
  """Flax TrainState + EMA parameters + the adaptive noise schedule's state.

  Fields beyond Flax's (step, params, opt_state, apply_fn, tx):
    ema_params: exponential moving average of `params` (used for eval and
      sampling).
    adaptive: `schedules.AdaptiveState` of the adaptive noise schedule, or an
      empty dict when the run does not use it.
  """
  ema_params: Any = None
  adaptive: Any = None


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then constant or cosine decay."""
  lr = float(opt_config.learning_rate)
  warmup = int(opt_config.warmup_steps)
  if opt_config.decay == "none":
    decay = optax.constant_schedule(lr)
  elif opt_config.decay == "cosine":
    decay = optax.cosine_decay_schedule(
        lr, max(1, num_train_steps - warmup), alpha=opt_config.final_lr_frac)
  else:
    raise ValueError(f"unknown optimizer.decay {opt_config.decay!r}; known: "
                     "none, cosine.")
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params) -> Any:
  """True for the network's kernels (ndim >= 2); False for biases, norm
  scales, embeddings' 1-D params and every schedule parameter (decaying
  gamma_0 or the schedule's span would pull the ELBO's range to 0)."""
  def decay(path, leaf):
    in_schedule = any(getattr(k, "key", None) == "schedule" for k in path)
    return (not in_schedule) and getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(opt_config, num_train_steps: int):
  """AdamW (+ optional global-norm clipping); paper: lr 2e-4, b2 0.99, wd
  0.01 (VDM paper, appendix on experimental details)."""
  lr = learning_rate_schedule(opt_config, num_train_steps)
  parts = []
  if opt_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_config.grad_clip))
  parts.append(optax.adamw(lr, b1=opt_config.b1, b2=opt_config.b2,
                           eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*parts), lr


def create_train_state(model: model_lib.Model, tx, key: jax.Array
                       ) -> TrainState:
  params = model.init(key)
  adaptive = model.init_adaptive()
  return TrainState.create(
      apply_fn=None, params=params, tx=tx,
      ema_params=jax.tree.map(jnp.copy, params),
      adaptive=adaptive if adaptive is not None else {})


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """EMA decay with warm-up: min(decay, (1 + step) / (10 + step)).

  Early in training the average would otherwise be dominated by the random
  initialisation for ~1/(1-decay) steps; the warm-up makes short runs' EMA
  meaningful and leaves long runs (the paper's 0.9999) unchanged.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def accumulated_value_and_grad(loss_fn: Callable, params: Any, inputs: Any,
                               key: jax.Array, num_micro_batches: int):
  """value_and_grad of a batch-mean loss, over micro-batches in a scan.

  Gradient accumulation: only one micro-batch's activations are live at a
  time, so a batch that does not fit a device in one pass still trains as
  one optimizer step (the paper's batch 128 on a smaller GPU). Micro-batch k
  holds examples k, k + K, k + 2K, ... (K = num_micro_batches): a strided
  split keeps each device's rows of a data-sharded batch on that device.

  Args:
    loss_fn: (params, inputs, key) -> (loss [] mean over the examples,
      aux: a dict of [n, ...] per-example arrays).
    params: what to differentiate.
    inputs: a pytree of [B, ...] arrays (None leaves allowed).
    key: K = 1: passed as is (the plain value_and_grad, the same program
      as without accumulation); K > 1: micro-batch k gets fold_in(key, k).
    num_micro_batches: K, a positive int dividing B.
  Returns:
    ((mean loss, aux with [B, ...] leaves in the input's order), mean
    gradient). Equal to one pass over the batch up to float rounding (the
    mean is a sum of K partial means) where loss_fn draws no random numbers;
    with random draws, in distribution (each micro-batch draws its own).
  Raises:
    ValueError: K not a positive int dividing the batch.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  num = num_micro_batches
  if num == 1:
    return grad_fn(params, inputs, key)
  sizes = [a.shape[0] for a in jax.tree.leaves(inputs)]
  if (not isinstance(num, int) or num < 1 or len(set(sizes)) != 1
      or sizes[0] % num):
    raise ValueError(
        f"num_micro_batches={num!r} must be a positive int dividing the "
        f"batch; got leading sizes {sizes}. Set "
        "config.training.grad_accum_steps to a divisor of "
        "config.training.batch_size.")
  # [B, ...] -> [K, B / K, ...]: micro-batch k = rows k, k + K, ...
  split = lambda a: jnp.swapaxes(
      a.reshape((a.shape[0] // num, num) + a.shape[1:]), 0, 1)
  merge = lambda a: jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])

  def micro(grad_sum, xs):
    k, micro_inputs = xs
    (loss, aux), grads = grad_fn(params, micro_inputs,
                                 jax.random.fold_in(key, k))
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, (losses, aux) = jax.lax.scan(
      micro, zeros, (jnp.arange(num), jax.tree.map(split, inputs)))
  grads = jax.tree.map(lambda g: g / num, grad_sum)
  return (jnp.mean(losses), jax.tree.map(merge, aux)), grads


def train_step(state: TrainState, batch: dict, *, model: model_lib.Model,
               base_key: jax.Array, ema_decay: float, adaptive_decay: float,
               learning_rate_fn: Callable, grad_accum_steps: int = 1
               ) -> tuple[TrainState, dict]:
  """One optimizer step. Pure: (state, batch) -> (state, metrics).

  Args:
    state: the train state (donated by the jitted caller).
    batch: {'image': [B, ...] int, 'label': [B] int32}, global batch.
    grad_accum_steps: micro-batches the batch's gradient is accumulated over
      (`accumulated_value_and_grad`); the optimizer, EMA, adaptive
      histogram and step counter advance once per step whatever it is. 1 =
      one pass over the batch.
  Returns:
    (new state, metrics: float32 scalars averaged over the global batch; bpd
    figures per dimension in bits).
  """
  key = jax.random.fold_in(base_key, state.step)  # same key after a restart
  x = batch["image"].astype(jnp.int32)
  labels = batch["label"] if model.num_classes else None
  adaptive = state.adaptive if model.noise_schedule == "adaptive" else None

  def loss_fn(params, inputs, key):
    return model.training_loss(params, inputs[0], inputs[1], key, adaptive)

  (loss, aux), grads = accumulated_value_and_grad(
      loss_fn, state.params, (x, labels), key, grad_accum_steps)
  new_state = state.apply_gradients(grads=grads)
  decay = ema_decay_at(state.step, ema_decay)
  new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                         state.ema_params, new_state.params)
  new_state = new_state.replace(ema_params=new_ema)
  if adaptive is not None:
    from vdm import schedules  # pylint: disable=g-import-not-at-top
    new_state = new_state.replace(adaptive=schedules.adaptive_update(
        adaptive, aux["logsnr"], aux["weighted_mse"], decay=adaptive_decay))

  to_bpd = 1.0 / (model.num_dims * math.log(2.0))
  gamma_0, gamma_1 = model.endpoints(state.params)
  metrics = {
      "loss": loss * to_bpd,
      "bpd_recon": jnp.mean(aux["recon"]) * to_bpd,
      "bpd_prior": jnp.mean(aux["prior"]) * to_bpd,
      "bpd_diff": jnp.mean(aux["diff"]) * to_bpd,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": learning_rate_fn(state.step),
      "gamma_0": gamma_0, "gamma_1": gamma_1,
  }
  return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)


def eval_step(params, batch: dict, batch_index: jax.Array, *,
              model: model_lib.Model, eval_key: jax.Array,
              num_draws: int = 1) -> dict:
  """Sums of the per-example ELBO terms (nats) over the real examples.

  The key of draw 0 is fold_in(eval_key, batch_index) (one draw reproduces
  the single-draw eval to the last bit); draw k >= 1 uses fold_in(that key,
  k), independent draws of (t, eps), so the split means of the K draws are
  i.i.d. and their spread gives the Monte Carlo standard error
  (`evaluate.evaluate_split`). Terms are averaged over the draws;
  'total_draws' [K] holds each draw's sum of the total.

  A class-conditional model's terms are -log p(x | y). If it was trained
  with label dropout (p_uncond > 0) it also has an unconditional model, the
  null label: 'uncond_total' (and 'uncond_total_draws') is -log p(x) under
  it, on the same draws (common random numbers).
  """
  key = jax.random.fold_in(eval_key, batch_index)
  x = batch["image"].astype(jnp.int32)
  labels = batch["label"] if model.num_classes else None
  mask = batch["mask"].astype(jnp.float32)
  with_uncond = bool(model.num_classes) and model.p_uncond > 0

  def draw_sums(key_k):
    terms = model.elbo_terms(params, x, labels, key_k)
    sums_k = {k: jnp.sum(v * mask) for k, v in terms.items()}
    if with_uncond:
      uncond = model.elbo_terms(params, x, None, key_k)["total"]
      sums_k["uncond_total"] = jnp.sum(uncond * mask)
    return sums_k

  if num_draws == 1:
    sums = draw_sums(key)
    sums["total_draws"] = sums["total"][None]
    if with_uncond:
      sums["uncond_total_draws"] = sums["uncond_total"][None]
  else:
    keys = jnp.stack([key] + [jax.random.fold_in(key, k)
                              for k in range(1, num_draws)])
    per_draw = jax.lax.map(draw_sums, keys)
    sums = {k: jnp.mean(v) for k, v in per_draw.items()}
    sums["total_draws"] = per_draw["total"]
    if with_uncond:
      sums["uncond_total_draws"] = per_draw["uncond_total"]
  sums["count"] = jnp.sum(mask)
  return sums


# The ODE eval's key stream, apart from the ELBO's draws of the same batch.
_ODE_STREAM = 0x0DE


def ode_eval_step(params, batch: dict, batch_index: jax.Array, *,
                  model: model_lib.Model, eval_key: jax.Array,
                  dequantization: str, num_draws: int, rtol: float,
                  atol: float) -> dict:
  """Sums over the real examples of -log P(x) (nats) by the probability-flow
  ODE (`likelihood.dequantized_log_likelihood`: its K-draw importance-
  weighted bound), their squares, 'count' and 'nfe' (this batch's network
  evaluations, all draws). The divergence is exact up to 64 dimensions
  (toy data), Hutchinson's estimate with one Rademacher probe above."""
  key = jax.random.fold_in(jax.random.fold_in(eval_key, batch_index),
                           _ODE_STREAM)
  x = batch["image"].astype(jnp.int32)
  labels = batch["label"] if model.num_classes else None
  mask = batch["mask"].astype(jnp.float32)
  bound, nfe = likelihood.dequantized_log_likelihood(
      model.eps_fn(params, labels), model.gamma_fn(params), x,
      model.vocab_size, key, dequantization=dequantization,
      num_draws=num_draws, rtol=rtol, atol=atol,
      divergence="exact" if model.num_dims <= 64 else "hutchinson")
  nats = -bound
  return {"ode_total": jnp.sum(nats * mask),
          "ode_total_sq": jnp.sum(jnp.square(nats) * mask),
          "count": jnp.sum(mask), "nfe": nfe.astype(jnp.float32)}


# -------------------------------------------------------- step factories


def train_base_key(seed: int) -> jax.Array:
  """The train step's base key: `fold_in(key(seed), 1)`; stream 1 keeps it
  apart from the init key `key(seed)`."""
  return jax.random.fold_in(jax.random.key(seed), 1)


def make_init(model: model_lib.Model, tx: optax.GradientTransformation, *,
              mesh: jax.sharding.Mesh, fsdp: bool = False
              ) -> tuple[Callable[[jax.Array], TrainState], TrainState, Any]:
  """The jitted state initialiser, with the state's shapes and shardings.

  Args:
    model: the built model.
    tx: the optimizer (`create_optimizer`).
    mesh: the device mesh (`parallel.make_mesh`).
    fsdp: split the state over the mesh (`parallel.state_sharding`).
  Returns:
    (init: key -> TrainState placed with the shardings, abstract state of
    `jax.ShapeDtypeStruct` leaves, state sharding pytree).
  """
  init = functools.partial(create_train_state, model, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sharding = parallel.state_sharding(mesh, abstract, fsdp=fsdp)
  return (jax.jit(init, out_shardings=state_sharding), abstract,
          state_sharding)


def make_train_step(model: model_lib.Model, *, seed: int, ema_decay: float,
                    adaptive_decay: float, learning_rate_fn: Callable,
                    state_sharding: Any, mesh: jax.sharding.Mesh,
                    batch_sharding: jax.sharding.Sharding | None = None,
                    grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, dict],
                                  tuple[TrainState, dict]]:
  """The compiled train step `(state, batch) -> (state, metrics)`.

  The state is donated; metrics come back replicated. Compiled through
  `runtime.jit` (this backend's XLA options).

  Args:
    model: the built model.
    seed: `config.training.seed`; the step's key is
      `fold_in(train_base_key(seed), state.step)`.
    ema_decay: `config.optimizer.ema_decay`.
    adaptive_decay: `config.model.adaptive_decay`.
    learning_rate_fn: the optimizer's schedule (reported as a metric).
    state_sharding: shardings of the train state (`make_init`).
    mesh: the device mesh.
    batch_sharding: of the batch; default `parallel.data_sharding(mesh)`.
    grad_accum_steps: `config.training.grad_accum_steps` (see
      `train_step`).
  Returns:
    The jitted step.
  """
  if batch_sharding is None:
    batch_sharding = parallel.data_sharding(mesh)
  step_fn = functools.partial(
      train_step, model=model, base_key=train_base_key(seed),
      ema_decay=ema_decay, adaptive_decay=adaptive_decay,
      learning_rate_fn=learning_rate_fn, grad_accum_steps=grad_accum_steps)
  return runtime.jit(
      step_fn, in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, parallel.replicated(mesh)),
      donate_argnums=(0,))


def make_eval_step(model: model_lib.Model, *, eval_seed: int,
                   params_sharding: Any, mesh: jax.sharding.Mesh,
                   batch_sharding: jax.sharding.Sharding | None = None,
                   num_draws: int = 1
                   ) -> Callable[[Any, dict, jax.Array], dict]:
  """The compiled eval step `(params, batch, batch_index) -> sums`.

  Args:
    model: the built model.
    eval_seed: `config.training.eval_seed`; the key of batch i is
      `fold_in(key(eval_seed), i)`.
    params_sharding: shardings of the parameters (the state sharding's
      `ema_params`).
    mesh: the device mesh.
    batch_sharding: of the batch; default `parallel.data_sharding(mesh)`.
    num_draws: K >= 1 draws of (t, eps) per example (`eval_step`); the
      eval costs K times one draw's.
  Returns:
    The jitted `eval_step`, sums replicated.
  """
  if not isinstance(num_draws, int) or num_draws < 1:
    raise ValueError(f"num_draws={num_draws!r}: pass an int >= 1 (draws of "
                     "(t, eps) per eval example).")
  if batch_sharding is None:
    batch_sharding = parallel.data_sharding(mesh)
  repl = parallel.replicated(mesh)
  eval_fn = functools.partial(eval_step, model=model,
                              eval_key=jax.random.key(eval_seed),
                              num_draws=num_draws)
  return runtime.jit(eval_fn,
                     in_shardings=(params_sharding, batch_sharding, repl),
                     out_shardings=repl)


# ------------------------------------------------------------------- loop


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
    self.tx, self.learning_rate_fn = create_optimizer(
        config.optimizer, config.training.num_steps)
    self._init, self.abstract_state, self.state_sharding = make_init(
        self.model, self.tx, mesh=self.mesh, fsdp=config.training.fsdp)
    self._key_init = jax.random.key(config.training.seed)
    self.batch_sharding = parallel.data_sharding(self.mesh)
    self.train_step = make_train_step(
        self.model, seed=config.training.seed,
        ema_decay=config.optimizer.ema_decay,
        adaptive_decay=config.model.adaptive_decay,
        learning_rate_fn=self.learning_rate_fn,
        state_sharding=self.state_sharding, mesh=self.mesh,
        batch_sharding=self.batch_sharding,
        # Older run configs lack the field: one pass per batch.
        grad_accum_steps=config.training.get("grad_accum_steps", 1))
    self.eval_options = config_lib.eval_options(config)
    self.eval_step = make_eval_step(
        self.model, eval_seed=config.training.eval_seed,
        params_sharding=self.state_sharding.ema_params, mesh=self.mesh,
        batch_sharding=self.batch_sharding,
        num_draws=self.eval_options["num_draws"])
    opts = self.eval_options
    self.ode_eval_step = runtime.jit(
        functools.partial(
            ode_eval_step, model=self.model,
            eval_key=jax.random.key(config.training.eval_seed),
            dequantization=opts["dequantization"],
            num_draws=opts["ode_num_draws"], rtol=opts["ode_rtol"],
            atol=opts["ode_atol"]),
        in_shardings=(self.state_sharding.ema_params, self.batch_sharding,
                      parallel.replicated(self.mesh)),
        out_shardings=parallel.replicated(self.mesh))

  def gather(self, tree):
    """A copy of `tree` replicated on every device, so process 0 can fetch
    it even when the state is FSDP-sharded across processes. Call it from
    every process."""
    return jax.jit(lambda x: x,
                   out_shardings=parallel.replicated(self.mesh))(tree)

  def init_state(self) -> TrainState:
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
    """bpd over the whole split by config.eval's estimator: 'elbo' (K
    draws), 'ode' ('bpd' is then the ODE's, as 'bpd_ode') or 'both'."""
    kwargs = dict(split=split, mesh=self.mesh, num_dims=self.model.num_dims,
                  batch_size=self.config.training.eval_batch_size)
    estimator = self.eval_options["estimator"]
    result = {}
    if estimator in ("elbo", "both"):
      result = evaluate.evaluate_split(
          self.eval_step, params, self.ds,
          conditional=self.model.num_classes > 0, **kwargs)
    if estimator in ("ode", "both"):
      ode = evaluate.evaluate_split_ode(self.ode_eval_step, params, self.ds,
                                        **kwargs)
      ode["dequantization"] = self.eval_options["dequantization"]
      ode["ode_num_draws"] = self.eval_options["ode_num_draws"]
      if estimator == "ode":
        result = {"bpd": ode["bpd_ode"], "bpd_se": ode["bpd_ode_se"],
                  "conditional": self.model.num_classes > 0}
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
    checkpointing.WorkdirInUseError: another training run holds `workdir`.
  """
  config_lib.validate(config)
  cfg = config.training
  main_process = parallel.is_main_process()
  # One training run per workdir, locked before anything is written to it
  # (by process 0; the kernel releases the lock however the process ends).
  with checkpointing.WorkdirLock(workdir, enabled=main_process):
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
  with checkpointing.PreemptionGuard() as guard, contextlib.closing(batches):
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
      if log_now or save_now or eval_now or preempted:
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


def finish(trainer: Trainer, state: TrainState, workdir: str, writer,
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
                          ) -> tuple[TrainState, int]:
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
