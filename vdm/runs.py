"""A trained run in Python: its config, model, EMA parameters and step, with
bits/dim of a batch and sampling.

  import jax, vdm
  run = vdm.load_run("runs/demo")
  batch = next(run.dataset.eval_batches("test", batch_size=100))
  bpd = run.bpd(batch["image"], batch["label"], key=jax.random.key(0))
  x = run.sample(16, sampler="ddim", num_steps=100, seed=1)

`load_run` reads the workdir's own config (WORKDIR/config.json, written when
the run started) and its newest valid checkpoint, read-only: it may run
beside the training run and never writes to the workdir.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm import checkpointing
from vdm import config_lib
from vdm import generation
from vdm import input_pipeline
from vdm import model as model_lib
from vdm import sampling
from vdm import train


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (WORKDIR/config.json), locked.

  Raises:
    FileNotFoundError: the workdir has no config.json (not a vdm run, or a
      run from before configs were recorded).
    ValueError: config.json is damaged.
  """
  config = config_lib.load_run_config(workdir)
  if config is None:
    raise FileNotFoundError(
        f"{os.path.join(workdir, config_lib.CONFIG_FILE)!r} does not exist: "
        f"{workdir!r} is not the workdir of a vdm run (training writes it "
        "when a run starts). Pass the --workdir of a training run.")
  config.lock()
  return config


