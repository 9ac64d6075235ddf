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

import difflib
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vdm import checks
from vdm import input_pipeline
from vdm import model_options
from vdm import nets
from vdm import sampling


MODES = ("train", "eval", "sample")
CONFIG_FILE = "config.json"

# Example shapes known without opening the data (checked against the opened
# dataset by tests/test_configs.py), for `_check_net_takes_data`.
DATASET_SHAPES = {"mnist5k": (28, 28, 1), "digits": (8, 8, 1),
                  "toy2d": (2,), "fashion_mnist": (28, 28, 1),
                  "cifar10": (32, 32, 3), "imagenet32": (32, 32, 3),
                  "imagenet64": (64, 64, 3)}

# What defines the trained function: every field of these groups (but
# data.data_dir, which says where the files are, not what they are) goes
# into `run_fingerprint`.
FINGERPRINT_GROUPS = ("data", "model")
# fused_norm picks a kernel for the same function (nets.resolve_fused_norm).
_NOT_FINGERPRINTED = ("data.data_dir", "model.net_kwargs.fused_norm")

# The fields an existing run's config may change (resume, eval, sample):
# steps, logging, checkpoint and eval cadence, eval and sampling options,
# devices and layout, and the learning rate (lowering it is the fix for a
# divergence: resume from the last good checkpoint with a smaller one).
# A name ending in "." covers a whole group. Anything else (data, model,
# loss, schedule, parameterization, batch size, seed, the rest of the
# optimizer) is refused: it would make the workdir hold another run.
CHANGEABLE_FIELDS = (
    "data.data_dir",
    "training.num_steps", "training.log_every", "training.eval_every",
    "training.checkpoint_every", "training.max_to_keep",
    "training.eval_batch_size", "training.eval_seed",
    "training.report_baselines", "training.num_devices", "training.fsdp",
    "training.grad_accum_steps", "model.net_kwargs.fused_norm",
    "optimizer.learning_rate",
    "sampling.", "eval.",
)

# config.eval: the estimators of --mode=eval and the final eval. A config
# without the group (runs from before it) gets these.
EVAL_DEFAULTS = {"estimator": "elbo", "num_draws": 1,
                 "dequantization": "truncated_normal", "ode_num_draws": 1,
                 "ode_num_probes": 1,
                 "ode_rtol": 1e-5, "ode_atol": 1e-5,
                 "ode_error_norm": "separate", "num_examples": 0,
                 "strata": 4, "ode_num_examples": 0}
ESTIMATORS = ("elbo", "ode", "both")


def eval_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.eval's fields, the defaults where the group or a field is
  missing."""
  given = dict(config.eval) if "eval" in config else {}
  return {k: given.get(k, v) for k, v in EVAL_DEFAULTS.items()}


def with_eval_defaults(config: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """`config` with every config.eval field, the defaults where missing (a
  run stored before a field existed), so `--config.eval.<field>=` overrides
  apply to any run. Changes `config` in place and returns it."""
  if "eval" not in config:
    config.eval = ml_collections.ConfigDict()
  for key, value in EVAL_DEFAULTS.items():
    if key not in config.eval:
      config.eval[key] = value
  return config


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


def validate(config: ml_collections.ConfigDict, *, mode: str = "train"
             ) -> None:
  """Raises ValueError naming the first bad field and how to fix it.

  TypeError instead where a model count (data.vocab_size, model.num_steps)
  is not an int, or a weighting or noise schedule option does not exist.

  Args:
    config: the run's config.
    mode: what it is used for: "train", "eval" or "sample" (sampling asks
      for sampling.num_samples > 0).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is unknown; known: {', '.join(MODES)}.")
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
  if "grad_accum_steps" in config.training:
    _positive_int(config, "training.grad_accum_steps")
    if config.training.batch_size % config.training.grad_accum_steps:
      _fail("training.grad_accum_steps", config.training.grad_accum_steps,
            f"a divisor of training.batch_size={config.training.batch_size} "
            "(each micro-batch holds batch_size / grad_accum_steps examples)")
  if "chunk_size" in config.sampling:
    _positive_int(config, "sampling.chunk_size")
  try:
    checks.check_int("training.seed", config.training.seed)
  except TypeError:
    _fail("training.seed", config.training.seed, "an int")
  opt = config.optimizer
  if not (isinstance(opt.learning_rate, (int, float)) and
          math.isfinite(opt.learning_rate) and opt.learning_rate > 0):
    _fail("optimizer.learning_rate", opt.learning_rate, "a finite float > 0")
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
  # Guidance needs a conditional model; silently ignoring it would hand back
  # unguided samples under a guided name.
  if smp.guidance_scale > 0 and not model.conditional:
    _fail("sampling.guidance_scale", smp.guidance_scale,
          "0 for an unconditional model (model.conditional=False); guidance "
          "needs a model trained with model.conditional=True and "
          "model.p_uncond > 0")
  _positive_int(config, "sampling.num_frames", allow_zero=True)
  if smp.num_frames > smp.num_steps + 1:
    _fail("sampling.num_frames", smp.num_frames,
          f"at most sampling.num_steps + 1 = {smp.num_steps + 1} (one frame "
          "per sampler step and the start)")
  if mode == "sample" and smp.num_samples == 0:
    _fail("sampling.num_samples", smp.num_samples,
          "an int > 0 for --mode=sample")
  _check_eval(config)
  _check_net_takes_data(config)


