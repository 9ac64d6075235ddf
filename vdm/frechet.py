"""Offline sample quality: a Frechet distance in a small classifier's features.

NOT Inception FID. The numbers this module produces are Frechet distances
between Gaussians fitted to the penultimate-layer features of a *small CNN
trained by this project* on the embedded dataset's train split
(`experiments/train_classifier.py`); they are comparable only with each other
(same dataset, same classifier weights, same number of samples), never with
published FIDs, which use Inception-v3 features of ImageNet-sized images. The
classifier's code is here and its weights are produced by the script, never
downloaded.

  python experiments/train_classifier.py --dataset=mnist5k   # ~1-2 min CPU
  extractor = frechet.load_classifier(frechet.default_dir("mnist5k"))
  fd = frechet.frechet_distance_features(extractor.features(x_samples),
                                         extractor.features(x_test))

The Frechet (2-Wasserstein) distance between N(m_1, C_1) and N(m_2, C_2) is
`||m_1 - m_2||^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})`
(Dowson & Landau 1982, "The Frechet distance between multivariate normal
distributions", J. Multivariate Anal. 12(3); used as FID by Heusel et al.
2017, arXiv:1706.08500, section "Frechet Inception Distance"). The trace of
the matrix square root is computed from the eigenvalues of the symmetric
positive semi-definite `C_1^{1/2} C_2 C_1^{1/2}` (which has the eigenvalues
of `C_1 C_2`), in float64, with rounding-negative eigenvalues clipped to 0:
no non-symmetric `sqrtm`, no complex parts to discard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm import checks
from vdm import elbo

NOT_FID_NOTE = (
    "Frechet distance in the features of a small CNN trained by this project "
    "on the dataset's train split; NOT Inception FID, not comparable to "
    "published FIDs.")
# Training steps per dataset (batch 128): ~20 epochs of mnist5k's 4,000
# train images, ~35 of digits' 1,438.
DEFAULT_NUM_STEPS = {"mnist5k": 600, "digits": 400, "fashion_mnist": 2000}
_PARAMS_FILE = "params.msgpack"
_INFO_FILE = "classifier.json"


# ------------------------------------------------------------------ distance


def _check_features(name: str, features: np.ndarray) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"{name} must be [N, F] features with N >= 2; got shape "
                     f"{features.shape}.")
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name} has non-finite values.")
  return features


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased, N - 1) covariance of feature vectors, float64.

  Args:
    features: [N, F] with N >= 2.
  Returns:
    (mean [F], cov [F, F]).
  """
  features = _check_features("features", features)
  return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix via `eigh`."""
  values, vectors = np.linalg.eigh(0.5 * (cov + cov.T))
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mean_1: np.ndarray, cov_1: np.ndarray,
                     mean_2: np.ndarray, cov_2: np.ndarray) -> float:
  """Squared Frechet distance between N(mean_1, cov_1) and N(mean_2, cov_2).

  `||m_1 - m_2||^2 + tr(C_1) + tr(C_2) - 2 tr((C_1^{1/2} C_2 C_1^{1/2})^{1/2})`
  (Dowson & Landau 1982; Heusel et al. 2017, arXiv:1706.08500), in float64.
  Singular covariances (fewer samples than features, dead ReLU units) are
  fine: eigenvalues are clipped at 0.

  Args:
    mean_1, mean_2: [F] means.
    cov_1, cov_2: [F, F] symmetric positive semi-definite covariances.
  Returns:
    The distance (>= 0, a Python float), in squared feature units.
  """
  mean_1, mean_2 = (np.asarray(m, np.float64) for m in (mean_1, mean_2))
  cov_1, cov_2 = (np.asarray(c, np.float64) for c in (cov_1, cov_2))
  dim = mean_1.shape[0] if mean_1.ndim == 1 else None
  if (dim is None or mean_2.shape != (dim,) or cov_1.shape != (dim, dim)
      or cov_2.shape != (dim, dim)):
    raise ValueError(
        f"need means [F] and covariances [F, F] of one F; got mean shapes "
        f"{mean_1.shape}, {mean_2.shape} and covariance shapes {cov_1.shape}, "
        f"{cov_2.shape}.")
  sqrt_1 = _psd_sqrt(cov_1)
  middle = sqrt_1 @ cov_2 @ sqrt_1                      # [F, F] symmetric PSD
  eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  distance = (np.sum(np.square(mean_1 - mean_2)) + np.trace(cov_1)
              + np.trace(cov_2) - 2.0 * trace_sqrt)
  return float(max(distance, 0.0))


def frechet_distance_features(features_1: np.ndarray,
                              features_2: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two feature sets.

  Args:
    features_1: [N_1, F].
    features_2: [N_2, F] (same F; N may differ). The estimate is biased
      upwards by O(F / N): compare numbers computed with the same N.
  Returns:
    The squared distance, a Python float.
  """
  features_1 = _check_features("features_1", features_1)
  features_2 = _check_features("features_2", features_2)
  if features_1.shape[1] != features_2.shape[1]:
    raise ValueError(f"feature sizes differ: {features_1.shape[1]} vs "
                     f"{features_2.shape[1]}; use one classifier for both.")
  return frechet_distance(*gaussian_stats(features_1),
                          *gaussian_stats(features_2))


