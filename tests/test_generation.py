"""vdm.generation: the sampler of a model and the sample files of a run."""

import dataclasses
import os
import types

import jax
import matplotlib.image
import numpy as np
import PIL.Image
import pytest

from vdm import generation
from vdm import model as model_lib
from vdm import reporting
from vdm import sampling
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
  # 4 samples, 2 x 2 cells of 8 + 1 px, enlarged 16x (>= 256 px), gray.
  with PIL.Image.open(path) as png:
    assert png.mode == "L"
    grid = np.asarray(png)
  assert grid.shape == (16 * (2 * 9 - 1), 16 * (2 * 9 - 1))
  small = reporting.image_grid(reporting.to_uint8(expected, VOCAB))
  np.testing.assert_array_equal(grid[::16, ::16], small[..., 0])
  np.testing.assert_array_equal(grid[15::16, 15::16], small[..., 0])
  with PIL.Image.open(out / "7_progressive.png") as png:
    assert png.mode == "L"
    progressive = np.asarray(png)
  # rows x frames, enlarged 16x, under a 14 px strip of t labels.
  assert progressive.shape == (14 + 16 * (4 * 9 - 1), 16 * (2 * 9 - 1))
  assert (progressive[:14] < 128).any()                 # the labels
  generation.write_samples(model, params, str(tmp_path), 8,
                           options(num_frames=0))
  assert not os.path.exists(out / "8_progressive.png")


def test_write_samples_gives_the_grids_to_the_writer(image_model, tmp_path):
  model, params = image_model
  written = []
  writer = types.SimpleNamespace(
      write_image=lambda step, tag, image: written.append((step, tag, image)))
  path = generation.write_samples(model, params, str(tmp_path), 3, options(),
                                  writer=writer)
  assert [(step, tag) for step, tag, _ in written] == [
      (3, "samples"), (3, "samples_progressive")]
  with PIL.Image.open(path) as png:
    np.testing.assert_array_equal(written[0][2][..., 0], np.asarray(png))


@pytest.mark.parametrize("num_steps,num_frames", [(3, 2), (10, 4), (7, 8),
                                                  (5, 1)])
def test_frame_times_are_the_times_progressive_records(num_steps, num_frames):
  slots = sampling._frame_slots(num_steps, num_frames)  # pylint: disable=protected-access
  steps_taken = np.flatnonzero(slots >= 0)   # frame k after steps_taken[k]
  np.testing.assert_allclose(generation.frame_times(num_steps, num_frames),
                             1.0 - steps_taken / num_steps)


def test_write_samples_of_2d_data_is_a_scatter_plot(tmp_path):
  config = tiny_config.get_config()
  model = model_lib.build(config.model, (2,), 256, 0)
  params = model.init(jax.random.key(0))
  path = generation.write_samples(model, params, str(tmp_path), 1,
                                  options(num_samples=16, clip_x=False))
  assert np.load(tmp_path / "samples" / "1.npz")["samples"].shape == (16, 2)
  assert matplotlib.image.imread(path).ndim == 3
  assert not os.path.exists(tmp_path / "samples" / "1_progressive.png")


def test_chunked_samples_equal_one_call_and_resume(image_model, tmp_path,
                                                   monkeypatch):
  # 5 samples in chunks of 2: three calls of one compiled function, whose
  # concatenation equals one call over all 5 (sample j's keys depend on j
  # only); a rerun writes only the missing chunks.
  model, params = image_model
  opts = options(num_samples=5, chunk_size=2, num_frames=0)
  compiled = []
  make = generation.make_sampler
  monkeypatch.setattr(generation, "make_sampler",
                      lambda *a, **k: compiled.append(make(*a, **k))
                      or compiled[-1])
  calls = []
  out = generation.sample_to_dir(model, params, str(tmp_path), "fid",
                                 opts, progress=lambda *a: calls.append(a))
  assert out == str(tmp_path / "samples" / "fid")
  assert calls == [(1, 3), (2, 3), (3, 3)]
  assert len(compiled) == 1 and compiled[0]._cache_size() == 1
  samples, labels = generation.load_samples(out)
  whole, _ = make(model, sampler="ancestral", num_steps=opts.num_steps,
                  num_samples=5)(params, jax.random.key(opts.seed), None)
  np.testing.assert_array_equal(samples, whole)
  assert samples.shape == (5, *SHAPE) and labels.shape == (0,)
  # Resume: chunk 1 lost, chunk 0 marked; only chunk 1 is sampled again.
  os.remove(out + "/chunk_1.npz")
  with np.load(out + "/chunk_0.npz") as chunk:
    marked = dict(chunk)
  marked["samples"] = np.zeros_like(marked["samples"])
  np.savez_compressed(out + "/chunk_0.npz", **marked)
  calls.clear()
  generation.sample_to_dir(model, params, str(tmp_path), "fid", opts,
                           progress=lambda *a: calls.append(a))
  assert calls == [(3, 3)]
  again, _ = generation.load_samples(out)
  np.testing.assert_array_equal(again[:2], 0)        # not rewritten
  np.testing.assert_array_equal(again[2:], whole[2:])
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_chunked_sampling_errors(image_model, tmp_path):
  model, params = image_model
  opts = options(num_samples=3, chunk_size=2, num_frames=0)
  generation.sample_to_dir(model, params, str(tmp_path), "a", opts)
  with pytest.raises(ValueError, match="resume with the same sampling"):
    generation.sample_to_dir(model, params, str(tmp_path), "a",
                             options(num_samples=3, chunk_size=2, seed=9))
  with pytest.raises(ValueError, match="chunk_size=0"):
    generation.sample_to_dir(model, params, str(tmp_path), "b",
                             options(chunk_size=0))
  with pytest.raises(ValueError, match="one directory name"):
    generation.sample_to_dir(model, params, str(tmp_path), "x/y", opts)
  os.remove(tmp_path / "samples" / "a" / "chunk_1.npz")
  with pytest.raises(FileNotFoundError, match="chunk_1.npz is missing"):
    generation.load_samples(str(tmp_path / "samples" / "a"))
