"""Tests of the tfds datasets on tiny copies written in tfds' real format.

Offline: the real tfds builders (`cifar10` 3.0.2, `downsampled_imagenet/
32x32` 2.0.0) prepare tiny datasets through `datasets_tfds.prepare` (the
code behind `vdm prepare`); only the download step
is replaced, by files in the upstream formats (CIFAR binary batches, tars of
PNGs) written here. The ArrayRecord files, dataset_info.json and version
folders on disk are then exactly what a real preparation writes, and the
tests read them with the production code (`input_pipeline.create`).
"""
import io
import os
import tarfile
from unittest import mock

import numpy as np
import pytest

from vdm import datasets_local
from vdm import datasets_tfds
from vdm import input_pipeline

tfds = pytest.importorskip("tensorflow_datasets")

_NUM_TRAIN_PER_FILE, _NUM_TEST = 9, 13     # cifar10: 5 x 9 train, 13 test
_NUM_IMAGENET = {"train": 12, "validation": 7}


def _write_cifar_binaries(root, rng):
  """CIFAR-10 binary version: per record 1 label byte + 3072 bytes CHW."""
  folder = root / "cifar-10-batches-bin"
  folder.mkdir(parents=True)
  written = {"train": [], "test": []}
  files = [(f"data_batch_{i}.bin", "train", _NUM_TRAIN_PER_FILE)
           for i in range(1, 6)] + [("test_batch.bin", "test", _NUM_TEST)]
  for filename, split, num in files:
    labels = rng.integers(0, 10, num).astype(np.uint8)
    images = rng.integers(0, 256, (num, 32, 32, 3)).astype(np.uint8)
    chw = images.transpose(0, 3, 1, 2).reshape(num, 3072)
    (folder / filename).write_bytes(
        np.concatenate([labels[:, None], chw], axis=1).tobytes())
    written[split] += list(zip(images, labels))
  (folder / "batches.meta.txt").write_text("\n".join(
      ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
       "horse", "ship", "truck"]))
  return written


def _write_png_tar(path, images):
  from PIL import Image    # pylint: disable=g-import-not-at-top
  with tarfile.open(path, "w") as tar:
    for i, image in enumerate(images):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      info = tarfile.TarInfo(f"{path.stem}/{i}.png")
      info.size = png.tell()
      png.seek(0)
      tar.addfile(info, png)


