"""Every shipped config validates and builds its model (no allocation)."""

import glob
import importlib
import os

import jax
import pytest

from vdm import config_lib
from vdm import model as model_lib

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
