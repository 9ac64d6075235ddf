"""Train state, optimizer, the train/eval steps and the factories that jit them.

The training loop that runs these steps is `training_loop.py`.

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

import functools
import math
from typing import Any, Callable

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from vdm import likelihood
from vdm import model as model_lib
from vdm import parallel
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
              num_draws: int = 1, strata: int = 1) -> dict:
  """Sums of the per-example ELBO terms (nats) over the real examples.

  The key of draw 0 is fold_in(eval_key, batch_index) (one draw reproduces
  the single-draw eval to the last bit); draw k >= 1 uses fold_in(that key,
  k) for its eps (and eps_0). The K = num_draws draws come in R = K / S
  independent groups of S = strata draws whose times t are stratified per
  example: draw j of a group uses t = mod(t_g + j / S, 1), t_g the time its
  group's first draw's key gives (each t is still U(0, 1), so every draw is
  unbiased). Stratifying t is the variance reduction that counts here: on
  the demo model, the mean of 4 stratified draws has 0.11 times the variance
  of the mean of 4 independent ones (docs/likelihood.md). S = 1: K
  independent draws.

  Terms are averaged over the draws; 'total_draws' [K] holds each draw's sum
  of the total and 'total_groups' [R] each group's mean: the groups are
  i.i.d., so their spread gives the Monte Carlo standard error
  (`evaluate.evaluate_split`); the draws within a group are not.

  A class-conditional model's terms are -log p(x | y). If it was trained
  with label dropout (p_uncond > 0) it also has an unconditional model, the
  null label: 'uncond_total' (and 'uncond_total_draws', '..._groups') is
  -log p(x) under it, on the same draws (common random numbers).
  """
  key = _batch_key(eval_key, batch_index)
  x = batch["image"].astype(jnp.int32)
  labels = batch["label"] if model.num_classes else None
  mask = batch["mask"].astype(jnp.float32)
  with_uncond = bool(model.num_classes) and model.p_uncond > 0

  def draw_sums(key_k, t_k=None):
    terms = model.elbo_terms(params, x, labels, key_k, t_k)
    sums_k = {k: jnp.sum(v * mask) for k, v in terms.items()}
    if with_uncond:
      uncond = model.elbo_terms(params, x, None, key_k, t_k)["total"]
      sums_k["uncond_total"] = jnp.sum(uncond * mask)
    return sums_k

  totals = ["total"] + (["uncond_total"] if with_uncond else [])
  if num_draws == 1:
    sums = draw_sums(key)
    for name in totals:
      sums[f"{name}_draws"] = sums[name][None]
      sums[f"{name}_groups"] = sums[name][None]
  else:
    per_draw = jax.lax.map(lambda a: draw_sums(*a), _elbo_draws(
        model, key, x.shape[0], num_draws, strata))
    sums = {k: jnp.mean(v) for k, v in per_draw.items()}
    for name in totals:
      sums[f"{name}_draws"] = per_draw[name]
      sums[f"{name}_groups"] = jnp.mean(
          per_draw[name].reshape(num_draws // strata, strata), axis=1)
  sums["count"] = jnp.sum(mask)
  return sums


def _batch_key(eval_key: jax.Array, batch_index: jax.Array) -> jax.Array:
  """The key of eval batch `batch_index`: `eval_step`'s draw 0, and the
  root of the ODE step's keys and of its paired ELBO draws (which must be
  `eval_step`'s, so both derive it here)."""
  return jax.random.fold_in(eval_key, batch_index)


def _elbo_draws(model: model_lib.Model, key: jax.Array, batch_size: int,
                num_draws: int, strata: int) -> tuple[jax.Array, jax.Array]:
  """`eval_step`'s K > 1 draws of a batch: keys [K] (draw 0 is `key`, draw
  k fold_in(key, k)) and times [K, B], stratified within each group of
  `strata` draws."""
  if num_draws % strata:
    raise ValueError(f"num_draws={num_draws} is not a multiple of "
                     f"strata={strata}.")
  keys = jnp.stack([key] + [jax.random.fold_in(key, k)
                            for k in range(1, num_draws)])
  t_first = jax.vmap(model.elbo_times, in_axes=(0, None))(
      keys[::strata], batch_size)                         # [R, B]
  shifts = jnp.arange(strata, dtype=jnp.float32) / strata
  times = jnp.mod(t_first[:, None, :] + shifts[None, :, None], 1.0)
  return keys, times.reshape(num_draws, batch_size)