# ---------------------------------------------------------------- classifier


class Classifier(nn.Module):
  """A small CNN: 3x3 convolutions with strides 1, 2, 2 and ReLU, flattened,
  a `num_features` ReLU layer (the features) and a linear classifier.

  Attributes:
    channels: widths of the three 3x3 convolutions.
    num_features: width of the penultimate (feature) layer.
    num_classes: output classes.
  """
  channels: Sequence[int] = (32, 64, 64)
  num_features: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits [B, num_classes], features [B, num_features]).

    Args:
      images: [B, H, W, C] float32 in [-1, 1] (see `preprocess`).
    """
    h = images
    for i, (width, stride) in enumerate(zip(self.channels, (1, 2, 2))):
      h = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride),
                          name=f"conv_{i}")(h))
    h = h.reshape(h.shape[0], -1)                   # [B, H/4 * W/4 * C]
    features = nn.relu(nn.Dense(self.num_features, name="features")(h))
    return nn.Dense(self.num_classes, name="logits")(features), features


def preprocess(x: jax.typing.ArrayLike, vocab_size: int) -> jax.Array:
  """Integer images [B, H, W, C] in [0, vocab_size) -> float32 in (-1, 1)."""
  return elbo.encode(x, vocab_size)


@dataclasses.dataclass
class FeatureExtractor:
  """A trained classifier: `features(x)` for Frechet distances.

  Attributes:
    module: the `Classifier`.
    params: its parameters.
    info: what `train_classifier` recorded (dataset, accuracy, ...).
  """
  module: Classifier
  params: Any
  info: dict

  def __post_init__(self):
    vocab_size = int(self.info["vocab_size"])
    self._apply = jax.jit(
        lambda p, x: self.module.apply({"params": p},
                                       preprocess(x, vocab_size)))

  def _batched(self, x: np.ndarray, index: int,
               batch_size: int) -> np.ndarray:
    x = np.asarray(x)
    shape = tuple(self.info["shape"])
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
      raise ValueError(f"this classifier takes images [N, *{shape}] of "
                       f"{self.info['dataset']!r}; got shape {x.shape}.")
    outputs = []
    for start in range(0, x.shape[0], batch_size):
      chunk = x[start:start + batch_size]
      pad = batch_size - chunk.shape[0]   # one compiled shape for all chunks
      chunk = np.concatenate([chunk, np.zeros((pad, *shape), chunk.dtype)])
      out = self._apply(self.params, chunk)[index]
      outputs.append(np.asarray(out, np.float64)[:batch_size - pad])
    return np.concatenate(outputs)

  def features(self, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """[N, num_features] float64 penultimate-layer features of images x.

    Args:
      x: [N, H, W, C] integers in [0, vocab_size) (data or decoded samples).
    """
    return self._batched(x, 1, batch_size)

  def predict(self, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """[N] predicted classes of images x."""
    return np.argmax(self._batched(x, 0, batch_size), axis=-1)


def train_classifier(ds, *, num_steps: int | None = None,
                     batch_size: int = 128,
                     learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                     num_features: int = 64, seed: int = 0,
                     log: Callable[[str], None] | None = print
                     ) -> FeatureExtractor:
  """Trains a `Classifier` on the train split of `ds` (AdamW, cross-entropy).

  Batches are a pure function of (seed, step) (`ds.train_batch`), so the
  weights are reproducible on one machine. The test accuracy is recorded.

  Args:
    ds: an `input_pipeline.Dataset` with labels (num_classes > 0) and images
      [H, W, C].
    num_steps: optimiser steps (None: `DEFAULT_NUM_STEPS` of the dataset,
      else 1000).
    batch_size, learning_rate, weight_decay: optimisation.
    num_features: width of the feature layer.
    seed: initialisation seed (the data order is ds.seed's).
    log: progress printer, or None.
  Returns:
    The trained `FeatureExtractor`.
  """
  if ds.num_classes < 2 or len(ds.shape) != 3:
    raise ValueError(f"the classifier needs labelled images [H, W, C]; "
                     f"dataset {ds.name!r} has shape {ds.shape} and "
                     f"{ds.num_classes} classes.")
  if num_steps is None:
    num_steps = DEFAULT_NUM_STEPS.get(ds.name, 1000)
  num_steps = checks.check_int("num_steps", num_steps, minimum=1)
  batch_size = checks.check_int("batch_size", batch_size, minimum=1)
  module = Classifier(num_features=num_features, num_classes=ds.num_classes)
  x0 = jnp.zeros((1, *ds.shape), jnp.float32)
  params = module.init(jax.random.key(seed), x0)["params"]
  schedule = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = tx.init(params)
  vocab_size = ds.vocab_size

  @jax.jit
  def step(params, opt_state, x, labels):
    def loss_fn(p):
      logits, _ = module.apply({"params": p}, preprocess(x, vocab_size))
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.time()
  for i in range(num_steps):
    batch = ds.train_batch(i, batch_size=batch_size)
    params, opt_state, loss = step(params, opt_state, batch["image"],
                                   batch["label"])
    if log and ((i + 1) % max(1, num_steps // 5) == 0 or i + 1 == num_steps):
      log(f"classifier step {i + 1}/{num_steps}  loss {float(loss):.4f}  "
          f"{time.time() - start:.0f}s")
  info = {"dataset": ds.name, "dataset_version": ds.version,
          "shape": list(ds.shape), "vocab_size": ds.vocab_size,
          "num_classes": ds.num_classes, "num_features": num_features,
          "channels": list(module.channels), "num_steps": num_steps,
          "batch_size": batch_size, "seed": seed, "note": NOT_FID_NOTE}
  extractor = FeatureExtractor(module, jax.device_get(params), info)
  test = next(iter(ds.eval_batches("test",
                                   batch_size=ds.num_examples("test"))))
  accuracy = float(np.mean(extractor.predict(test["image"]) == test["label"]))
  info["test_accuracy"] = accuracy
  info["train_seconds"] = round(time.time() - start, 1)
  if log:
    log(f"classifier test accuracy {accuracy:.4f} on "
        f"{ds.num_examples('test')} {ds.name} test images")
  return extractor


def default_dir(dataset: str) -> str:
  """runs/classifier/<dataset> in the checkout (git-ignored)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(repo, "runs", "classifier", dataset)


def save_classifier(extractor: FeatureExtractor, directory: str) -> str:
  """Writes params.msgpack and classifier.json into `directory`."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, _PARAMS_FILE)
  with open(path + ".tmp", "wb") as f:
    f.write(flax.serialization.to_bytes(extractor.params))
  os.replace(path + ".tmp", path)
  info_path = os.path.join(directory, _INFO_FILE)
  with open(info_path + ".tmp", "w") as f:
    json.dump(extractor.info, f, indent=2, sort_keys=True)
  os.replace(info_path + ".tmp", info_path)
  return directory


def load_classifier(directory: str) -> FeatureExtractor:
  """Reads a classifier written by `save_classifier`.

  Raises:
    FileNotFoundError: nothing there; the message gives the command that
      trains it.
  """
  info_path = os.path.join(directory, _INFO_FILE)
  params_path = os.path.join(directory, _PARAMS_FILE)
  if not (os.path.exists(info_path) and os.path.exists(params_path)):
    raise FileNotFoundError(
        f"no classifier in {directory!r}; train it (never downloaded) with "
        "`python experiments/train_classifier.py --dataset=DATASET "
        f"--out={directory}`.")
  with open(info_path) as f:
    info = json.load(f)
  module = Classifier(channels=tuple(info["channels"]),
                      num_features=int(info["num_features"]),
                      num_classes=int(info["num_classes"]))
  template = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros(
          (1, *info["shape"]), jnp.float32))["params"])
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  with open(params_path, "rb") as f:
    params = flax.serialization.from_bytes(template, f.read())
  return FeatureExtractor(module, params, info)


def load_or_train(ds, directory: str | None = None, *,
                  log: Callable[[str], None] | None = print,
                  **train_kwargs) -> FeatureExtractor:
  """The saved classifier of `ds.name` in `directory` (default
  `default_dir`), trained and saved first if it is not there."""
  directory = directory or default_dir(ds.name)
  try:
    extractor = load_classifier(directory)
  except FileNotFoundError:
    if log:
      log(f"training the feature classifier for {ds.name} into {directory}")
    save_classifier(train_classifier(ds, log=log, **train_kwargs), directory)
    extractor = load_classifier(directory)
  if extractor.info["dataset"] != ds.name or tuple(
      extractor.info["shape"]) != tuple(ds.shape):
    raise ValueError(f"the classifier in {directory!r} was trained on "
                     f"{extractor.info['dataset']!r}, not {ds.name!r}.")
  return extractor


def fd_to_split(extractor: FeatureExtractor, x: np.ndarray, ds, *,
                split: str = "test") -> float:
  """Frechet distance between images x [N, H, W, C] and a whole split."""
  data = np.concatenate([b["image"][b["mask"]] for b in ds.eval_batches(
      split, batch_size=min(1000, ds.num_examples(split)))])
  return frechet_distance_features(extractor.features(x),
                                   extractor.features(data))

