"""Every shipped config validates and builds its model (no allocation);
validation rejects every bad model option before the dataset is opened."""

import glob
import importlib
import os

import jax
import ml_collections
import pytest

from vdm import config_lib
from vdm import datasets_tfds
from vdm import input_pipeline
from vdm import model as model_lib
from vdm import model_options
from vdm import nets
from vdm import sampling
from vdm import train

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
  config = importlib.import_module(f"configs.{name}").get_config()
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
    train.Trainer(tiny_config({"model.weighting": "sigmoid"}))


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
