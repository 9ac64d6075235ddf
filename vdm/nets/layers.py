"""The modules the score networks are built of: norm, dropout, ResNet and
attention blocks.

Conventions for every block: parameters are float32; `dtype` is the compute
dtype of convolutions and dense layers (None = float32); statistics of norms and
softmaxes are computed in float32 whatever `dtype` is. The kernels they call
live in files of their own: `groupnorm`, `fused_norm` (its GPU kernel),
`attention`, `parts` (convolutions over channel parts) and `embeddings`
(conditioning).

`fused_norm` (a field of the norms and blocks) picks the GroupNorm kernel:
None = `groupnorm.group_norm` (CPU, and any shape the kernel does not take);
'triton' = the Pallas kernel `fused_norm.group_norm` compiled for the GPU
(GroupNorm + swish + dropout in one pass); 'interpret' = the same kernel in
the Pallas interpreter (tests on the CPU). `nets.get` sets it per backend.
"""
import math
from typing import Any, Optional

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets import attention
from vdm.nets import embeddings
from vdm.nets import fused_norm as fused_norm_lib
from vdm.nets import groupnorm
from vdm.nets import parts as parts_lib


# The values of the `fused_norm` fields (None = the plain function).
FUSED_NORM_KINDS = (None, "triton", "interpret")


