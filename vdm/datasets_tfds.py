"""tensorflow-datasets sources read by index (`tfds` ArrayRecord data sources).

A tfds dataset prepared with `file_format='array_record'` is read with
`builder.as_data_source(split)`: a random-access sequence whose `[i]` decodes
example i with numpy + PIL (TensorFlow is not imported for reading; it is
for preparing). Random access by index is what lets `input_pipeline` make
every batch a pure function of (seed, step) -- see its module docstring.

This module is imported lazily, only when a tfds dataset is requested, so the
embedded datasets never pay for tfds. `input_pipeline.create` is the public
entry point; `prepare` (also `vdm prepare NAME --data_dir=DIR`) writes a dataset in the format read here.
"""
import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.resources
import os
import sys
from typing import Any

import numpy as np


_NUM_DECODE_THREADS = min(8, os.cpu_count() or 1)


@functools.cache
def _executor() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(
      _NUM_DECODE_THREADS, thread_name_prefix="vdm-tfds-decode")


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How a vdm dataset name maps onto a tfds builder.

  Attributes:
    builder: tfds builder name (with config), e.g. 'downsampled_imagenet/32x32'.
    shape: per-example image shape.
    num_classes: label classes; 0 when the tfds dataset has no labels.
    splits: vdm split -> tfds split.
    download: what `prepare` fetches, for the error message.
    manual_files: files the user must download by hand (None: automatic).
  """
  builder: str
  shape: tuple[int, int, int]
  num_classes: int
  splits: dict[str, str]
  download: str
  manual_files: tuple[str, ...] | None = None


_TRAIN_TEST = {"train": "train", "test": "test"}
# downsampled_imagenet (van den Oord et al. 2016) has train and validation
# splits and no labels; its validation split is the benchmark test set (VDM
# paper, ImageNet 32x32 / 64x64 results).
_TRAIN_VALID = {"train": "train", "test": "validation"}
TFDS_DATASETS = {
    "cifar10": TfdsSpec("cifar10", (32, 32, 3), 10, _TRAIN_TEST,
                        "downloads 163 MB from cs.toronto.edu"),
    "fashion_mnist": TfdsSpec("fashion_mnist", (28, 28, 1), 10, _TRAIN_TEST,
                              "downloads 30 MB"),
    "imagenet32": TfdsSpec(
        "downsampled_imagenet/32x32", (32, 32, 3), 0, _TRAIN_VALID,
        "reads 4.3 GB of manually downloaded tars",
        ("train_32x32.tar", "valid_32x32.tar")),
    "imagenet64": TfdsSpec(
        "downsampled_imagenet/64x64", (64, 64, 3), 0, _TRAIN_VALID,
        "reads 12.6 GB of manually downloaded tars",
        ("train_64x64.tar", "valid_64x64.tar")),
}


def import_tfds():
  """`tensorflow_datasets`, or ImportError saying how to install it."""
  try:
    return importlib.import_module("tensorflow_datasets")
  except ImportError as error:
    raise ImportError(
        "tfds datasets need tensorflow-datasets: `.venv/bin/pip install -e "
        "'.[tfds]'` (`make install-test` does this).") from error


def prepare_command(name: str, data_dir: str) -> str:
  return f"vdm prepare {name} --data_dir={data_dir}"


def missing_message(name: str, spec: TfdsSpec, *, data_dir_root: str,
                    dataset_dir: str, reason: str,
                    target_root: str | None = None) -> str:
  """The FileNotFoundError text: builder, expected place, command to run.

  target_root: data_dir to prepare into when not data_dir_root.
  """
  root = data_dir_root
  found = ""
  builder_dir = os.path.join(root, *spec.builder.split("/"))
  if os.path.isdir(builder_dir) and not os.path.isdir(dataset_dir):
    found = (f" (found versions {sorted(os.listdir(builder_dir))} in "
             f"{builder_dir!r}, which this tfds does not read)")
  lines = [
      f"dataset {name!r} is not available: tfds builder {spec.builder!r} "
      f"{reason}; expected an array_record copy at {dataset_dir!r}{found}."]
  if spec.manual_files:
    manual = os.path.join(root, "downloads", "manual")
    lines.append(
        f"It needs a manual download: put {' and '.join(spec.manual_files)} "
        "(the downsampled ImageNet of van den Oord et al. 2016, formerly "
        "image-net.org/small/; their sha256 sums are in tfds' "
        f"downsampled_imagenet/checksums.tsv) in {manual!r}, then run:")
  else:
    lines.append(f"Prepare it once ({spec.download}):")
  target = target_root or root
  lines.append(f"  {prepare_command(name, target)}")
  lines.append(
      "or with the tfds CLI (tfds 4.9.10 also needs `pip install apache-beam "
      "importlib_resources`):\n"
      f"  tfds build {spec.builder} --file_format=array_record "
      f"--data_dir={target}")
  lines.append(f"and set config.data.data_dir={target!r}.")
  return "\n".join(lines)


class TfdsSource:
  """A prepared tfds dataset read by index; see `input_pipeline.Dataset`."""

  def __init__(self, name: str, spec: TfdsSpec, builder: Any,
               sources: dict[str, Any]):
    self.name = name
    self.spec = spec
    self.shape = spec.shape
    self.vocab_size = 256
    self.num_classes = spec.num_classes
    self.version = str(builder.info.version)
    self.builder_name = spec.builder
    self.data_dir = str(builder.data_dir)
    self._sources = sources

  def num_examples(self, split: str) -> int:
    return len(self._sources[split])

  def read(self, split: str,
           indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples `indices` ([n] int) of `split`: ([n, H, W, C] uint8, [n])."""
    keys = [int(i) for i in indices]
    source = self._sources[split]
    # PIL decodes without the GIL: threads scale the decode (~0.1 ms/image).
    num_chunks = min(_NUM_DECODE_THREADS, max(1, len(keys) // 8))
    chunks = [keys[i::num_chunks] for i in range(num_chunks)]
    if num_chunks == 1:
      records = source.__getitems__(keys) if keys else []
    else:
      decoded = list(_executor().map(source.__getitems__, chunks))
      records = [None] * len(keys)
      for i, chunk in enumerate(decoded):
        records[i::num_chunks] = chunk
    images = np.zeros((len(keys), *self.shape), np.uint8)
    labels = np.zeros((len(keys),), np.int32)
    for row, record in enumerate(records):
      image = np.asarray(record["image"])
      if image.shape != self.shape:
        raise ValueError(
            f"{self.builder_name} example {keys[row]} of split {split!r} has "
            f"shape {image.shape}, expected {self.shape}: is {self.data_dir!r}"
            " the right dataset?")
      images[row] = image
      if self.num_classes:
        labels[row] = record["label"]
    return images, labels


def open_source(name: str, *, data_dir: str | None) -> TfdsSource:
  """Opens the prepared tfds copy of `name`; FileNotFoundError if missing."""
  spec = TFDS_DATASETS[name]
  tfds = import_tfds()
  builder = tfds.builder(spec.builder, data_dir=data_dir)
  context = dict(data_dir_root=str(builder.data_dir_root),
                 dataset_dir=str(builder.data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(missing_message(
        name, spec, reason="is not prepared", **context))
  try:
    sources = {split: builder.as_data_source(split=tfds_split)
               for split, tfds_split in spec.splits.items()}
  except (NotImplementedError, ValueError) as error:
    raise FileNotFoundError(missing_message(
        name, spec, reason="was prepared as "
        f"{getattr(builder.info.file_format, 'value', '?')}, "
        "which has no random access", target_root="NEW_DATA_DIR",
        **context)) from error
  return TfdsSource(name, spec, builder, sources)


def _ensure_importlib_resources():
  """tfds 4.9.10 imports `importlib_resources` to prepare datasets but only
  requires it on Python < 3.9 (tensorflow/datasets#11212); the standard
  library's `importlib.resources` has everything it uses."""
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    sys.modules["importlib_resources"] = importlib.resources


def prepare(name: str, *, data_dir: str | None,
            manual_dir: str | None = None) -> str:
  """Downloads (or reads the manual download) and writes `name` in the
  array_record format under data_dir; returns the dataset's directory.

  Does what `tfds build BUILDER --file_format=array_record` does, without the
  tfds CLI, which needs apache-beam (tensorflow/datasets#5463).
  """
  if name not in TFDS_DATASETS:
    raise ValueError(f"{name!r} is not a tfds dataset; known: "
                     f"{', '.join(sorted(TFDS_DATASETS))}.")
  spec = TFDS_DATASETS[name]
  _ensure_importlib_resources()
  tfds = import_tfds()
  builder = tfds.builder(spec.builder, data_dir=data_dir,
                         file_format="array_record")
  if spec.manual_files and not builder.is_prepared():
    manual = manual_dir or os.path.join(str(builder.data_dir_root),
                                        "downloads", "manual")
    missing = [f for f in spec.manual_files
               if not os.path.exists(os.path.join(manual, f))]
    if missing:
      raise FileNotFoundError(missing_message(
          name, spec, reason=f"needs {', '.join(missing)} in {manual!r}",
          data_dir_root=str(builder.data_dir_root),
          dataset_dir=str(builder.data_dir)))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return str(builder.data_dir)
