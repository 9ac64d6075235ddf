"""Every shipped config validates and builds its model (no allocation);
validation rejects every bad model option before the dataset is opened."""

import glob
import importlib
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from vdm import config_files
from vdm import config_lib
from vdm import datasets_tfds
from vdm import input_pipeline
from vdm import model as model_lib
from vdm import model_options
from vdm import nets
from vdm import sampling
from vdm import training_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(REPO, "configs", "*.py")) if not p.endswith("__init__.py"))
# Dataset facts (shape, levels, classes) without loading the data.
DATA = {"mnist5k": ((28, 28, 1), 256, 10), "digits": ((8, 8, 1), 17, 10),
        "toy2d": ((2,), 256, 8), "fashion_mnist": ((28, 28, 1), 256, 10),
        "cifar10": ((32, 32, 3), 256, 10), "imagenet32": ((32, 32, 3), 256, 0),
        "imagenet64": ((64, 64, 3), 256, 0)}


def test_every_config_is_listed():
  assert {"mnist5k", "digits", "toy2d", "cifar10", "cifar10_small",
          "imagenet32", "imagenet64", "fashion_mnist"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_builds(name):
  config = config_files.get_config(
      os.path.join(REPO, "configs", f"{name}.py"))
  config_lib.validate(config)
  shape, vocab, classes = DATA[config.data.dataset]
  assert config.data.vocab_size == vocab
  model = model_lib.build(config.model, shape, vocab, classes)
  params = jax.eval_shape(model.init, jax.random.key(0))
  num_params = sum(p.size for p in jax.tree.leaves(params))
  assert num_params > 0
  if name == "cifar10":   # the paper's model: official 30,578,181 with gamma
    assert abs(num_params - 30_578_181) / 30_578_181 < 0.01


# ==========================================================================
# Validation rejects every option combination the model rejects, first.
# ==========================================================================

def tiny_config(overrides):
  config = importlib.import_module("tests.tiny_config").get_config()
  for field, value in overrides.items():
    group, name = field.split(".")
    config[group][name] = value
  return config


# (config overrides, error type, message regex); each is a `Model` rejection.
FIXED = {"model.schedule": "fixed_linear"}
BAD_MODEL_OPTIONS = [
    ({"model.schedule": "cubic"}, ValueError, "unknown schedule"),
    ({"model.noise_schedule": "karras"}, ValueError, "unknown noise_schedule"),
    ({"model.weighting": "l1"}, ValueError, "unknown weighting"),
    ({"model.parameterization": "score"}, ValueError,
     "unknown parameterization"),
    ({"model.gamma_min": 6.0}, ValueError, "model.gamma_min"),
    ({"model.num_steps": -1}, ValueError, "num_steps"),
    ({"data.vocab_size": 1}, ValueError, "vocab_size"),
    ({**FIXED, "model.weighting": "sigmoid", "model.num_steps": 10},
     ValueError, "continuous time"),
    ({**FIXED, "model.noise_schedule": "cosine", "model.num_steps": 10},
     ValueError, "continuous time"),
    ({"model.schedule": "learned_linear", "model.weighting": "sigmoid"},
     ValueError, "trained by the ELBO"),
    ({"model.schedule": "learned_net", "model.noise_schedule": "adaptive"},
     ValueError, "trained by the ELBO"),
    ({**FIXED, "model.variance_minimization": True}, ValueError,
     "learned schedule"),
    ({"model.variance_minimization": True, "model.num_steps": 10},
     ValueError, "continuous-time loss"),
    ({"model.p_uncond": 0.1}, ValueError, "class-conditional"),
    ({"model.p_uncond": 1.0, "model.conditional": True}, ValueError,
     r"p_uncond must be in \[0, 1\)"),
    ({**FIXED, "model.weighting": "sigmoid",
      "model.weighting_kwargs": ml_collections.ConfigDict({"scale": 2.0})},
     ValueError, r"model.weighting='sigmoid'.*unknown option"),
    ({**FIXED, "model.noise_schedule": "edm",
      "model.noise_schedule_kwargs": ml_collections.ConfigDict({"std": -1.0})},
     ValueError, r"model.noise_schedule='edm'.*std"),
    ({**FIXED, "model.noise_schedule": "cosine",
      "model.noise_schedule_kwargs": ml_collections.ConfigDict({"lam": 1.0})},
     TypeError, r"model.noise_schedule='cosine'.*no option"),
    ({**FIXED, "model.noise_schedule": "adaptive",
      "model.noise_schedule_kwargs": ml_collections.ConfigDict(
          {"num_bins": 0})}, ValueError, "num_bins"),
]


@pytest.mark.parametrize("overrides, error, match", BAD_MODEL_OPTIONS)
def test_validate_rejects_what_the_model_rejects(overrides, error, match):
  config = tiny_config(overrides)
  with pytest.raises(error, match=match):
    config_lib.validate(config)
  # The same rule, from the same function, when the model is built.
  shape, _, classes = DATA[config.data.dataset]
  with pytest.raises(error, match=match):
    model_lib.build(config.model, shape, config.data.vocab_size, classes)


def test_bad_model_options_fail_before_the_dataset_is_opened(monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError("the dataset was opened before validation")

  monkeypatch.setattr(input_pipeline, "create", no_data)
  with pytest.raises(ValueError, match="trained by the ELBO"):
    training_loop.Trainer(tiny_config({"model.weighting": "sigmoid"}))


# ==========================================================================
# Validation reads the registries of the modules that resolve the names.
# ==========================================================================

REGISTRY_NAMES = (
    [("data.dataset", name) for name in input_pipeline.DATASETS]
    + [("model.net", name) for name in nets.NAMES]
    + [("model.schedule", name) for name in model_options.MODEL_SCHEDULES]
    + [("model.noise_schedule", name)
       for name in model_options.NOISE_SCHEDULES]
    + [("sampling.sampler", name) for name in sampling.SAMPLERS]
    + [("sampling.decode", name) for name in sampling.DECODE_MODES])


@pytest.mark.parametrize("field, name", REGISTRY_NAMES)
def test_every_registered_name_validates(field, name):
  overrides = {field: name}
  if field == "model.noise_schedule":   # only a fixed schedule trains with it
    overrides.update(FIXED)
  config_lib.validate(tiny_config(overrides))


@pytest.mark.parametrize("dtype", nets.COMPUTE_DTYPES)
def test_every_compute_dtype_validates(dtype):
  config = tiny_config({})
  config.model.net_kwargs.dtype = dtype
  config_lib.validate(config)


def test_dataset_registry_is_what_create_opens():
  assert set(input_pipeline.DATASETS) == (
      set(input_pipeline._IN_MEMORY) | set(datasets_tfds.TFDS_DATASETS))


# ==========================================================================
# Option combinations that used to fail minutes later fail in validate.
# ==========================================================================

VALIDATION_GAPS = [
    ({"optimizer.learning_rate": float("inf")}, "train",
     "learning_rate=inf is invalid: expected a finite float"),
    ({"optimizer.learning_rate": float("nan")}, "train",
     "learning_rate=nan is invalid"),
    ({"sampling.num_frames": 6}, "train",   # tiny: 4 sampler steps
     r"num_frames=6 is invalid: expected at most sampling.num_steps \+ 1 = 5"),
    ({"sampling.num_samples": 0}, "sample",
     "num_samples=0 is invalid: expected an int > 0 for --mode=sample"),
    ({"sampling.guidance_scale": 2.0}, "train",
     "guidance_scale=2.0 is invalid: expected 0 for an unconditional model"),
]


@pytest.mark.parametrize("overrides, mode, match", VALIDATION_GAPS)
def test_validate_closes_the_gaps(overrides, mode, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(tiny_config(overrides), mode=mode)


def test_num_samples_zero_is_fine_for_training():
  config_lib.validate(tiny_config({"sampling.num_samples": 0}), mode="train")


def test_a_net_that_cannot_take_the_data_fails_in_validate():
  config = config_files.get_config(os.path.join(REPO, "configs",
                                                "mnist5k.py"))
  config.model.net_kwargs.channel_mult = (1, 2, 2, 2)   # 28 % 8 != 0
  with pytest.raises(ValueError, match=r"cannot take 'mnist5k' examples of "
                     r"shape \(28, 28, 1\).*divisible by 8; got 28x28"):
    config_lib.validate(config)


@pytest.mark.parametrize("name", ["digits", "mnist5k", "toy2d"])
def test_known_dataset_shapes_are_the_opened_ones(name):
  assert config_lib.DATASET_SHAPES[name] == input_pipeline.create(name).shape
  assert config_lib.DATASET_SHAPES[name] == DATA[name][0]


# ==========================================================================
# Run identity: fingerprint, allowed changes, the stored config.
# ==========================================================================

def test_fingerprint_covers_data_and_model_only():
  base = config_lib.run_fingerprint(tiny_config({}))
  assert len(base) == 16
  assert config_lib.run_fingerprint(tiny_config({})) == base
  for overrides in ({"model.parameterization": "v"}, {"data.flip": True},
                    {"data.dataset": "mnist5k"}, {"model.gamma_min": -12.0}):
    assert config_lib.run_fingerprint(tiny_config(overrides)) != base
  for overrides in ({"training.num_steps": 99}, {"sampling.seed": 3},
                    {"optimizer.learning_rate": 1e-4},
                    {"data.data_dir": "/elsewhere"}):
    assert config_lib.run_fingerprint(tiny_config(overrides)) == base


ALLOWED_CHANGES = [{"training.num_steps": 60}, {"training.eval_seed": 7},
                   {"sampling.sampler": "ddim"}, {"sampling.num_samples": 0},
                   {"optimizer.learning_rate": 1e-5},
                   {"training.checkpoint_every": 1}]
REFUSED_CHANGES = [
    ({"model.parameterization": "v"}, "model.parameterization 'eps' -> 'v'"),
    ({"data.flip": True}, "data.flip False -> True"),
    ({"training.batch_size": 16}, "training.batch_size 8 -> 16"),
    ({"optimizer.grad_clip": 0.0, "model.schedule": "fixed_linear"},
     "model.schedule 'learned_linear' -> 'fixed_linear'; "
     "optimizer.grad_clip 1.0 -> 0.0"),
]


@pytest.mark.parametrize("overrides", ALLOWED_CHANGES)
def test_allowed_changes_pass(overrides):
  config_lib.check_changes(tiny_config({}), tiny_config(overrides), "W")


@pytest.mark.parametrize("overrides, named", REFUSED_CHANGES)
def test_refused_changes_name_each_field_old_and_new(overrides, named):
  with pytest.raises(ValueError) as error:
    config_lib.check_changes(tiny_config({}), tiny_config(overrides), "W")
  message = str(error.value)
  assert "\n" not in message
  assert ("W holds a different run; its config differs in what defines "
          f"it: {named}.") in message


def test_stored_config_round_trips_and_is_written_once(tmp_path):
  config = tiny_config({})
  path = config_lib.write_once(config, str(tmp_path))
  assert config_lib.load_run_config(str(tmp_path)).to_dict() == \
      config.to_dict()   # tuples stay tuples
  before = open(path).read()
  config_lib.write_once(tiny_config({"model.parameterization": "v"}),
                        str(tmp_path))
  assert open(path).read() == before
  assert config_lib.load_run_config(str(tmp_path / "none")) is None
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="config.json is unreadable"):
    config_lib.load_run_config(str(tmp_path))


@pytest.mark.parametrize("field, guess", [
    ("trainin.batch_size", "training.batch_size"),
    ("training.bach_size", "training.batch_size"),
    ("training", None), ("training.batch_size", None)])
def test_did_you_mean(field, guess):
  assert config_lib.did_you_mean(tiny_config({}), field) == guess


def test_outputs_are_named_by_what_produced_them():
  config = tiny_config({})
  name, record = config_lib.eval_output(config, "test", 6)
  assert name.startswith("test_6_ema_elbo_seed1_")
  assert record["fingerprint"] == config_lib.run_fingerprint(config)
  assert config_lib.eval_output(config, "test", 6) == (name, record)
  assert config_lib.eval_output(config, "test", 6, "raw")[0] != name
  other = tiny_config({"training.eval_batch_size": 50})
  assert config_lib.eval_output(other, "test", 6)[0] != name
  stem = config_lib.sample_output(config, 6)
  assert stem.startswith("6_ema_ancestral4_seed0_")
  for overrides in ({"sampling.seed": 1}, {"sampling.clip_x": False},
                    {"model.parameterization": "v"}):
    assert config_lib.sample_output(tiny_config(overrides), 6) != stem


def test_validate_leaves_the_jax_backend_uninitialised():
  # A multi-process run validates its config before joining jax.distributed,
  # which refuses to start once a backend exists.
  code = ("import sys; sys.path.insert(0, 'tests'); import tiny_config; "
          "from jax._src import xla_bridge; from vdm import config_lib, "
          "config_files; config_lib.validate(tiny_config.get_config()); "
          "config_lib.validate(config_files.get_config('configs/cifar10.py')); "
          "print(bool(xla_bridge._backends))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == "False", out.stderr[-2000:]
