"""The score network of the VDM paper: a U-Net without downsampling.

Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models",
arXiv:2107.00630, appendix B (and its CIFAR-10 setting in
section "Experiments"): the input z_t, concatenated with its Fourier features,
goes through a 3x3 convolution, `num_res_blocks` ResNet blocks at full
resolution, a middle ResNet block, self-attention and a second ResNet block,
then `num_res_blocks + 1` ResNet blocks that each take the concatenation of
the running features and the matching down-path activation (skip connection),
then GroupNorm, swish and a zero-initialised 3x3 convolution. The noise level
gamma_t is embedded (sinusoidal on gamma rescaled to [0, 1000], then a 2-layer
MLP) and added inside every ResNet block.

The output is eps_hat = z_t + conv_out(h) (`z_skip=True`, as in the official
implementation): at initialisation the net predicts eps_hat = z_t, the right
answer at high noise, and learns the residual.

At the CIFAR-10 setting (`num_res_blocks=32, channels=128`, 32x32x3 input)
this has 30,577,667 parameters. The official implementation's score model has
30,578,179: its first embedding layer also reads a conditioning scalar
(constant 0 for CIFAR-10), i.e. 512 weights that never see a non-zero input;
this net instead embeds labels (`num_classes > 0`) with a table. (The official
code calls this count `sm_n_layer`.)

Because the embedding is added just before a GroupNorm, only its differences
between the channels of a group survive; with one channel per group (e.g. 32
channels in the default 32 groups, the official code's small test setting)
the network cannot see gamma at all, so that raises a ValueError here: use
`num_groups=8` at 32 channels.
"""
from typing import Optional

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets import embeddings
from vdm.nets import groupnorm
from vdm.nets import layers
from vdm.nets import parts


class VDMUNet(nn.Module):
  """VDM paper U-Net (constant resolution) predicting eps_hat.

  Attributes:
    channels: width of every block (paper CIFAR-10: 128).
    num_res_blocks: ResNet blocks on the down path (paper: 32); the up path
      has num_res_blocks + 1.
    dropout: drop rate inside the ResNet blocks (paper: 0.1).
    attention: self-attention after every down/up block (the paper
      CIFAR-10 model has attention only in the middle).
    num_heads: heads of every attention block.
    num_groups: GroupNorm groups (must divide `channels`, with >= 2 channels
      per group: the noise embedding is added just before a GroupNorm, which
      removes each group's mean; paper: 32 groups of 4 channels).
    fourier_features: concatenate Fourier features of z_t to the input.
    fourier_min, fourier_max: exponents n in range(fourier_min, fourier_max)
      of the features sin/cos(2 pi 2^n z) (paper: 6, 7).
    num_classes: 0 = unconditional; else labels in [0, num_classes) and a
      learned null label (labels=None) for classifier-free guidance.
    gamma_min, gamma_max: gamma range mapped to [0, 1000] for the embedding.
    z_skip: add z_t to the output (eps_hat = z_t + net(z_t)).
    dtype: compute dtype (None = float32; e.g. jnp.bfloat16 on GPU/TPU);
      parameters are float32 and the output is float32.
    backend: the backend it is compiled for, which picks the attention's
      query chunking (`layers.AttentionBlock`); `nets.get` sets it.
    fused_norm: the GroupNorm kernel, None (plain), 'triton' (the fused
      GroupNorm + swish + dropout Pallas kernel on a GPU) or 'interpret'
      (that kernel in the Pallas interpreter, for tests); `nets.get` resolves
      the config's 'auto' / True / False per backend. Same parameters and
      the same function either way.
  """
  channels: int = 128
  num_res_blocks: int = 32
  dropout: float = 0.1
  attention: bool = False
  num_heads: int = 1
  num_groups: int = 32
  fourier_features: bool = True
  fourier_min: int = 6
  fourier_max: int = 8
  num_classes: int = 0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  z_skip: bool = True
  dtype: Optional[flax_typing.Dtype] = None
  backend: Optional[str] = None
  fused_norm: Optional[str] = None

  def _check(self, z_t: jax.Array) -> None:
    if z_t.ndim != 4:
      raise ValueError(f"VDMUNet takes images z_t of shape [B, H, W, C]; got "
                       f"shape {z_t.shape}. Use the 'mlp' net for [B, D].")
    if self.num_res_blocks < 0 or self.channels < 1:
      raise ValueError(f"need num_res_blocks >= 0 and channels >= 1; got "
                       f"num_res_blocks={self.num_res_blocks}, "
                       f"channels={self.channels}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
    groupnorm.check_group_divisibility(self.channels, self.num_groups,
                                       "VDMUNet")

  @nn.compact
  def __call__(self, z_t: jax.typing.ArrayLike, gamma_t: jax.typing.ArrayLike,
               labels: Optional[jax.typing.ArrayLike] = None, *,
               train: bool = False) -> jax.Array:
    """eps_hat for a batch.

    Args:
      z_t: [B, H, W, C] noisy images.
      gamma_t: [] or [B] gamma (= -log SNR) at t.
      labels: [B] int32 in [0, num_classes), or None (null label /
        unconditional).
      train: dropout on (needs rngs={'dropout': key}).
    Returns:
      [B, H, W, C] float32 eps_hat.
    """
    z = jnp.asarray(z_t, jnp.float32)
    self._check(z)
    gamma, labels = embeddings.prepare_conditioning(
        z, gamma_t, labels, num_classes=self.num_classes)
    emb = embeddings.NoiseLabelEmbedding(
        self.channels, 4 * self.channels, num_classes=self.num_classes,
        gamma_min=self.gamma_min, gamma_max=self.gamma_max, dtype=self.dtype,
        name="embedding")(gamma, labels)                      # [B, 4 C]

    h = z
    if self.fourier_features:
      h = jnp.concatenate([z, embeddings.fourier_features(
          z, min_exponent=self.fourier_min, max_exponent=self.fourier_max)],
                          axis=-1)                             # [B, H, W, C']
    h = parts.conv3x3(self.channels, self.dtype, "conv_in")(
        h.astype(self.dtype or jnp.float32))

    block = lambda name, out=None: layers.ResnetBlock(
        out, dropout=self.dropout, num_groups=self.num_groups,
        dtype=self.dtype, fused_norm=self.fused_norm, name=name)
    attention_block = lambda name: layers.AttentionBlock(
        self.num_heads, self.num_groups, dtype=self.dtype,
        backend=self.backend, fused_norm=self.fused_norm, name=name)

    skips = [h]
    for i in range(self.num_res_blocks):
      h = block(f"down_{i}")(h, emb, train=train)
      if self.attention:
        h = attention_block(f"down_attention_{i}")(h)
      skips.append(h)

    h = block("mid_block_1")(h, emb, train=train)
    h = attention_block("mid_attention")(h)
    h = block("mid_block_2")(h, emb, train=train)

    for i in range(self.num_res_blocks + 1):
      h = (h, skips.pop())               # channels [h, skip], not concatenated
      h = block(f"up_{i}", self.channels)(h, emb, train=train)
      if self.attention:
        h = attention_block(f"up_attention_{i}")(h)

    h = layers.GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                         fused_norm=self.fused_norm, name="norm_out")(h)
    out = parts.conv3x3(z.shape[-1], self.dtype, "conv_out",
                        zero_init=True)(h).astype(jnp.float32)
    return out + z if self.z_skip else out
