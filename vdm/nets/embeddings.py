"""Conditioning of the score networks: gamma_t and class labels -> vectors.

The noise level gamma_t is rescaled to a DDPM-like timestep in [0, 1000] and
embedded sinusoidally; class labels (with a learned null label for
classifier-free guidance) add a learned row; `NoiseLabelEmbedding` turns both
into the vector every block is conditioned on. The input z_t itself gets
base-2 Fourier features (`fourier_features`).
"""
import math
from typing import Any, Optional

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Timestep scale of the sinusoidal embedding: gamma is mapped to [0, 1] and
# multiplied by this (VDM, Kingma et al. 2021, appendix B).
TIME_SCALE = 1000.0


def check_labels(labels: Any, num_classes: int) -> None:
  """Host-side check that class labels are valid for a net (not traceable).

  Traced labels cannot raise inside `jit`: in the embedding an index above
  the table gives a NaN row and a negative one wraps around (-1 = the null
  row). The input pipeline's labels are in range by construction; call this
  on labels from anywhere else (your own batches) before they reach the net.

  Args:
    labels: [B] integer array-like, or None (unconditional / null label).
    num_classes: the net's `num_classes` (0 = unconditional).
  Raises:
    TypeError: labels are not integers.
    ValueError: labels outside [0, num_classes), or labels for an
      unconditional net.
  """
  if labels is None:
    return
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integers; got dtype {labels.dtype}. "
                    "Cast them with labels.astype(np.int32).")
  if num_classes <= 0:
    raise ValueError(
        f"got labels but num_classes={num_classes} (unconditional net); pass "
        "labels=None or build the net with num_classes > 0.")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(
        f"labels must lie in [0, {num_classes}); got {bad.size} outside, e.g. "
        f"{bad.ravel()[:5].tolist()}. The null label is not a data label: "
        f"the nets take labels=None (whole batch) or index {num_classes} "
        "(per example, e.g. label dropout for guidance).")


def prepare_conditioning(z_t: jax.Array, gamma_t: jax.typing.ArrayLike,
                         labels: Optional[jax.typing.ArrayLike], *,
                         num_classes: int
                         ) -> tuple[jax.Array, Optional[jax.Array]]:
  """Checks shapes (trace time) and broadcasts gamma_t; maps None to null.

  Args:
    z_t: [B, ...] input of the net.
    gamma_t: [] or [B] gamma.
    labels: [B] integer labels, or None. Index `num_classes` is the null label
      (per-example label dropout sets it; None sets it for the whole batch).
    num_classes: 0 = unconditional; else labels index `num_classes + 1` rows,
      the last the null label.
  Returns:
    gamma: [B] float32; labels: [B] int32 (None when unconditional).
  """
  batch = z_t.shape[0]
  gamma = jnp.asarray(gamma_t, jnp.float32)
  if gamma.ndim == 0:
    gamma = jnp.broadcast_to(gamma, (batch,))
  elif gamma.shape != (batch,):
    raise ValueError(f"gamma_t must have shape [] or [B] = ({batch},); got "
                     f"{gamma.shape}.")
  if num_classes <= 0:
    if labels is not None:
      raise ValueError(
          f"got labels but num_classes={num_classes} (unconditional net); "
          "pass labels=None or build the net with num_classes > 0.")
    return gamma, None
  if labels is None:
    return gamma, jnp.full((batch,), num_classes, jnp.int32)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers; got dtype {labels.dtype}.")
  if labels.shape != (batch,):
    raise ValueError(f"labels must have shape [B] = ({batch},); got "
                     f"{labels.shape}.")
  return gamma, labels.astype(jnp.int32)


def rescale_gamma(gamma_t: jax.typing.ArrayLike, *, gamma_min: float,
                  gamma_max: float) -> jax.Array:
  """Maps gamma from [gamma_min, gamma_max] to [0, 1000] for the embedding.

  VDM (Kingma et al. 2021, appendix B) feeds the network
  gamma rescaled to [0, 1] and then embeds it like a DDPM timestep in
  [0, 1000]. Values outside the range extrapolate linearly.

  Args:
    gamma_t: [B] (or any shape) gamma.
    gamma_min: gamma mapped to 0.
    gamma_max: gamma mapped to TIME_SCALE (1000).
  Returns:
    float32, the shape of gamma_t.
  Raises:
    ValueError: gamma_max <= gamma_min.
  """
  if not gamma_max > gamma_min:
    raise ValueError(f"need gamma_max > gamma_min; got gamma_min={gamma_min}, "
                     f"gamma_max={gamma_max}.")
  t = (jnp.asarray(gamma_t, jnp.float32) - gamma_min) / (gamma_max - gamma_min)
  return t * TIME_SCALE