def _check_eval(config: ml_collections.ConfigDict) -> None:
  if "eval" in config:
    unknown = sorted(set(config.eval) - set(EVAL_DEFAULTS))
    if unknown:
      _fail(f"eval.{unknown[0]}", config.eval[unknown[0]],
            f"one of the eval fields {', '.join(EVAL_DEFAULTS)}")
  opts = eval_options(config)
  if opts["estimator"] not in ESTIMATORS:
    _fail("eval.estimator", opts["estimator"], f"one of {', '.join(ESTIMATORS)}")
  for field in ("num_draws", "ode_num_draws", "ode_num_probes"):
    try:
      checks.check_int(field, opts[field], minimum=1)
    except (TypeError, ValueError):
      _fail(f"eval.{field}", opts[field], "an int > 0")
  try:
    checks.check_int("strata", opts["strata"], minimum=1)
  except (TypeError, ValueError):
    _fail("eval.strata", opts["strata"], "an int > 0")
  if opts["num_draws"] > 1 and opts["num_draws"] % opts["strata"]:
    _fail("eval.num_draws", opts["num_draws"],
          f"1 or a multiple of eval.strata={opts['strata']} (draws come in "
          "groups of eval.strata with stratified t; eval.strata=1 for "
          "independent draws)")
  for field in ("num_examples", "ode_num_examples"):
    try:
      checks.check_int(field, opts[field], minimum=0)
    except (TypeError, ValueError):
      _fail(f"eval.{field}", opts[field],
            "an int >= 0 (0: the whole split; N: N examples spread evenly "
            "over it)" if field == "num_examples" else
            "an int >= 0 (0: the examples of eval.num_examples; N: the ODE "
            "on N examples spread evenly over the split)")
  if opts["ode_num_examples"] and opts["num_examples"]:
    _fail("eval.ode_num_examples", opts["ode_num_examples"],
          f"0 while eval.num_examples={opts['num_examples']} (an ODE subset "
          "is spread over the whole split, whose ELBO the difference "
          "estimator needs: set eval.num_examples=0)")
  if opts["dequantization"] not in ("uniform", "truncated_normal"):
    _fail("eval.dequantization", opts["dequantization"],
          "'uniform' or 'truncated_normal'")
  if opts["ode_error_norm"] not in ("separate", "joint"):
    _fail("eval.ode_error_norm", opts["ode_error_norm"],
          "'separate' (z and the log-density integral each meet the "
          "tolerance) or 'joint' (one RMS over both, as scipy's solver in "
          "score_sde)")
  for field in ("ode_rtol", "ode_atol"):
    value = opts[field]
    if not (isinstance(value, (int, float)) and 0 < value < 1):
      _fail(f"eval.{field}", value, "a float in (0, 1), e.g. 1e-5")


