"""A residual MLP score network for 2-D toy data and flattened tiny images.

Same conditioning as the image nets: a sinusoidal embedding of gamma rescaled
to [0, 1000] (plus an optional label embedding with a learned null row) and a
2-layer MLP, applied in every residual block as a scale and shift (FiLM; Perez
et al. 2018, arXiv:1709.07871). Image inputs [B, H, W, C] are flattened to
[B, H W C] and the output is reshaped back.
"""
from typing import Optional

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets import embeddings
from vdm.nets import groupnorm
from vdm.nets import layers


class _ResidualBlock(nn.Module):
  """norm -> swish -> Dense -> norm -> FiLM -> swish -> dropout -> Dense(0)."""
  hidden: int
  dropout: float
  num_groups: int
  dtype: Optional[flax_typing.Dtype]

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, *,
               train: bool) -> jax.Array:
    dense = lambda n, name, **kw: nn.Dense(
        n, dtype=self.dtype, param_dtype=jnp.float32, name=name, **kw)
    h = layers.GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                         name="norm_1")(x)
    h = dense(self.hidden, "dense_1")(h)
    scale, shift = jnp.split(dense(2 * self.hidden, "film")(emb), 2, axis=-1)
    h = layers.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_2")(h)
    h = nn.swish(h * (1 + scale) + shift)
    h = layers.Dropout(self.dropout)(h, deterministic=not train)
    h = dense(self.hidden, "dense_2", kernel_init=nn.initializers.zeros)(h)
    return x + h


class MLP(nn.Module):
  """Residual MLP predicting eps_hat (or x / v) for vectors or small images.

  Attributes:
    hidden: width of the residual stream and of the embedding.
    num_res_blocks: residual blocks.
    dropout: drop rate inside the blocks.
    num_groups: GroupNorm groups over features (1 = LayerNorm).
    fourier_features: concatenate Fourier features of z_t to the input (for
      quantised data such as flattened images; off for continuous 2-D data).
    fourier_min, fourier_max: exponents n in range(fourier_min, fourier_max).
    num_classes: 0 = unconditional; else labels in [0, num_classes) and a
      learned null label (labels=None) for classifier-free guidance.
    gamma_min, gamma_max: gamma range mapped to [0, 1000] for the embedding.
    z_skip: add z_t to the output.
    dtype: compute dtype (None = float32); params and output are float32.
  """
  hidden: int = 256
  num_res_blocks: int = 3
  dropout: float = 0.0
  num_groups: int = 1
  fourier_features: bool = False
  fourier_min: int = 6
  fourier_max: int = 8
  num_classes: int = 0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  z_skip: bool = True
  dtype: Optional[flax_typing.Dtype] = None

  @nn.compact
  def __call__(self, z_t: jax.typing.ArrayLike, gamma_t: jax.typing.ArrayLike,
               labels: Optional[jax.typing.ArrayLike] = None, *,
               train: bool = False) -> jax.Array:
    """eps_hat for a batch.

    Args:
      z_t: [B, D] vectors or [B, ...] images (flattened internally).
      gamma_t: [] or [B] gamma (= -log SNR) at t.
      labels: [B] int32 in [0, num_classes), or None.
      train: dropout on (needs rngs={'dropout': key}).
    Returns:
      float32, the shape of z_t.
    """
    z_in = jnp.asarray(z_t, jnp.float32)
    if z_in.ndim < 2:
      raise ValueError(f"MLP takes z_t of shape [B, D] or [B, ...]; got shape "
                       f"{z_in.shape}.")
    if self.num_res_blocks < 0 or self.hidden < 1:
      raise ValueError(f"need num_res_blocks >= 0 and hidden >= 1; got "
                       f"num_res_blocks={self.num_res_blocks}, "
                       f"hidden={self.hidden}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
    groupnorm.check_group_divisibility(self.hidden, self.num_groups, "MLP")
    z = z_in.reshape(z_in.shape[0], -1)                      # [B, D]
    gamma, labels = embeddings.prepare_conditioning(
        z, gamma_t, labels, num_classes=self.num_classes)
    emb = embeddings.NoiseLabelEmbedding(
        self.hidden, self.hidden, num_classes=self.num_classes,
        gamma_min=self.gamma_min, gamma_max=self.gamma_max, dtype=self.dtype,
        name="embedding")(gamma, labels)                      # [B, F]

    h = z
    if self.fourier_features:
      h = jnp.concatenate([z, embeddings.fourier_features(
          z, min_exponent=self.fourier_min, max_exponent=self.fourier_max)],
                          axis=-1)
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 name="dense_in")(h.astype(self.dtype or jnp.float32))
    for i in range(self.num_res_blocks):
      h = _ResidualBlock(self.hidden, self.dropout, self.num_groups,
                         self.dtype, name=f"block_{i}")(h, emb, train=train)
    h = layers.GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                         name="norm_out")(h)
    out = nn.Dense(z.shape[-1], kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=jnp.float32,
                   name="dense_out")(h).astype(jnp.float32)
    out = out + z if self.z_skip else out
    return out.reshape(z_in.shape)
