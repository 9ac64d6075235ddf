r"""Import checkpoints of the official VDM code (google-research/vdm).

  vdm import-official OFFICIAL_WORKDIR --workdir=runs/c10_official \
      [--official_config=PATH] [--base_config=configs/cifar10.py]
  vdm eval --workdir=runs/c10_official
  vdm sample --workdir=runs/c10_official

The official code (`experiment.py`, at google-research/vdm@dc27b98) saves
its train state with clu's `checkpoint.MultihostCheckpoint(WORKDIR/
checkpoints)`: WORKDIR/checkpoints-<host>/ckpt-<n>.flax is the msgpack of
`flax.serialization.to_bytes(TrainState)` ({step, params, ema_params,
opt_state}; params = {score_model, gamma}), beside TensorFlow's index files
and a `checkpoint` file naming the newest. `read_checkpoint` reads the
msgpack alone (no TensorFlow).

The import writes a run of this library: WORKDIR/config.json (the official
config translated onto a base config of ours, `translate_config`) and one
checkpoint (`checkpointing.Manager`, step = the official step, the run's
fingerprint in its metadata) of the train state `train.make_init` builds,
with the official `params` and `ema_params` mapped by `map_params`. The
optimizer's moments are not imported (a resumed training starts them at
zero); eval and sampling need none.

What maps exactly (tests/test_official.py: the ELBO terms of an imported
checkpoint written by the official code equal the official ones):
* the score network `ScoreUNet` -> our `vdm_unet` (same operations; the
  official first embedding layer also reads a `conditioning` scalar, 0 in
  the official eval and sampling, so its weight row is dropped);
* `learnable_scalar` gamma = b + |w| t -> `learned_linear` (gamma_0 = b,
  gamma_1 - gamma_0 = softplus(span_raw) = |w|);
* `learnable_nnet` -> `learned_net`: the official l1(t) + l3(2 sigmoid(l2(2t
  - 1)) - 1) / n is an affine function of our shape net's g(t) with l1 = t,
  so with our endpoints set to the official gamma(0), gamma(1) the two are
  equal (up to float32 rounding);
* `fixed` -> `fixed_linear` on [gamma_min, gamma_max].
Not representable: a model trained with `conditioning` != 0 (the official
cifar10_aug input pipeline passes its augmentation flag there) is imported
for conditioning 0, which is what the official eval and sampler use.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm import checkpointing
from vdm import config_files
from vdm import config_lib
from vdm import model as model_lib
from vdm import parallel
from vdm import train

# The official configs/cifar10.py model and training fields (the defaults
# when no official config is given).
OFFICIAL_DEFAULTS = {
    "data": {"dataset": "cifar10"},
    "model": {"vocab_size": 256, "sample_softmax": False,
              "antithetic_time_sampling": True,
              "with_fourier_features": True, "with_attention": False,
              "gamma_type": "learnable_scalar", "gamma_min": -13.3,
              "gamma_max": 5.0, "sm_n_timesteps": 0, "sm_n_embd": 128,
              "sm_n_layer": 32, "sm_pdrop": 0.1},
    "training": {"seed": 1, "num_steps_lr_warmup": 100,
                 "num_steps_train": 10_000_000, "batch_size_train": 128,
                 "batch_size_eval": 128},
    "optimizer": {"args": {"b1": 0.9, "b2": 0.99, "eps": 1e-8,
                           "weight_decay": 0.01},
                  "learning_rate": 2e-4, "lr_decay": False,
                  "ema_rate": 0.9999},
}
# Official dataset names -> ours. The _aug variants differ only in training.
DATASETS = {"cifar10": "cifar10", "cifar10_aug": "cifar10",
            "cifar10_aug_with_channel": "cifar10",
            "imagenet32": "imagenet32", "imagenet64": "imagenet64"}
SCHEDULES = {"learnable_scalar": "learned_linear",
             "learnable_nnet": "learned_net", "fixed": "fixed_linear"}
# The official GroupNorm: flax's default, 32 groups.
OFFICIAL_NUM_GROUPS = 32
# Our learned_net's width (learned_schedules.MonotoneNet's default, the
# official NoiseSchedule_NNet's n_features too).
NNET_FEATURES = 1024
DEFAULT_BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "cifar10.py")
_CKPT = re.compile(r"^ckpt-(\d+)\.flax$")


# ------------------------------------------------------------------ reading
def find_checkpoint(path: str) -> str:
  """The newest official `ckpt-<n>.flax` under `path`.

  Args:
    path: a `.flax` file, a `checkpoints-<host>` folder, or an official
      workdir holding `checkpoints-0`.
  Raises:
    FileNotFoundError: no official checkpoint there.
  """
  if os.path.isfile(path):
    return path
  folder = path
  if os.path.isdir(os.path.join(path, "checkpoints-0")):
    folder = os.path.join(path, "checkpoints-0")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{path}: no such file or folder; pass an "
                            "official workdir, its checkpoints-0 folder or a "
                            "ckpt-<n>.flax file.")
  # clu's (TensorFlow's) `checkpoint` file names the newest complete one.
  index = os.path.join(folder, "checkpoint")
  if os.path.isfile(index):
    with open(index) as f:
      found = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
    if found:
      candidate = os.path.join(folder,
                               os.path.basename(found.group(1)) + ".flax")
      if os.path.isfile(candidate):
        return candidate
  numbered = sorted((int(m.group(1)), name) for name in os.listdir(folder)
                    if (m := _CKPT.match(name)))
  if not numbered:
    raise FileNotFoundError(
        f"no official checkpoint (ckpt-<n>.flax) in {folder}; the official "
        "code writes them to WORKDIR/checkpoints-0.")
  return os.path.join(folder, numbered[-1][1])


def read_checkpoint(path: str) -> dict[str, Any]:
  """{'step', 'params', 'ema_params'} of an official checkpoint (numpy).

  Raises:
    FileNotFoundError: see `find_checkpoint`.
    ValueError: the file is not an official VDM train state.
  """
  path = find_checkpoint(path)
  with open(path, "rb") as f:
    try:
      state = flax.serialization.msgpack_restore(f.read())
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a flax msgpack checkpoint: "
                       f"{error}") from None
  if not isinstance(state, dict) or "ema_params" not in state:
    raise ValueError(f"{path} holds no official VDM TrainState (no "
                     "'ema_params'); found keys "
                     f"{sorted(state) if isinstance(state, dict) else state}.")
  ema = state["ema_params"]
  if "score_model" not in ema:
    raise ValueError(f"{path}: ema_params has no 'score_model'; found "
                     f"{sorted(ema)}.")
  return {"step": int(np.asarray(state.get("step", 0))),
          "params": state.get("params") or ema, "ema_params": ema,
          "path": path}


# ------------------------------------------------------------ the mapping
def _inverse_softplus(y):
  y = np.maximum(np.asarray(y, np.float64), 1e-30)
  return (y + np.log(-np.expm1(-y))).astype(np.float32)


def _groupnorm(src):
  return {"scale": src["scale"], "bias": src["bias"]}


def _block(src):
  out = {"norm_1": _groupnorm(src["GroupNorm_0"]),
         "norm_2": _groupnorm(src["GroupNorm_1"]),
         "conv_1": src["conv1"], "conv_2": src["conv2"],
         "cond": src["cond_proj"]}
  if "nin_shortcut" in src:
    out["shortcut"] = src["nin_shortcut"]
  return out


def _attention(src):
  cat = lambda leaf: np.concatenate([src[n][leaf] for n in "qkv"], -1)
  return {"norm": _groupnorm(src["GroupNorm_0"]),
          "proj_out": src["proj_out"],
          "qkv": {"kernel": cat("kernel"), "bias": cat("bias")}}


def architecture(score_model: Mapping[str, Any]) -> dict[str, Any]:
  """num_res_blocks, channels, attention, fourier_features of the official
  `ScoreUNet` parameters (read from their names and shapes)."""
  num_blocks = sum(1 for k in score_model if k.startswith("down.block_"))
  conv_in = np.shape(score_model["conv_in"]["kernel"])   # [3, 3, in, C]
  out_channels = np.shape(score_model["conv_out"]["kernel"])[-1]
  return {"num_res_blocks": num_blocks, "channels": int(conv_in[-1]),
          "attention": "down.attn_0" in score_model,
          "fourier_features": conv_in[-2] != out_channels}


def map_score_unet(score_model: Mapping[str, Any]) -> dict[str, Any]:
  """Official `ScoreUNet` params -> our `vdm_unet` params (same function
  for conditioning 0; tests/test_nets.py checks it at random parameters)."""
  p = score_model
  arch = architecture(p)
  mapped = {
      # The official first Dense also reads the conditioning scalar (0 in
      # the official eval and sampler): its last input row never counts.
      "embedding": {"dense_0": {"kernel": np.asarray(p["dense0"]["kernel"])
                                [:-1], "bias": p["dense0"]["bias"]},
                    "dense_1": p["dense1"]},
      "conv_in": p["conv_in"], "conv_out": p["conv_out"],
      "norm_out": _groupnorm(p["GroupNorm_0"]),
      "mid_block_1": _block(p["mid.block_1"]),
      "mid_attention": _attention(p["mid.attn_1"]),
      "mid_block_2": _block(p["mid.block_2"])}
  for i in range(arch["num_res_blocks"]):
    mapped[f"down_{i}"] = _block(p[f"down.block_{i}"])
    if arch["attention"]:
      mapped[f"down_attention_{i}"] = _attention(p[f"down.attn_{i}"])
  for i in range(arch["num_res_blocks"] + 1):
    mapped[f"up_{i}"] = _block(p[f"up.block_{i}"])
    if arch["attention"]:
      mapped[f"up_attention_{i}"] = _attention(p[f"up.attn_{i}"])
  return jax.tree.map(lambda x: np.asarray(x, np.float32), mapped)


def official_nnet_gamma(gamma: Mapping[str, Any], t) -> np.ndarray:
  """The official `NoiseSchedule_NNet` gamma(t) in float64 (numpy)."""
  t = np.asarray(t, np.float64).reshape(-1, 1)
  k = lambda name, leaf: np.asarray(gamma[name][leaf], np.float64)
  n = k("l2", "kernel").shape[1]
  h = t @ np.abs(k("l1", "kernel")) + k("l1", "bias")
  u = (2 * (t - 0.5)) @ np.abs(k("l2", "kernel")) + k("l2", "bias")
  u = 2 * (1 / (1 + np.exp(-u)) - 0.5)
  return (h + (u @ np.abs(k("l3", "kernel"))) / n)[:, 0]


def gamma_type(gamma: Mapping[str, Any] | None) -> str:
  """The official gamma_type of the schedule parameters `gamma`."""
  if not gamma:
    return "fixed"
  if set(gamma) == {"w", "b"}:
    return "learnable_scalar"
  if {"l1", "l2", "l3"} <= set(gamma):
    return "learnable_nnet"
  raise ValueError(f"unknown official schedule parameters {sorted(gamma)}; "
                   "known: w, b (learnable_scalar); l1, l2, l3 "
                   "(learnable_nnet); none (fixed).")


def map_schedule(gamma: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Official schedule params -> ours (None for 'fixed': no params)."""
  kind = gamma_type(gamma)
  if kind == "fixed":
    return None
  if kind == "learnable_scalar":
    w = float(np.abs(np.asarray(gamma["w"])).reshape(-1)[0])
    return {"gamma_0": np.float32(np.asarray(gamma["b"]).reshape(-1)[0]),
            "span_raw": _inverse_softplus(w)}
  k = lambda name, leaf: np.asarray(gamma[name][leaf], np.float64)
  n = k("l2", "kernel").shape[1]
  if n != NNET_FEATURES:
    raise ValueError(f"the official learnable_nnet has {n} features; ours "
                     f"(learned_net) has {NNET_FEATURES}.")
  slope = abs(float(k("l1", "kernel").reshape(-1)[0]))
  if slope == 0:
    raise ValueError("the official learnable_nnet has l1 weight 0: not a "
                     "strictly increasing schedule; cannot map it.")
  w2, b2 = np.abs(k("l2", "kernel")), k("l2", "bias")
  # official gamma = const + slope * (t + sum_j a_j sigmoid(c_j t + d_j)),
  # ours g(t) = h + sum_j softplus(K3_j) sigmoid(softplus(K2_j) h + B2_j)
  # with h = t (l1 = identity): match c, d, a.
  a = 2 * np.abs(k("l3", "kernel")) / (n * slope)
  ends = official_nnet_gamma(gamma, [0.0, 1.0])
  return {"gamma_0": np.float32(ends[0]),
          "span_raw": _inverse_softplus(ends[1] - ends[0]),
          "shape": {"l1": {"kernel": _inverse_softplus(np.ones((1, 1))),
                           "bias": np.zeros((1,), np.float32)},
                    "l2": {"kernel": _inverse_softplus(2 * w2),
                           "bias": (b2 - w2[0]).astype(np.float32)},
                    "l3": {"kernel": _inverse_softplus(a)}}}