def _sorted_bytes(images):
  return sorted(np.asarray(image).tobytes() for image in images)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A data_dir with tiny cifar10 and downsampled_imagenet/32x32 copies."""
  tfds.disable_progress_bar()
  rng = np.random.default_rng(0)
  raw = tmp_path_factory.mktemp("raw")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cifar = _write_cifar_binaries(raw, rng)
  with mock.patch.object(tfds.download.DownloadManager,
                         "download_and_extract", return_value=str(raw)):
    datasets_tfds.prepare("cifar10", data_dir=data_dir)
  imagenet = {}
  for split, num in _NUM_IMAGENET.items():
    imagenet[split] = rng.integers(0, 256, (num, 32, 32, 3)).astype(np.uint8)
    prefix = "train" if split == "train" else "valid"
    _write_png_tar(raw / f"{prefix}_32x32.tar", imagenet[split])
  manual = os.path.join(data_dir, "downloads", "manual")
  os.makedirs(manual)
  for name in ("train_32x32.tar", "valid_32x32.tar"):
    os.symlink(raw / name, os.path.join(manual, name))
  tars = [str(raw / "train_32x32.tar"), str(raw / "valid_32x32.tar")]
  with mock.patch.object(tfds.download.DownloadManager, "download",
                         return_value=tars):
    datasets_tfds.prepare("imagenet32", data_dir=data_dir)
  return {"data_dir": data_dir, "raw": raw, "cifar10": cifar,
          "imagenet32": imagenet}


@pytest.fixture(scope="module")
def cifar(tfds_dir):
  return input_pipeline.create("cifar10", data_dir=tfds_dir["data_dir"])


def test_prepared_on_disk_as_tfds_writes_it(tfds_dir):
  folder = os.path.join(tfds_dir["data_dir"], "cifar10", "3.0.2")
  names = sorted(os.listdir(folder))
  assert "dataset_info.json" in names
  assert any(n.startswith("cifar10-train.array_record-") for n in names)
  assert any(n.startswith("cifar10-test.array_record-") for n in names)


def test_cifar10_attributes_and_content(tfds_dir, cifar, monkeypatch):
  monkeypatch.setattr(datasets_tfds, "_NUM_DECODE_THREADS", 4)
  assert (cifar.name, cifar.shape, cifar.vocab_size, cifar.num_classes,
          cifar.version) == ("cifar10", (32, 32, 3), 256, 10, "3.0.2")
  assert cifar.num_examples("train") == 5 * _NUM_TRAIN_PER_FILE
  assert cifar.num_examples("test") == _NUM_TEST
  batch = cifar.train_batch(0, batch_size=8)
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  # tfds stores examples in its own (shuffled) order: compare as multisets
  # of (image, label); equal bytes also prove the CHW -> HWC layout.
  for split, written in tfds_dir["cifar10"].items():
    every = cifar.read(split, np.arange(cifar.num_examples(split)))
    got = sorted((x.tobytes(), int(y))
                 for x, y in zip(every["image"], every["label"]))
    assert got == sorted((x.tobytes(), int(y)) for x, y in written)
    # Batched reads decode in 4 threads (uneven chunks of 45 train rows);
    # their order must match reading one example at a time.
    for i in (0, 1, 6, 12):
      one = cifar.read(split, [i])
      np.testing.assert_array_equal(one["image"][0], every["image"][i])
      assert one["label"][0] == every["label"][i]


def test_imagenet32_test_is_the_validation_split(tfds_dir):
  ds = input_pipeline.create("imagenet32", data_dir=tfds_dir["data_dir"])
  assert (ds.shape, ds.num_classes, ds.version) == ((32, 32, 3), 0, "2.0.0")
  assert ds.num_examples("train") == _NUM_IMAGENET["train"]
  assert ds.num_examples("test") == _NUM_IMAGENET["validation"]
  every = ds.read("test", np.arange(_NUM_IMAGENET["validation"]))
  assert _sorted_bytes(every["image"]) == _sorted_bytes(
      tfds_dir["imagenet32"]["validation"])                 # lossless PNG
  assert not every["label"].any()                            # no labels


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_split_once(cifar, process_count):
  # 13 test examples, global batch 4: 4 batches, the last has 1 real row.
  shards = [list(cifar.eval_batches("test", batch_size=4, process_index=p,
                                    process_count=process_count))
            for p in range(process_count)]
  assert [len(s) for s in shards] == [4] * process_count
  rows = {key: np.concatenate([shards[p][k][key] for k in range(4)
                               for p in range(process_count)])
          for key in ("image", "label", "mask")}
  np.testing.assert_array_equal(rows["mask"], np.arange(16) < _NUM_TEST)
  expected = cifar.read("test", np.arange(_NUM_TEST))
  np.testing.assert_array_equal(rows["image"][:_NUM_TEST], expected["image"])
  np.testing.assert_array_equal(rows["label"][:_NUM_TEST], expected["label"])


def test_process_shards_disjoint_and_complete(cifar):
  for step in (0, 5):                       # step 5 of 8 straddles epoch 0/1
    whole = cifar.train_batch(step, batch_size=8)
    halves = [cifar.train_batch(step, batch_size=8, process_index=p,
                                process_count=2) for p in (0, 1)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([h[key] for h in halves]), whole[key])
  indices = np.concatenate([cifar.train_indices(s, batch_size=9)
                            for s in range(10)]).reshape(2, 45)
  for epoch in indices:                     # each epoch: every example once
    np.testing.assert_array_equal(np.sort(epoch), np.arange(45))


def test_resume_sees_the_identical_next_batch(tfds_dir, cifar):
  """A restarted process (fresh Dataset) gets the same batch for a step."""
  for step in (3, 4):
    before = cifar.train_batch(step, batch_size=8)
    after = input_pipeline.create("cifar10", data_dir=tfds_dir["data_dir"],
                                  seed=0).train_batch(step, batch_size=8)
    np.testing.assert_array_equal(before["image"], after["image"])
    np.testing.assert_array_equal(before["label"], after["label"])
  other = input_pipeline.create("cifar10", data_dir=tfds_dir["data_dir"],
                                seed=7)
  assert not np.array_equal(other.train_indices(3, batch_size=8),
                            cifar.train_indices(3, batch_size=8))


def test_flips_on_tfds_images(tfds_dir, cifar):
  flipping = input_pipeline.create("cifar10", data_dir=tfds_dir["data_dir"],
                                   flip=True)
  a = flipping.train_batch(2, batch_size=8)["image"]
  plain = cifar.train_batch(2, batch_size=8)["image"]
  for x, y in zip(a, plain):
    assert np.array_equal(x, y) or np.array_equal(x, y[:, ::-1])


def test_missing_dataset_message(tmp_path):
  empty = str(tmp_path)
  with pytest.raises(FileNotFoundError) as info:
    input_pipeline.create("cifar10", data_dir=empty)
  message = str(info.value)
  assert "tfds builder 'cifar10' is not prepared" in message
  assert os.path.join(empty, "cifar10", "3.0.2") in message
  assert f"vdm prepare cifar10 --data_dir={empty}" in message
  assert "tfds build cifar10 --file_format=array_record" in message
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)put train_64x64.tar and valid_64x64.tar.*"
                     + os.path.join(empty, "downloads", "manual")):
    input_pipeline.create("imagenet64", data_dir=empty)
  with pytest.raises(FileNotFoundError, match=r"needs train_64x64.tar"):
    datasets_tfds.prepare("imagenet64", data_dir=empty)
  with pytest.raises(ValueError, match=r"'toy2d' is not a tfds dataset"):
    datasets_tfds.prepare("toy2d", data_dir=empty)


def test_missing_fashion_mnist_names_both_fixes(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets_local, "FASHION_MNIST_DIR",
                      str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)make fashion-mnist.*apt-get install "
                     r"dataset-fashion-mnist.*prepare fashion_mnist"):
    input_pipeline.create("fashion_mnist", data_dir=str(tmp_path))


def test_tfrecord_copy_is_reported_not_crashed(tfds_dir, tmp_path):
  data_dir = str(tmp_path)
  builder = tfds.builder("cifar10", data_dir=data_dir, file_format="tfrecord")
  with mock.patch.object(tfds.download.DownloadManager,
                         "download_and_extract",
                         return_value=str(tfds_dir["raw"])):
    builder.download_and_prepare()
  with pytest.raises(FileNotFoundError,
                     match=r"was prepared as .*tfrecord.* no random access"):
    input_pipeline.create("cifar10", data_dir=data_dir)
