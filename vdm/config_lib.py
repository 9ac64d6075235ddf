"""Config checking and recording: every field is validated once, in plain
Python, before the dataset is opened or anything is compiled; the resolved
config is written to the run directory.

Names are checked against the registries of the modules that resolve them
(`input_pipeline.DATASETS`, `nets.NAMES`, `nets.COMPUTE_DTYPES`,
`sampling.SAMPLERS`, `sampling.DECODE_MODES`); the model's options, weighting
and schedules included, by `model_options.check`, the rules `model.Model`
itself applies.
"""

from __future__ import annotations

import json
import os

import ml_collections

from vdm import checks
from vdm import input_pipeline
from vdm import model_options
from vdm import nets
from vdm import sampling


def _fail(field: str, value, expected: str):
  raise ValueError(f"config.{field}={value!r} is invalid: expected {expected}."
                   f" Fix it in the config file or with --config.{field}=...")


def _positive_int(config, field: str, *, allow_zero: bool = False):
  value = config
  for part in field.split("."):
    value = value[part]
  try:
    checks.check_int(field, value, minimum=0 if allow_zero else 1)
  except (TypeError, ValueError):
    _fail(field, value, "an int >= 0" if allow_zero else "an int > 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and how to fix it.

  TypeError instead where a model count (data.vocab_size, model.num_steps)
  is not an int, or a weighting or noise schedule option does not exist.
  """
  for group in ("data", "model", "training", "optimizer", "sampling"):
    if group not in config:
      raise ValueError(f"config has no '{group}' group; configs must define "
                       "data, model, training, optimizer and sampling (see "
                       "configs/mnist5k.py).")
  datasets = input_pipeline.DATASETS
  if config.data.dataset not in datasets:
    _fail("data.dataset", config.data.dataset, f"one of {', '.join(datasets)}")
  model = config.model
  if model.net not in nets.NAMES:
    _fail("model.net", model.net, f"one of {', '.join(nets.NAMES)}")
  dtype = model.net_kwargs.get("dtype", "float32")
  if dtype not in nets.COMPUTE_DTYPES:
    _fail("model.net_kwargs.dtype", dtype,
          f"one of {', '.join(nets.COMPUTE_DTYPES)} (the network's compute "
          "dtype; parameters and the ELBO stay float32)")
  # data.vocab_size and every model option, by the rules `model.Model` uses.
  model_options.check(
      schedule=model.schedule, gamma_min=model.gamma_min,
      gamma_max=model.gamma_max, vocab_size=config.data.vocab_size,
      num_steps=model.num_steps, weighting=model.weighting,
      weighting_kwargs=dict(model.weighting_kwargs),
      noise_schedule=model.noise_schedule,
      noise_schedule_kwargs=dict(model.noise_schedule_kwargs),
      parameterization=model.parameterization,
      variance_minimization=model.variance_minimization,
      conditional=model.conditional, p_uncond=model.p_uncond)
  if not 0.0 < model.adaptive_decay < 1.0:
    _fail("model.adaptive_decay", model.adaptive_decay,
          "a float in (0, 1)")
  for field in ("training.batch_size", "training.num_steps",
                "training.eval_batch_size", "training.max_to_keep"):
    _positive_int(config, field)
  for field in ("training.log_every", "training.eval_every",
                "training.checkpoint_every"):
    _positive_int(config, field, allow_zero=True)
  _positive_int(config, "training.num_devices", allow_zero=True)
  try:
    checks.check_int("training.seed", config.training.seed)
  except TypeError:
    _fail("training.seed", config.training.seed, "an int")
  opt = config.optimizer
  if not (isinstance(opt.learning_rate, (int, float)) and
          opt.learning_rate > 0):
    _fail("optimizer.learning_rate", opt.learning_rate, "a float > 0")
  _positive_int(config, "optimizer.warmup_steps", allow_zero=True)
  if not 0.0 <= opt.ema_decay < 1.0:
    _fail("optimizer.ema_decay", opt.ema_decay, "a float in [0, 1)")
  if opt.grad_clip < 0:
    _fail("optimizer.grad_clip", opt.grad_clip, "a float >= 0 (0 = off)")
  if opt.weight_decay < 0:
    _fail("optimizer.weight_decay", opt.weight_decay, "a float >= 0")
  if opt.decay not in ("none", "cosine"):
    _fail("optimizer.decay", opt.decay, "'none' or 'cosine'")
  smp = config.sampling
  if smp.sampler not in sampling.SAMPLERS:
    _fail("sampling.sampler", smp.sampler,
          f"one of {', '.join(sampling.SAMPLERS)}")
  if smp.decode not in sampling.DECODE_MODES:
    _fail("sampling.decode", smp.decode,
          f"one of {', '.join(sampling.DECODE_MODES)}")
  _positive_int(config, "sampling.num_steps")
  _positive_int(config, "sampling.num_samples", allow_zero=True)
  if smp.guidance_scale < 0:
    _fail("sampling.guidance_scale", smp.guidance_scale, "a float >= 0")


def write(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config as JSON to WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)
  return path


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """A stable string of the config (processes compare it in multi-host)."""
  return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