def _check_fused_norm(kind) -> None:
  if kind not in FUSED_NORM_KINDS:
    raise ValueError(f"fused_norm={kind!r} is unknown; known: "
                     f"{FUSED_NORM_KINDS} (nets.get resolves the config's "
                     "'auto', True and False to one of them).")


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018, arXiv:1803.08494), float32 statistics,
  optionally followed by swish (`groupnorm.group_norm`, with its fused
  backward pass).

  Works for [B, H, W, C] and [B, C], or their channel parts (a tuple, see
  `parts.as_parts`): each part is normalised on its own when the groups do not
  straddle parts (else they are concatenated first), and the result is a tuple
  of parts.

  With `fused_norm` set, parts of a shape `fused_norm.supported` takes go
  through the fused kernel, which also applies dropout from `dropout_bits`
  (`Dropout.bits`) in the same pass.

  Attributes:
    num_groups: channel groups; must divide the channel count.
    epsilon: added to the variance.
    swish: apply swish to the normalised output.
    dtype: output dtype (None = that of the input).
    fused_norm: None, 'triton' or 'interpret' (see the module docstring).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  swish: bool = False
  dtype: Optional[flax_typing.Dtype] = None
  fused_norm: Optional[str] = None

  @nn.compact
  def __call__(self, x: Any, dropout_bits: Optional[jax.Array] = None,
               keep_threshold: int = 65536) -> Any:
    """Normalises x (an array or channel parts).

    Args:
      x: [B, ..., C] or a tuple of channel parts.
      dropout_bits: only with `fused_norm` and a single supported part: the
        uint16 bits of `Dropout.bits`, applied after swish in the kernel.
      keep_threshold: the threshold `Dropout.bits` returned.
    Returns:
      The normalised x (a tuple of parts if x was one).
    """
    _check_fused_norm(self.fused_norm)
    parts = parts_lib.as_parts(x)
    channels = sum(p.shape[-1] for p in parts)
    groupnorm.check_group_divisibility(channels, self.num_groups,
                                       f"GroupNorm {'/'.join(self.path)}")
    scale = self.param("scale", nn.initializers.ones, (channels,),
                       jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    group_size = channels // self.num_groups
    if any(p.shape[-1] % group_size for p in parts):
      parts = (jnp.concatenate(parts, axis=-1),)
    if dropout_bits is not None and (
        len(parts) != 1 or not self.fused_in_kernel(parts[0].shape)):
      raise ValueError(
          f"GroupNorm {'/'.join(self.path)}: dropout_bits need the fused "
          f"kernel (fused_norm set, one part of a supported shape); got "
          f"fused_norm={self.fused_norm!r}, part shapes "
          f"{[p.shape for p in parts]}. Apply Dropout after the norm instead.")
    outs = []
    for p, rows in zip(parts, parts_lib.part_slices(parts)):
      num_groups = p.shape[-1] // group_size
      if self.fused_in_kernel(p.shape, num_groups):
        outs.append(fused_norm_lib.group_norm(
            p, scale[rows], bias[rows], num_groups=num_groups,
            epsilon=self.epsilon, swish=self.swish,
            dropout_bits=dropout_bits, keep_threshold=keep_threshold,
            out_dtype=self.dtype or p.dtype,
            interpret=self.fused_norm == "interpret"))
      else:
        outs.append(groupnorm.group_norm(
            p, scale[rows], bias[rows], num_groups, self.epsilon,
            self.swish).astype(self.dtype or p.dtype))
    outs = tuple(outs)
    return outs if isinstance(x, (tuple, list)) else outs[0]

  def fused_in_kernel(self, shape: tuple[int, ...],
                      num_groups: Optional[int] = None) -> bool:
    """Whether an input part of `shape` goes through the fused kernel."""
    return (self.fused_norm is not None and fused_norm_lib.supported(
        shape, num_groups or self.num_groups))


class Dropout(nn.Module):
  """Inverted dropout (Srivastava et al. 2014) from 16 random bits per element.

  Each 32-bit draw of the 'dropout' rng serves two elements, which makes the
  mask ~3x cheaper on CPU than `flax.linen.Dropout` (one float per element).
  The keep probability is quantised to a multiple of 2^-16
  (`keep = round((1 - rate) 2^16) / 2^16`, e.g. rate 0.1 -> 0.1000061) and kept
  elements are scaled by exactly 1 / keep, so E[output] = input.

  Attributes:
    rate: drop probability in [0, 1).
  """
  rate: float

  def threshold(self) -> int:
    """Keep an element when its 16 bits < this; 65536 = keep all."""
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"dropout rate must be in [0, 1); got {self.rate}.")
    return round((1.0 - self.rate) * 65536)               # keep if bits < it

  def bits(self, shape: tuple[int, ...]) -> jax.Array:
    """The uint16 draws `__call__` compares with `threshold()` (for a fused
    kernel that applies the same dropout; rng collection 'dropout')."""
    if self.threshold() == 0:
      raise ValueError(f"dropout rate {self.rate} rounds to 1 at 16 bits.")
    size = math.prod(shape)
    bits = jax.random.bits(self.make_rng("dropout"), ((size + 1) // 2,),
                           jnp.uint32)
    bits = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)
    return bits[:size].reshape(shape)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    threshold = self.threshold()
    if deterministic or threshold >= 65536:
      return x
    keep = self.bits(x.shape) < threshold
    scale = jnp.asarray(65536.0 / threshold, x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class ResnetBlock(nn.Module):
  """Pre-activation ResNet block conditioned on an embedding.

  norm -> swish -> conv -> (+ Dense(emb) | FiLM) -> norm -> swish -> dropout ->
  zero-initialised conv, plus the input (through a 1x1 Dense if the width
  changes). `scale_shift=False` adds a projection of the embedding after the
  first conv (VDM appendix B); `scale_shift=True` applies
  it as h * (1 + scale) + shift after the second norm (FiLM, Perez et al.
  2018; as in Dhariwal & Nichol 2021, arXiv:2105.05233). The additive form
  needs >= 2 channels per GroupNorm group: the norm removes each group's mean,
  so only the embedding's differences between a group's channels get through
  (with one channel per group, nothing; that raises a ValueError).

  The input may be given as channel parts (the U-Nets pass (h, skip), see
  `parts.as_parts`); the block then never forms their concatenation.

  Attributes:
    out_channels: output width (None = input width).
    dropout: drop rate (rng collection 'dropout', only when train=True).
    num_groups: GroupNorm groups.
    scale_shift: FiLM conditioning instead of additive.
    dtype: compute dtype.
    fused_norm: the norms' kernel (see the module docstring); with it, the
      second norm, swish and dropout are one pass (additive conditioning).
  """
  out_channels: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = 32
  scale_shift: bool = False
  dtype: Optional[flax_typing.Dtype] = None
  fused_norm: Optional[str] = None

  @nn.compact
  def __call__(self, x: Any, emb: jax.Array, *, train: bool) -> jax.Array:
    parts = parts_lib.as_parts(x)
    channels = sum(p.shape[-1] for p in parts)
    out = self.out_channels or channels
    if not self.scale_shift and out == self.num_groups:
      # One channel per group: norm_2 subtracts each channel's mean, which
      # contains all of the additive embedding, so the block could not see
      # gamma (nor labels). The official VDM code has this flaw at 32 channels.
      raise ValueError(
          f"ResnetBlock {'/'.join(self.path)}: {out} channels in "
          f"num_groups={self.num_groups} groups is one channel per group, and "
          "GroupNorm would remove the additive noise/label conditioning "
          f"entirely; use num_groups <= {out // 2} (e.g. num_groups="
          f"{max(1, out // 4)}).")
    norm = lambda name, swish=True: GroupNorm(
        self.num_groups, swish=swish, dtype=self.dtype,
        fused_norm=self.fused_norm, name=name)
    h = norm("norm_1")(parts)
    h = parts_lib.conv3x3(out, self.dtype, "conv_1")(h)
    if self.scale_shift:
      film = nn.Dense(2 * out, dtype=self.dtype, param_dtype=jnp.float32,
                      name="film")(emb)                        # [B, 2 out]
      scale, shift = jnp.split(embeddings.expand_to(film, h.ndim), 2, axis=-1)
      h = norm("norm_2", swish=False)(h)
      h = nn.swish(h * (1 + scale) + shift)
      h = Dropout(self.dropout)(h, deterministic=not train)
    else:
      h = h + embeddings.expand_to(nn.Dense(
          out, use_bias=False, kernel_init=nn.initializers.zeros,
          dtype=self.dtype, param_dtype=jnp.float32, name="cond")(emb), h.ndim)
      norm_2 = norm("norm_2")
      dropout = Dropout(self.dropout)
      if (train and dropout.threshold() < 65536 and
          norm_2.fused_in_kernel(h.shape)):
        # Same bits as Dropout.__call__ (same module, same rng), one pass.
        h = norm_2(h, dropout.bits(h.shape), dropout.threshold())
      else:
        h = dropout(norm_2(h), deterministic=not train)
    h = parts_lib.conv3x3(out, self.dtype, "conv_2", zero_init=True)(h)
    if channels != out:
      x = parts_lib.Dense(out, dtype=self.dtype, name="shortcut")(parts)
    else:
      x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
  """Self-attention over all positions of [B, H, W, C], residual, zero-init
  output projection (Vaswani et al. 2017; as in VDM appendix B).

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups.
    dtype: compute dtype (softmax in float32).
    backend: the backend the block is compiled for ('cpu', 'gpu', 'tpu'),
      which picks the query chunking (`attention.query_chunk_size`); the nets
      pass theirs, which `nets.get` sets. None: all queries in one step.
    fused_norm: the norm's kernel (see the module docstring).
  """
  num_heads: int = 1
  num_groups: int = 32
  dtype: Optional[flax_typing.Dtype] = None
  backend: Optional[str] = None
  fused_norm: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if x.ndim != 4:
      raise ValueError(f"AttentionBlock takes [B, H, W, C]; got shape "
                       f"{x.shape}.")
    if channels % self.num_heads:
      raise ValueError(f"{channels} channels are not divisible by num_heads="
                       f"{self.num_heads}.")
    head_dim = channels // self.num_heads
    h = GroupNorm(self.num_groups, dtype=self.dtype,
                  fused_norm=self.fused_norm, name="norm")(x)
    qkv = nn.Dense(3 * channels, dtype=self.dtype, param_dtype=jnp.float32,
                   name="qkv")(h)
    # [B, N, H, W, D] operands, heads apart from the batch (the kernel lays
    # its contractions out as row-major matmuls itself).
    qkv = qkv.reshape(x.shape[:-1] + (3, self.num_heads, head_dim))
    qkv = jnp.moveaxis(qkv, (-3, -2), (1, 2))             # [B, 3, N, H, W, D]
    q = qkv[:, 0] * (1.0 / math.sqrt(head_dim))
    k, v = qkv[:, 1], qkv[:, 2]
    positions = x.shape[1] * x.shape[2]
    chunk = (None if self.backend is None
             else attention.query_chunk_size(positions, self.backend))
    out = attention.spatial_attention(q, k, v, chunk)       # [B, N, H, W, D]
    out = jnp.moveaxis(out, 1, -2)                           # [B, H, W, N, D]
    out = nn.Dense(channels, kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=jnp.float32,
                   name="proj_out")(out.reshape(x.shape))
    return x.astype(out.dtype) + out