def elbo_per_example(params, x: jax.Array, labels, key: jax.Array, *,
                     model: model_lib.Model, num_draws: int = 1,
                     strata: int = 1) -> jax.Array:
  """[B] each example's ELBO total (nats), the mean of `eval_step`'s draws
  for the batch key `key` (the same (t, eps))."""
  if num_draws == 1:
    return model.elbo_terms(params, x, labels, key)["total"]
  per_draw = jax.lax.map(
      lambda a: model.elbo_terms(params, x, labels, *a)["total"],
      _elbo_draws(model, key, x.shape[0], num_draws, strata))
  return jnp.mean(per_draw, axis=0)


# The ODE eval's key stream, apart from the ELBO's draws of the same batch.
_ODE_STREAM = 0x0DE


def ode_eval_step(params, batch: dict, batch_index: jax.Array, *,
                  model: model_lib.Model, eval_key: jax.Array,
                  dequantization: str, num_draws: int, rtol: float,
                  atol: float, num_probes: int = 1, elbo_draws: int = 0,
                  elbo_strata: int = 1, error_norm: str = "separate") -> dict:
  """Sums over the real examples of -log P(x) (nats) by the probability-flow
  ODE (`likelihood.dequantized_log_likelihood`: its K-draw importance-
  weighted bound), their squares, 'count' and 'nfe' (this batch's network
  evaluations, all draws). The divergence is exact up to 64 dimensions
  (toy data), Hutchinson's estimate with `num_probes` Rademacher probes
  above (each evaluation then takes one forward pass and `num_probes`
  vjps). `rtol`, `atol`, `error_norm`: the solver's (`likelihood.
  ode_log_density`).

  With `elbo_draws` K > 0 also 'diff_total' and 'diff_total_sq': the sums
  of each example's ODE figure minus its ELBO (`elbo_per_example`: the
  mean of `eval_step`'s K draws of this batch, `elbo_strata` per group),
  and of their squares. The two estimates of one image move together (a
  detailed image costs more bits by both), so their paired difference
  varies less over the images than either figure does.
  """
  key = jax.random.fold_in(_batch_key(eval_key, batch_index), _ODE_STREAM)
  x = batch["image"].astype(jnp.int32)
  labels = batch["label"] if model.num_classes else None
  mask = batch["mask"].astype(jnp.float32)
  bound, nfe = likelihood.dequantized_log_likelihood(
      model.eps_fn(params, labels), model.gamma_fn(params), x,
      model.vocab_size, key, dequantization=dequantization,
      num_draws=num_draws, num_probes=num_probes, rtol=rtol, atol=atol,
      error_norm=error_norm,
      divergence="exact" if model.num_dims <= 64 else "hutchinson")
  nats = -bound
  sums = {"ode_total": jnp.sum(nats * mask),
          "ode_total_sq": jnp.sum(jnp.square(nats) * mask),
          "count": jnp.sum(mask), "nfe": nfe.astype(jnp.float32)}
  if elbo_draws:
    diff = nats - elbo_per_example(
        params, x, labels, _batch_key(eval_key, batch_index), model=model,
        num_draws=elbo_draws, strata=elbo_strata)
    sums["diff_total"] = jnp.sum(diff * mask)
    sums["diff_total_sq"] = jnp.sum(jnp.square(diff) * mask)
  return sums


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
                   num_draws: int = 1, strata: int = 1
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
    strata: S, draws per group with stratified t (`eval_step`); K must be a
      multiple of S (or 1).
  Returns:
    The jitted `eval_step`, sums replicated.
  """
  if not isinstance(num_draws, int) or num_draws < 1:
    raise ValueError(f"num_draws={num_draws!r}: pass an int >= 1 (draws of "
                     "(t, eps) per eval example).")
  if not isinstance(strata, int) or strata < 1 or (
      num_draws > 1 and num_draws % strata):
    raise ValueError(f"strata={strata!r} with num_draws={num_draws}: pass an "
                     "int >= 1 that divides num_draws (1: independent "
                     "draws).")
  if batch_sharding is None:
    batch_sharding = parallel.data_sharding(mesh)
  repl = parallel.replicated(mesh)
  eval_fn = functools.partial(eval_step, model=model,
                              eval_key=jax.random.key(eval_seed),
                              num_draws=num_draws, strata=strata)
  return runtime.jit(eval_fn,
                     in_shardings=(params_sharding, batch_sharding, repl),
                     out_shardings=repl)