class Run:
  """A trained run, restored for inference (one process).

  Attributes:
    workdir: the run directory.
    config: the run's config (WORKDIR/config.json), locked.
    dataset: the run's `input_pipeline.Dataset` (its facts: shape, levels,
      classes; and its splits).
    model: the `model.Model` (schedule + network).
    params: the EMA parameters of the newest valid checkpoint, on one
      device ({'net', 'schedule'}).
    step: the training step of that checkpoint.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               dataset: input_pipeline.Dataset, model: model_lib.Model,
               params: Any, step: int):
    self.workdir, self.config, self.dataset = workdir, config, dataset
    self.model, self.params, self.step = model, params, step
    self._samplers = {}

  def __repr__(self) -> str:
    num_params = sum(p.size for p in jax.tree.leaves(self.params))
    return (f"Run({self.workdir!r}, step={self.step}, "
            f"dataset={self.dataset.name!r}, net={self.config.model.net!r}, "
            f"params={num_params:,})")

  # ------------------------------------------------------------ bits/dim

  @functools.cached_property
  def _elbo_nats(self):
    model = self.model
    return jax.jit(lambda params, x, labels, key: model.elbo_terms(
        params, x, labels, key)["total"])

  def _check_labels(self, labels, num: int):
    if not self.model.num_classes:
      return None     # an unconditional model ignores labels
    if labels is None:
      raise ValueError(
          f"this run's model is class-conditional ({self.model.num_classes} "
          f"classes): pass labels, [{num}] ints in [0, "
          f"{self.model.num_classes}).")
    labels = np.asarray(labels)
    if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be [{num}] ints; got shape "
                       f"{labels.shape}, dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= self.model.num_classes:
      raise ValueError(f"labels must be in [0, {self.model.num_classes}); "
                       f"got values in [{labels.min()}, {labels.max()}].")
    return jnp.asarray(labels, jnp.int32)

  def bpd(self, x: jax.typing.ArrayLike, labels: Any = None, *,
          key: jax.Array) -> jax.Array:
    """Bits per dimension of each example, by the ELBO with the EMA params.

    One Monte Carlo draw of (t, eps) per example (continuous time, or the
    run's T-step loss): an unbiased estimate of each example's ELBO; average
    over a batch (or several keys) and report the standard error.

    Args:
      x: [B, *dataset.shape] integers in [0, vocab_size) (a batch's
        'image').
      labels: [B] ints for a class-conditional model (a batch's 'label');
        ignored by an unconditional one.
      key: the draws' key (the same key gives the same numbers).
    Returns:
      [B] float32 bits/dim (an upper bound on -log2 p(x) / D in
      expectation).
    """
    x = np.asarray(x)
    shape = tuple(self.model.data_shape)
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
      raise ValueError(f"x must be [B, {', '.join(map(str, shape))}] "
                       f"(this run's data); got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.integer):
      raise TypeError(f"x must hold integer levels in [0, "
                      f"{self.model.vocab_size}); got dtype {x.dtype}.")
    if x.size and (x.min() < 0 or x.max() >= self.model.vocab_size):
      raise ValueError(f"x must be in [0, {self.model.vocab_size}); got "
                       f"values in [{x.min()}, {x.max()}].")
    labels = self._check_labels(labels, x.shape[0])
    nats = self._elbo_nats(self.params, jnp.asarray(x, jnp.int32), labels,
                           key)
    return nats / (self.model.num_dims * math.log(2.0))

  # ------------------------------------------------------------- samples

  def sample(self, num_samples: int, *, sampler: str | None = None,
             num_steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0,
             labels: Any = None) -> np.ndarray:
    """Draws samples from the model (EMA params).

    Args:
      num_samples: how many.
      sampler: 'ancestral' or 'ddim'; default the run's
        `config.sampling.sampler`.
      num_steps: sampler steps from t = 1 to 0; default
        `config.sampling.num_steps`.
      guidance_scale: classifier-free guidance (conditional models);
        default `config.sampling.guidance_scale`.
      seed: the sampling key's seed (the same seed gives the same samples).
      labels: [num_samples] class labels of a conditional model; default
        the classes in order (0, 1, ..., 0, 1, ...); ignored by an
        unconditional one.
    Returns:
      [num_samples, *dataset.shape] int32 levels in [0, vocab_size).
    """
    cfg = self.config.sampling
    sampler = cfg.sampler if sampler is None else sampler
    num_steps = cfg.num_steps if num_steps is None else num_steps
    guidance_scale = (cfg.guidance_scale if guidance_scale is None
                      else guidance_scale)
    if not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(f"num_samples must be an int >= 1; got "
                       f"{num_samples!r}.")
    if sampler not in sampling.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; known: "
                       f"{', '.join(sampling.SAMPLERS)}.")
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}.")
    if guidance_scale < 0:
      raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale}.")
    if guidance_scale > 0 and not self.model.num_classes:
      raise ValueError("guidance_scale > 0 needs a class-conditional model; "
                       "this run's is unconditional.")
    if not isinstance(seed, int):
      raise TypeError(f"seed must be an int; got {seed!r}.")
    if labels is None:
      labels = generation.sample_labels(self.model, num_samples)
    else:
      labels = self._check_labels(labels, num_samples)
    options = (sampler, num_steps, num_samples, float(guidance_scale))
    if options not in self._samplers:
      self._samplers[options] = generation.make_sampler(
          self.model, sampler=sampler, num_steps=num_steps,
          num_samples=num_samples, guidance_scale=float(guidance_scale),
          decode=cfg.decode, clip_x=cfg.clip_x)
    x, _ = self._samplers[options](self.params, jax.random.key(seed), labels)
    return np.asarray(jax.device_get(x))


def load_run(workdir: str) -> Run:
  """The run in `workdir`, restored from its newest valid checkpoint.

  Reads WORKDIR/config.json and WORKDIR/checkpoints/ read-only (it may run
  beside training). Opens the run's dataset for its facts, so a tfds
  dataset must be prepared where it runs (`vdm prepare`).

  Args:
    workdir: the --workdir of a training run.
  Returns:
    A `Run` with the EMA parameters on the first local device.
  Raises:
    FileNotFoundError: no config.json, or no valid checkpoint yet.
  """
  workdir = os.fspath(workdir)
  config = read_config(workdir)
  config_lib.validate(config, mode="eval")
  data = config.data
  dataset = input_pipeline.create(data.dataset, data_dir=data.data_dir or None,
                                  seed=config.training.seed)
  model = model_lib.build(config.model, dataset.shape, dataset.vocab_size,
                          dataset.num_classes)
  tx, _ = train.create_optimizer(config.optimizer, config.training.num_steps)
  abstract = jax.eval_shape(
      functools.partial(train.create_train_state, model, tx),
      jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=device), abstract)
  directory = os.path.join(workdir, "checkpoints")
  restored = None
  if os.path.isdir(directory):
    with checkpointing.Manager(directory, read_only=True) as ckpt:
      restored = ckpt.restore_latest(abstract)
  if restored is None:
    raise FileNotFoundError(
        f"no checkpoint in {directory!r} yet; train first (vdm train "
        f"--config=... --workdir={workdir}) or wait for its first "
        "checkpoint (training.checkpoint_every).")
  state, _, step = restored
  return Run(workdir, config, dataset, model, state.ema_params, int(step))
