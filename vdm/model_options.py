"""The model's options by name, and the rules on their combinations.

One registry per kind the model resolves (`MODEL_SCHEDULES`, the training
`NOISE_SCHEDULES`) and `check`, every rule on the options as a function of
plain values: `model.Model` checks itself with it and `config_lib.validate`
checks `config.model` with it, before the dataset is opened or anything
compiles. Weightings are checked by their own registry, `weighting.get`.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable, Mapping

from vdm import checks
from vdm import learned_schedules
from vdm import process
from vdm import schedules
from vdm import weighting as weighting_lib

Params = Mapping[str, Any]
# A resolved training noise schedule: (params, adaptive_state) -> gamma_fn.
NoiseFn = Callable[[Params, Any], process.GammaFn]

# The model's schedule gamma(t), by name: its Flax module (None: no params).
MODEL_SCHEDULES = types.MappingProxyType({
    "fixed_linear": None,
    "learned_linear": learned_schedules.LearnedLinear,
    "learned_net": learned_schedules.MonotoneNet,
})


def _model_noise(options, *, resolution, model_gamma_fn) -> NoiseFn:
  del options, resolution
  return lambda params, adaptive_state: model_gamma_fn(params)


def _fixed_noise(name: str):
  def make(options, *, resolution, model_gamma_fn) -> NoiseFn:
    del resolution, model_gamma_fn
    gamma_fn = schedules.get(name, **options)
    return lambda params, adaptive_state: gamma_fn
  return make


def _cosine_shifted_noise(options, *, resolution, model_gamma_fn) -> NoiseFn:
  del model_gamma_fn
  options = dict(options)
  shift = schedules.cosine_shift(options.pop("resolution", resolution),
                                 base=options.pop("base", 64))
  gamma_fn = schedules.get("cosine", shift=shift, **options)
  return lambda params, adaptive_state: gamma_fn


def _adaptive_noise(options, *, resolution, model_gamma_fn) -> NoiseFn:
  del resolution, model_gamma_fn
  schedules.adaptive_init(**options)   # checks the options now

  def noise_fn(params, adaptive_state):
    del params
    if adaptive_state is None:
      raise ValueError("noise_schedule='adaptive' needs the adaptive state "
                       "(TrainState.adaptive); got None.")
    return functools.partial(schedules.adaptive_gamma, adaptive_state)

  return noise_fn


# The training noise schedule p(lambda), by name: a maker binding its options
# once, (options, resolution=, model_gamma_fn=) -> NoiseFn.
NOISE_SCHEDULES = types.MappingProxyType({
    "model": _model_noise,
    "cosine": _fixed_noise("cosine"),
    "cosine_shifted": _cosine_shifted_noise,
    "edm": _fixed_noise("edm"),
    "adaptive": _adaptive_noise,
})


@contextlib.contextmanager
def _naming(field: str, name: str):
  """Prefixes a registry's error with the config fields it is about."""
  try:
    yield
  except (TypeError, ValueError) as error:
    raise type(error)(f"config.model.{field}={name!r} with its "
                      f"{field}_kwargs: {error}") from error


def check(*, schedule: str, gamma_min: float, gamma_max: float,
          vocab_size: int, num_steps: int, weighting: str,
          weighting_kwargs: Mapping[str, Any], noise_schedule: str,
          noise_schedule_kwargs: Mapping[str, Any], parameterization: str,
          variance_minimization: bool, conditional: bool,
          p_uncond: float) -> None:
  """Raises for options (plain values) no `Model` can take.

  The one home of these rules: `Model` checks itself with it, and
  `config_lib.validate` checks `config.model` with it before the dataset is
  opened or anything compiles. Arguments are `Model`'s fields (see there);
  `conditional` is num_classes > 0.

  Raises:
    ValueError: an unknown name, a bad value or a combination that does not
      train (the message names the config field to change).
    TypeError: a count that is not an int, or an option a weighting or noise
      schedule does not have.
  """
  if schedule not in MODEL_SCHEDULES:
    raise ValueError(
        f"unknown schedule {schedule!r}; known: "
        f"{', '.join(MODEL_SCHEDULES)}. Set config.model.schedule.")
  if noise_schedule not in NOISE_SCHEDULES:
    raise ValueError(
        f"unknown noise_schedule {noise_schedule!r}; known: "
        f"{', '.join(NOISE_SCHEDULES)}. Set config.model.noise_schedule.")
  if not gamma_min < gamma_max:
    raise ValueError(
        f"gamma_min={gamma_min} must be < gamma_max={gamma_max}; "
        "set config.model.gamma_min / gamma_max (paper: -13.3, 5.0).")
  checks.check_int("vocab_size", vocab_size, minimum=2,
                   hint="Set config.data.vocab_size (256 for 8-bit data).")
  checks.check_int("num_steps", num_steps, minimum=0,
                   hint="0 = continuous time; set config.model.num_steps.")
  if parameterization not in process.PARAMETERIZATIONS:
    raise ValueError(
        f"unknown parameterization {parameterization!r}; known: "
        f"{', '.join(process.PARAMETERIZATIONS)}.")
  with _naming("weighting", weighting):
    weighting_lib.get(weighting, **weighting_kwargs)
  with _naming("noise_schedule", noise_schedule):
    # The default resolution (the data's height) moves cosine_shifted's
    # shift, never the options' validity: any positive one checks them.
    NOISE_SCHEDULES[noise_schedule](noise_schedule_kwargs, resolution=64,
                                    model_gamma_fn=None)
  if num_steps > 0 and (weighting != "elbo" or noise_schedule != "model"):
    raise ValueError(
        "a weighting or a training noise schedule other than the model's "
        "needs continuous time: set config.model.num_steps = 0 (got "
        f"num_steps={num_steps}, weighting={weighting!r}, "
        f"noise_schedule={noise_schedule!r}).")
  if schedule != "fixed_linear" and (weighting != "elbo" or
                                     noise_schedule != "model"):
    # A weighted loss or a foreign p(lambda) no longer gives the learned
    # endpoints the ELBO's gradient: they would drift (measured: gamma_0
    # -9.1 vs -7.5 after 3,000 steps on digits), changing the range the
    # eval ELBO integrates over.
    raise ValueError(
        f"a learned schedule ({schedule!r}) is trained by the ELBO: "
        "use weighting='elbo' and noise_schedule='model' with it, or set "
        "config.model.schedule='fixed_linear' (with gamma_min/gamma_max) to "
        f"train with weighting={weighting!r}, "
        f"noise_schedule={noise_schedule!r}.")
  if variance_minimization:
    if schedule == "fixed_linear":
      raise ValueError(
          "variance_minimization needs a learned schedule; set "
          "config.model.schedule to 'learned_linear' or 'learned_net'.")
    if num_steps > 0 or noise_schedule != "model":
      raise ValueError(
          "variance_minimization applies to the continuous-time loss with "
          "the model's own schedule (num_steps=0, noise_schedule='model').")
  if not 0.0 <= p_uncond < 1.0:
    raise ValueError(f"p_uncond must be in [0, 1); got {p_uncond}. Set "
                     "config.model.p_uncond.")
  if p_uncond > 0 and not conditional:
    raise ValueError(
        "p_uncond > 0 (classifier-free guidance) needs a class-conditional "
        "model: set config.model.conditional = True (labelled data).")