def map_params(official_params: Mapping[str, Any]) -> dict[str, Any]:
  """Official `VDM` params {score_model, gamma} -> ours {net, schedule}."""
  params = {"net": map_score_unet(official_params["score_model"])}
  schedule = map_schedule(official_params.get("gamma"))
  if schedule is not None:
    params["schedule"] = schedule
  return params


# ------------------------------------------------------------------ config
def _merged(defaults: dict, given: Mapping[str, Any] | None) -> dict:
  out = {}
  for key, value in defaults.items():
    got = (given or {}).get(key, value)
    out[key] = _merged(value, got) if isinstance(value, dict) else got
  return out


def load_official_config(path: str | None) -> dict[str, Any]:
  """The official config (a configs/*.py with get_config, or its JSON) as
  a dict, missing fields taken from the official configs/cifar10.py."""
  if path is None:
    return _merged(OFFICIAL_DEFAULTS, None)
  if path.endswith(".json"):
    with open(path) as f:
      given = ml_collections.ConfigDict(json.load(f))
  else:
    given = config_files.get_config(path)
  return _merged(OFFICIAL_DEFAULTS, given.to_dict())


def translate_config(official: Mapping[str, Any], arch: Mapping[str, Any],
                     base: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """Our config for an official model: `base` (configs/cifar10.py) with the
  official data, model, schedule, training and optimizer fields.

  Args:
    official: `load_official_config`'s dict.
    arch: `architecture` of the checkpoint's score model (it wins over the
      config's sm_n_layer / sm_n_embd, which it is checked against).
    base: our base config (unlocked copy is made).
  Raises:
    ValueError: the checkpoint does not match the official config, or the
      official config has something ours cannot express.
  """
  m, tr, opt = official["model"], official["training"], official["optimizer"]
  if (m["sm_n_layer"], m["sm_n_embd"]) != (arch["num_res_blocks"],
                                           arch["channels"]):
    raise ValueError(
        f"the checkpoint's network has {arch['num_res_blocks']} blocks of "
        f"{arch['channels']} channels but the official config says "
        f"sm_n_layer={m['sm_n_layer']}, sm_n_embd={m['sm_n_embd']}: pass the "
        "config it was trained with (--official_config).")
  if official["data"]["dataset"] not in DATASETS:
    raise ValueError(f"official dataset {official['data']['dataset']!r} has "
                     f"no counterpart here; known: {', '.join(DATASETS)}.")
  config = ml_collections.ConfigDict(base.to_dict())
  config.data.dataset = DATASETS[official["data"]["dataset"]]
  config.data.vocab_size = int(m["vocab_size"])
  config.data.flip = False
  config.model.net = "vdm_unet"
  config.model.net_kwargs = ml_collections.ConfigDict(dict(
      num_res_blocks=arch["num_res_blocks"], channels=arch["channels"],
      dropout=float(m["sm_pdrop"]), attention=arch["attention"],
      num_groups=OFFICIAL_NUM_GROUPS,
      fourier_features=arch["fourier_features"],
      fused_norm=base.model.net_kwargs.get("fused_norm", "auto"),
      dtype="float32"))
  config.model.conditional = False
  config.model.p_uncond = 0.0
  config.model.schedule = SCHEDULES[m["gamma_type"]]
  config.model.gamma_min = float(m["gamma_min"])
  config.model.gamma_max = float(m["gamma_max"])
  config.model.num_steps = int(m["sm_n_timesteps"])
  config.model.antithetic = bool(m["antithetic_time_sampling"])
  config.model.parameterization = "eps"
  config.model.weighting = "elbo"
  config.model.noise_schedule = "model"
  config.model.variance_minimization = False
  config.training.seed = int(tr["seed"])
  config.training.batch_size = int(tr["batch_size_train"])
  config.training.eval_batch_size = int(tr["batch_size_eval"])
  config.training.num_steps = int(tr["num_steps_train"])
  config.optimizer.learning_rate = float(opt["learning_rate"])
  config.optimizer.warmup_steps = int(tr["num_steps_lr_warmup"])
  # The official lr_decay is linear to 0; ours has none | cosine.
  config.optimizer.decay = "cosine" if opt["lr_decay"] else "none"
  config.optimizer.final_lr_frac = 0.0
  for field in ("b1", "b2", "eps", "weight_decay"):
    config.optimizer[field] = float(opt["args"][field])
  config.optimizer.grad_clip = float(opt.get("gradient_clip_norm", 0.0))
  config.optimizer.ema_decay = float(opt["ema_rate"])
  config.sampling.num_steps = int(m["sm_n_timesteps"]) or 1000
  config.sampling.decode = "sample" if m["sample_softmax"] else "argmax"
  return config


# ------------------------------------------------------------------ import
def build_state(config: ml_collections.ConfigDict
                ) -> tuple[model_lib.Model, train.TrainState, Any]:
  """The model, the abstract train state (`jax.ShapeDtypeStruct` leaves,
  nothing allocated or compiled) and the optimizer of an (unconditional)
  config, as `training_loop.Trainer` builds them, without opening the
  dataset: the example shape comes from `config_lib.DATASET_SHAPES`."""
  shape = config_lib.DATASET_SHAPES[config.data.dataset]
  model = model_lib.build(config.model, shape, config.data.vocab_size, 0)
  tx, _ = train.create_optimizer(config.optimizer, config.training.num_steps)
  mesh = parallel.make_mesh(config.training.num_devices or None)
  _, abstract, _ = train.make_init(model, tx, mesh=mesh,
                                   fsdp=config.training.fsdp)
  return model, abstract, tx


def import_checkpoint(checkpoint: str, workdir: str, *,
                      official_config: str | None = None,
                      base_config: str = DEFAULT_BASE_CONFIG
                      ) -> tuple[ml_collections.ConfigDict, int]:
  """Writes WORKDIR as a run of this library holding the official model.

  Args:
    checkpoint: see `find_checkpoint`.
    workdir: a new run directory (refused if it already holds a run).
    official_config: the official config file (.py or .json) it was trained
      with; None = the official configs/cifar10.py.
    base_config: our config the translation starts from.
  Returns:
    (the run's config, the step written).
  Raises:
    FileExistsError: `workdir` already holds a config or checkpoints.
    FileNotFoundError, ValueError: see `read_checkpoint`,
      `translate_config`.
  """
  if (os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)) or
      os.path.exists(os.path.join(workdir, "checkpoints"))):
    raise FileExistsError(f"{workdir} already holds a run; import into a new "
                          "--workdir.")
  state = read_checkpoint(checkpoint)
  official = load_official_config(official_config)
  arch = architecture(state["ema_params"]["score_model"])
  kind = gamma_type(state["ema_params"].get("gamma"))
  if official["model"]["gamma_type"] != kind:
    raise ValueError(f"the checkpoint's schedule is {kind!r} but the "
                     f"official config says "
                     f"{official['model']['gamma_type']!r}: pass the config "
                     "it was trained with (--official_config).")
  config = translate_config(official, arch,
                            config_files.get_config(base_config))
  config_lib.validate(config)
  _, abstract, tx = build_state(config)
  like = lambda tree, ref: jax.tree.map(
      lambda x, r: jnp.asarray(x, r.dtype).reshape(r.shape), tree, ref)
  try:
    params = like(map_params(state["params"]), abstract.params)
    ema = like(map_params(state["ema_params"]), abstract.ema_params)
  except ValueError as error:
    raise ValueError(f"the mapped parameters do not fit our vdm_unet: "
                     f"{error}") from None
  step = state["step"]
  # As train.create_train_state, with the official parameters; the Adam
  # moments start at zero.
  imported = train.TrainState.create(
      apply_fn=None, params=params, tx=tx, ema_params=ema,
      adaptive=abstract.adaptive).replace(
          step=jnp.asarray(step, abstract.step.dtype))
  os.makedirs(workdir, exist_ok=True)
  config_lib.write_once(config, workdir)
  with checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                             max_to_keep=config.training.max_to_keep) as ckpt:
    ckpt.save(step, imported, force=True, metadata={
        "data_step": step,
        "config_hash": config_lib.run_fingerprint(config),
        "imported_from": os.path.abspath(state["path"])})
  return config, step