def timestep_embedding(t: jax.Array, dim: int, *,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding (Vaswani et al. 2017, section "Positional Encoding").

  Frequencies run geometrically from 1 to 1 / max_period over `dim // 2`
  entries (both ends included, as in tensor2tensor and DDPM); sines first,
  then cosines; an odd `dim` gets a zero last column.

  Args:
    t: [B] float32 times (here gamma rescaled to [0, 1000]).
    dim: embedding width, >= 4.
    max_period: longest period.
  Returns:
    [B, dim] float32.
  """
  if dim < 4:
    raise ValueError(f"timestep embedding needs dim >= 4; got {dim}.")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) / (half - 1)
                  * jnp.arange(half, dtype=jnp.float32))   # [half]
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(z: jax.Array, *, min_exponent: int,
                     max_exponent: int) -> jax.Array:
  """Base-2 Fourier features of the input; VDM section "Model" and appendix B.

  For every channel c and n in range(min_exponent, max_exponent):
  sin(2 pi 2^n z_c) and cos(2 pi 2^n z_c). They expose the fine, per-bit
  structure of z near t = 0. Computed in float32 (2^7 z in bfloat16 would
  have no correct phase bits left).

  Args:
    z: [..., C] input.
    min_exponent: first n (inclusive).
    max_exponent: last n (exclusive, like `range`).
  Returns:
    [..., 2 * C * (max_exponent - min_exponent)] float32: all sines (channel
    major, exponent minor), then all cosines.
  """
  if max_exponent <= min_exponent:
    raise ValueError(
        f"Fourier features need fourier_min < fourier_max (n in "
        f"range(fourier_min, fourier_max)); got {min_exponent}, "
        f"{max_exponent}.")
  exponents = jnp.arange(min_exponent, max_exponent, dtype=jnp.float32)
  freqs = 2.0 * jnp.pi * jnp.exp2(exponents)                 # [F]
  z = jnp.asarray(z, jnp.float32)
  args = (z[..., :, None] * freqs).reshape(*z.shape[:-1], -1)  # [..., C F]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def expand_to(emb: jax.Array, ndim: int) -> jax.Array:
  """[B, C] conditioning -> [B, 1, ..., 1, C] with `ndim` axes, to add to or
  scale [B, H, W, C] features."""
  return emb.reshape(emb.shape[:1] + (1,) * (ndim - 2) + emb.shape[1:])


class NoiseLabelEmbedding(nn.Module):
  """gamma_t (and a class label) -> conditioning vector for every block.

  sinusoidal(rescaled gamma) [+ label embedding] -> Dense -> swish -> Dense
  -> swish (VDM appendix B; the label embedding, with a
  learned null row at index num_classes, is for classifier-free guidance, Ho &
  Salimans 2022, arXiv:2207.12598).

  Attributes:
    sinusoid_dim: width of the sinusoidal embedding (and label embedding).
    features: width of the output.
    num_classes: 0 = unconditional; else `num_classes + 1` label rows.
    gamma_min, gamma_max: range mapped to [0, 1000] before embedding.
    dtype: compute dtype of the dense layers.
  """
  sinusoid_dim: int
  features: int
  num_classes: int = 0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  dtype: Optional[flax_typing.Dtype] = None

  @nn.compact
  def __call__(self, gamma: jax.Array,
               labels: Optional[jax.Array]) -> jax.Array:
    t = rescale_gamma(gamma, gamma_min=self.gamma_min,
                      gamma_max=self.gamma_max)                # [B]
    emb = timestep_embedding(t, self.sinusoid_dim)             # [B, D]
    if self.num_classes > 0:
      emb = emb + nn.Embed(self.num_classes + 1, self.sinusoid_dim,
                           param_dtype=jnp.float32,
                           name="label_embedding")(labels)
    for i in range(2):
      emb = nn.swish(nn.Dense(self.features, dtype=self.dtype,
                              param_dtype=jnp.float32, name=f"dense_{i}")(emb))
    return emb                                                 # [B, features]