def _check_net_takes_data(config: ml_collections.ConfigDict) -> None:
  """The net's own shape rules against the dataset's known example shape,
  so a net that cannot take the data fails here, not after loading it."""
  shape = DATASET_SHAPES.get(config.data.dataset)
  if shape is None:
    return
  try:
    # Any backend will do for the shape rules; naming one keeps jax's backend
    # uninitialised (a multi-process run must join jax.distributed first).
    net = nets.get(config.model.net, num_classes=0, backend="cpu",
                   **dict(config.model.net_kwargs))
  except TypeError:
    return      # kwargs of another net: the model build names them
  check = getattr(net, "_check", None)
  if check is None:
    return
  try:
    check(jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  except ValueError as error:
    raise ValueError(
        f"config.model.net={config.model.net!r} cannot take "
        f"{config.data.dataset!r} examples of shape {shape}: {error} Fix "
        "config.model.net_kwargs.") from None


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


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{"group.field": value} of every leaf, values as JSON reads them back
  (tuples become lists), so a config and its config.json compare equal."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort(sort_keys=True))
  out = {}

  def walk(prefix, value):
    if isinstance(value, dict) and value:
      for key, item in value.items():
        walk(f"{prefix}{key}.", item)
    else:
      out[prefix[:-1]] = value
  walk("", config)
  return out


def run_fingerprint(config: ml_collections.ConfigDict) -> str:
  """16 hex digits of SHA-256 over what defines the trained function: the
  data (dataset, levels, flips) and the model (net, loss, weighting,
  schedules, parameterization), `FINGERPRINT_GROUPS`. Checkpoints, eval
  files and sample files record it."""
  fields = {k: v for k, v in flatten(config).items()
            if k.split(".")[0] in FINGERPRINT_GROUPS and
            k not in _NOT_FINGERPRINTED}
  text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def changeable(field: str) -> bool:
  """Whether an existing run may change `field` ("group.name")."""
  return any(field == c or (c.endswith(".") and field.startswith(c))
             for c in CHANGEABLE_FIELDS)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config a run wrote into WORKDIR/config.json, or None if there is
  none (a new run). Lists come back as tuples, as the config files write
  them.

  Raises:
    ValueError: the file exists but is not a config (damaged).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as error:
    raise ValueError(
        f"the run's config {path} is unreadable ({error}); restore it, or "
        "use a new --workdir to start another run.") from None
  return ml_collections.ConfigDict(_tuples(stored))


def check_changes(stored: ml_collections.ConfigDict,
                  config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config that changes what the run in `workdir` is.

  Args:
    stored: the run's config (`load_run_config`).
    config: the config asked for (file and overrides).
    workdir: named in the message.
  Raises:
    ValueError: one line naming each differing field that is not in
      `CHANGEABLE_FIELDS`, its run value and its new value.
  """
  old, new = flatten(stored), flatten(config)
  missing = object()
  bad = []
  for field in sorted(set(old) | set(new)):
    before, after = old.get(field, missing), new.get(field, missing)
    if before == after or changeable(field):
      continue
    show = lambda v: "(absent)" if v is missing else repr(v)
    bad.append(f"{field} {show(before)} -> {show(after)}")
  if bad:
    allowed = ", ".join(c + "*" if c.endswith(".") else c
                        for c in CHANGEABLE_FIELDS)
    raise ValueError(
        f"{workdir} holds a different run; its config differs in what "
        f"defines it: {'; '.join(bad)}. An existing run may change only "
        f"{allowed}. Drop those overrides (eval, sample and resume read the run's own "
        "config.json; --config is optional), or use a new --workdir.")


def write_once(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes WORKDIR/config.json if it does not exist (a new run); an
  existing one, the run's identity, is never replaced. Atomic: written to a
  temporary file, flushed to disk, then renamed."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    return path
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)
  return path


def did_you_mean(config: ml_collections.ConfigDict, field: str
                 ) -> str | None:
  """For an override key `field` ("a.b.c") that the config lacks: the
  closest existing key, or None if `field` exists or nothing is close."""
  keys = flatten(config)
  prefixes = {k.rsplit(".", i)[0] for k in keys
              for i in range(k.count(".") + 1)}
  if field in keys or field in prefixes:
    return None
  close = difflib.get_close_matches(field, sorted(set(keys) | prefixes), n=1,
                                    cutoff=0.6)
  return close[0] if close else None


def _settings_hash(settings: dict) -> str:
  text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def eval_output(config: ml_collections.ConfigDict, split: str, step: int,
                params: str = "ema") -> tuple[str, dict]:
  """The name of an eval file and what it records, from what produced it.

  The name reads `<split>_<step>_<params>_elbo_seed<eval_seed>_<hash>`; the
  hash covers every setting that changes the number (the run's
  fingerprint, the eval batch size), so two evals differ in name unless
  they would compute the same bpd, and a rerun replaces only its own file.

  Returns:
    (file stem, the settings to record in the file).
  """
  if params not in ("ema", "raw"):
    raise ValueError(f"params={params!r}: expected 'ema' or 'raw'.")
  cfg = config.training
  opts = eval_options(config)
  record = {"fingerprint": run_fingerprint(config), "split": split,
            "step": int(step), "params": params,
            "estimator": opts["estimator"],
            "eval_seed": int(cfg.eval_seed),
            "eval_batch_size": int(cfg.eval_batch_size)}
  if opts != EVAL_DEFAULTS:    # today's names for today's default eval
    record["eval"] = opts
  subset = f"_subset{opts['num_examples']}" if opts["num_examples"] else ""
  name = (f"{split}{subset}_{int(step)}_{params}_{opts['estimator']}_seed"
          f"{cfg.eval_seed}_{_settings_hash(record)}")
  return name, record


def sample_output(config: ml_collections.ConfigDict, step: int,
                  params: str = "ema") -> str:
  """The stem of sample files, from what produced them:
  `<step>_<params>_<sampler><num_steps>_seed<seed>_<hash>`, the hash over
  the run's fingerprint and every sampling option (guidance, decoding,
  counts), so samples of other settings never replace these."""
  if params not in ("ema", "raw"):
    raise ValueError(f"params={params!r}: expected 'ema' or 'raw'.")
  smp = config.sampling
  settings = {"fingerprint": run_fingerprint(config), "step": int(step),
              "params": params,
              "sampling": {k: v for k, v in flatten(config).items()
                           if k.startswith("sampling.")}}
  return (f"{int(step)}_{params}_{smp.sampler}{smp.num_steps}_seed{smp.seed}"
          f"_{_settings_hash(settings)}")
