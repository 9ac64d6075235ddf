"""vdm.generation: the sampler of a model and the sample files of a run."""

import dataclasses
import os
import types

import jax
import matplotlib.image
import numpy as np
import pytest

from vdm import generation
from vdm import model as model_lib
import tiny_config

VOCAB = 17
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def image_model():
  config = tiny_config.get_config()
  model = model_lib.build(config.model, SHAPE, VOCAB, 10)
  return model, model.init(jax.random.key(0))


def options(**overrides) -> generation.SamplingOptions:
  fields = dict(sampler="ancestral", num_steps=3, num_samples=4,
                guidance_scale=0.0, decode="argmax", clip_x=True,
                num_frames=2, seed=5)
  fields.update(overrides)
  return generation.SamplingOptions(**fields)


def test_options_from_config_read_every_field():
  sampling = tiny_config.get_config().sampling
  opts = generation.SamplingOptions.from_config(sampling)
  assert dataclasses.asdict(opts) == {
      f.name: sampling[f.name] for f in dataclasses.fields(opts)}
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.seed = 1


def test_sample_labels_cycle_through_the_classes():
  assert generation.sample_labels(
      types.SimpleNamespace(num_classes=0), 5) is None
  labels = generation.sample_labels(types.SimpleNamespace(num_classes=3), 7)
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2, 0])


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sampler_gives_integer_data_and_is_a_function_of_the_key(
    image_model, sampler):
  model, params = image_model
  run = generation.make_sampler(model, sampler=sampler, num_steps=3,
                                num_samples=4, num_frames=2)
  x, frames = run(params, jax.random.key(1), None)
  again, _ = run(params, jax.random.key(1), None)
  other, _ = run(params, jax.random.key(2), None)
  assert x.shape == (4, *SHAPE) and frames.shape == (2, 4, *SHAPE)
  assert np.issubdtype(x.dtype, np.integer)
  assert 0 <= int(x.min()) and int(x.max()) < VOCAB
  np.testing.assert_array_equal(x, again)
  assert not np.array_equal(x, other)
  plain, none = generation.make_sampler(
      model, sampler=sampler, num_steps=3, num_samples=4)(
          params, jax.random.key(1), None)
  assert none is None and plain.shape == x.shape


def test_write_samples_writes_grid_npz_and_progressive(image_model,
                                                       tmp_path):
  model, params = image_model
  opts = options()
  path = generation.write_samples(model, params, str(tmp_path), 7, opts)
  out = tmp_path / "samples"
  assert path == str(out / "7.png")
  # The npz holds what the sampler draws from key(seed).
  expected, _ = generation.make_sampler(
      model, sampler=opts.sampler, num_steps=opts.num_steps,
      num_samples=opts.num_samples, num_frames=opts.num_frames)(
          params, jax.random.key(opts.seed), None)
  saved = np.load(out / "7.npz")
  np.testing.assert_array_equal(saved["samples"], expected)
  assert saved["labels"].size == 0                      # unconditional
  grid = matplotlib.image.imread(path)
  assert grid.shape[:2] == (2 * 9 - 1, 2 * 9 - 1)       # 4 samples, 2 x 2
  progressive = matplotlib.image.imread(out / "7_progressive.png")
  assert progressive.shape[:2] == (4 * 9 - 1, 2 * 9 - 1)   # rows x frames
  generation.write_samples(model, params, str(tmp_path), 8,
                           options(num_frames=0))
  assert not os.path.exists(out / "8_progressive.png")


def test_write_samples_of_2d_data_is_a_scatter_plot(tmp_path):
  config = tiny_config.get_config()
  model = model_lib.build(config.model, (2,), 256, 0)
  params = model.init(jax.random.key(0))
  path = generation.write_samples(model, params, str(tmp_path), 1,
                                  options(num_samples=16, clip_x=False))
  assert np.load(tmp_path / "samples" / "1.npz")["samples"].shape == (16, 2)
  assert matplotlib.image.imread(path).ndim == 3
  assert not os.path.exists(tmp_path / "samples" / "1_progressive.png")
