"""A multi-resolution U-Net score network (DDPM / ADM style).

Ho et al. 2020 (arXiv:2006.11239, appendix "Experimental details") and
Dhariwal & Nichol 2021 (arXiv:2105.05233, section "Architecture
improvements"): per resolution level `num_res_blocks` ResNet blocks of width
`channels * channel_mult[level]`, self-attention at the chosen levels, a
strided 3x3 convolution to halve the resolution and nearest-neighbour
upsampling + 3x3 convolution to double it, skip connections from every down
block to the matching up block, and the noise/label embedding applied as a
scale and shift (FiLM) after the second GroupNorm of every block.

Level 0 runs at the input resolution, level l at 1 / 2^l of it, so at equal
width this costs a fraction of `VDMUNet` (which keeps every block at full
resolution). Any image size works whose H and W can be halved
len(channel_mult) - 1 times (28x28 with 3 levels: 28, 14, 7).
Output convention as `VDMUNet`: eps_hat = z_t + conv_out(h) when `z_skip`.
"""
from typing import Optional, Sequence

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets import embeddings
from vdm.nets import groupnorm
from vdm.nets import layers
from vdm.nets import parts


class UNet(nn.Module):
  """Multi-resolution U-Net predicting eps_hat (or x / v, see to_eps).

  Attributes:
    channels: base width; level l has channels * channel_mult[l].
    channel_mult: width multipliers, one per resolution level.
    num_res_blocks: ResNet blocks per level on the down path (up: + 1).
    attention_resolutions: resolutions (a level's min(H, W)) with
      self-attention after every block, e.g. (16,) for 32x32 input with 3
      levels (32, 16, 8) as in DDPM's CIFAR-10 model; each must be one of the
      levels' resolutions (checked). Default (): only the middle block (at
      the lowest resolution) has attention, which suits any image size.
    dropout: drop rate inside the ResNet blocks.
    num_heads: heads of every attention block.
    num_groups: GroupNorm groups (must divide every level's width).
    fourier_features: concatenate Fourier features of z_t to the input.
    fourier_min, fourier_max: exponents n in range(fourier_min, fourier_max).
    num_classes: 0 = unconditional; else labels in [0, num_classes) and a
      learned null label (labels=None) for classifier-free guidance.
    gamma_min, gamma_max: gamma range mapped to [0, 1000] for the embedding.
    z_skip: add z_t to the output.
    dtype: compute dtype (None = float32); params and output are float32.
    backend: the backend it is compiled for, which picks the attention's
      query chunking (`layers.AttentionBlock`); `nets.get` sets it.
  """
  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()
  dropout: float = 0.1
  num_heads: int = 1
  num_groups: int = 32
  fourier_features: bool = False
  fourier_min: int = 6
  fourier_max: int = 8
  num_classes: int = 0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  z_skip: bool = True
  dtype: Optional[flax_typing.Dtype] = None
  backend: Optional[str] = None

  def _check(self, z_t: jax.Array) -> None:
    if z_t.ndim != 4:
      raise ValueError(f"UNet takes images z_t of shape [B, H, W, C]; got "
                       f"shape {z_t.shape}. Use the 'mlp' net for [B, D].")
    mults = tuple(self.channel_mult)
    if not mults or any(int(m) != m or m < 1 for m in mults):
      raise ValueError(f"channel_mult must be a non-empty sequence of "
                       f"positive ints; got {self.channel_mult!r}.")
    num_levels = len(mults)
    if self.num_res_blocks < 1 or self.channels < 1:
      raise ValueError(f"need num_res_blocks >= 1 and channels >= 1; got "
                       f"num_res_blocks={self.num_res_blocks}, "
                       f"channels={self.channels}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
    for m in sorted(set(mults)):
      groupnorm.check_group_divisibility(self.channels * m, self.num_groups,
                                         f"UNet level width channels * {m}")
    height, width = z_t.shape[1:3]
    factor = 2 ** (num_levels - 1)
    if height % factor or width % factor:
      fits = [n for n in range(1, num_levels + 1)
              if height % 2 ** (n - 1) == 0 and width % 2 ** (n - 1) == 0]
      padded = (-(-height // factor) * factor, -(-width // factor) * factor)
      raise ValueError(
          f"UNet with {num_levels} levels (channel_mult={mults}) halves the "
          f"image {num_levels - 1} times, so H and W must be divisible by "
          f"{factor}; got {height}x{width}. Use at most {max(fits)} levels "
          f"(len(channel_mult) <= {max(fits)}) or pad the images to "
          f"{padded[0]}x{padded[1]}.")
    resolutions = [min(height, width) // 2 ** l for l in range(num_levels)]
    bad = [r for r in self.attention_resolutions if r not in resolutions]
    if bad:
      raise ValueError(
          f"attention_resolutions {tuple(self.attention_resolutions)} has "
          f"{bad}, which no level has: the levels of a {height}x{width} input "
          f"with channel_mult={mults} have resolutions {resolutions}.")

  @nn.compact
  def __call__(self, z_t: jax.typing.ArrayLike, gamma_t: jax.typing.ArrayLike,
               labels: Optional[jax.typing.ArrayLike] = None, *,
               train: bool = False) -> jax.Array:
    """eps_hat for a batch.

    Args:
      z_t: [B, H, W, C] noisy images.
      gamma_t: [] or [B] gamma (= -log SNR) at t.
      labels: [B] int32 in [0, num_classes), or None.
      train: dropout on (needs rngs={'dropout': key}).
    Returns:
      [B, H, W, C] float32.
    """
    z = jnp.asarray(z_t, jnp.float32)
    self._check(z)
    gamma, labels = embeddings.prepare_conditioning(
        z, gamma_t, labels, num_classes=self.num_classes)
    emb = embeddings.NoiseLabelEmbedding(
        self.channels, 4 * self.channels, num_classes=self.num_classes,
        gamma_min=self.gamma_min, gamma_max=self.gamma_max, dtype=self.dtype,
        name="embedding")(gamma, labels)                      # [B, 4 C]
    compute_dtype = self.dtype or jnp.float32

    h = z
    if self.fourier_features:
      h = jnp.concatenate([z, embeddings.fourier_features(
          z, min_exponent=self.fourier_min, max_exponent=self.fourier_max)],
                          axis=-1)
    h = parts.conv3x3(self.channels, self.dtype, "conv_in")(
        h.astype(compute_dtype))

    block = lambda name, out: layers.ResnetBlock(
        out, dropout=self.dropout, num_groups=self.num_groups,
        scale_shift=True, dtype=self.dtype, name=name)
    attention = lambda name: layers.AttentionBlock(
        self.num_heads, self.num_groups, dtype=self.dtype,
        backend=self.backend, name=name)
    last = len(self.channel_mult) - 1
    attend = lambda level: (min(z.shape[1:3]) // 2 ** level
                            in self.attention_resolutions)

    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(f"down_{level}_{i}", self.channels * mult)(h, emb,
                                                             train=train)
        if attend(level):
          h = attention(f"down_{level}_{i}_attention")(h)
        skips.append(h)
      if level != last:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2),
                    padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"downsample_{level}")(h)
        skips.append(h)

    width = h.shape[-1]
    h = block("mid_block_1", width)(h, emb, train=train)
    h = attention("mid_attention")(h)
    h = block("mid_block_2", width)(h, emb, train=train)

    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = (h, skips.pop())             # channels [h, skip], not concatenated
        h = block(f"up_{level}_{i}", self.channels * self.channel_mult[level])(
            h, emb, train=train)
        if attend(level):
          h = attention(f"up_{level}_{i}_attention")(h)
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
        h = parts.conv3x3(h.shape[-1], self.dtype, f"upsample_{level}")(h)

    h = layers.GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                         name="norm_out")(h)
    out = parts.conv3x3(z.shape[-1], self.dtype, "conv_out",
                        zero_init=True)(h).astype(jnp.float32)
    return out + z if self.z_skip else out
