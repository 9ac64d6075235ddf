"""GroupNorm + swish (+ dropout) as one Pallas kernel for GPUs.

On a GPU the unfused graph between two convolutions of a ResNet block reads
and writes the activations several times (statistics, normalise, swish, the
dropout mask, the cast to the compute dtype); for the paper's CIFAR-10 U-Net
that memory traffic, not the convolutions, caps a bf16 step (see
docs/performance.md, "GPU"). This kernel reads x once and writes the block's
output once, in the compute dtype, with float32 statistics:

  y = swish((x - mean_g) rstd_g scale + bias)      # per (example, group g)
  y = where(bits < threshold, y / keep, 0)         # dropout, optional

Its backward pass is `groupnorm.group_norm_backward` (plain jnp that XLA fuses
into one reduction and one elementwise pass), fed with the float32 statistics
the forward kernel wrote, after the dropout mask is applied to the cotangent.

The CPU keeps `groupnorm.group_norm` (the kernel is selected where the net is
built, `nets.get`); on the CPU this kernel runs in the Pallas interpreter,
which the tests use to check it against the plain function. The GPU lowering
is Triton (`jax.experimental.pallas`): every block dimension must be a power of
2, so `supported` says which shapes it takes; others keep the plain function.
"""
import functools
from typing import Optional

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from vdm.nets import groupnorm

# Elements of one kernel block (rows x channels): 16K float32 values are 64
# KiB, about 128 registers a thread at 4 warps, so the block stays on chip.
MAX_BLOCK_ELEMENTS = 16384
NUM_WARPS = 4


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def block_channels(rows: int, channels: int, num_groups: int) -> int:
  """Channels per kernel block: whole groups, a power of 2, <= the budget.

  Args:
    rows: spatial positions per example (H W).
    channels: C.
    num_groups: groups of C.
  Returns:
    The widest power-of-2 multiple of the group size dividing C with rows x
    channels <= MAX_BLOCK_ELEMENTS (at least one group), or 0 when the group
    size or `rows` is not a power of 2 (Triton's block constraint).
  """
  group_size = channels // num_groups
  if not (_is_power_of_2(rows) and _is_power_of_2(group_size)):
    return 0
  width = group_size
  while (channels % (2 * width) == 0 and
         rows * 2 * width <= MAX_BLOCK_ELEMENTS):
    width *= 2
  return width


def supported(shape: tuple[int, ...], num_groups: int) -> bool:
  """Whether the kernel takes an input of `shape` [B, H, W, C] in groups.

  Needs 4-D input, whole groups, power-of-2 H W and group size, and one group
  of all positions within the block budget.
  """
  if len(shape) != 4 or num_groups < 1 or shape[-1] % num_groups:
    return False
  rows = shape[1] * shape[2]
  width = block_channels(rows, shape[-1], num_groups)
  return width > 0 and rows * width <= MAX_BLOCK_ELEMENTS


def _forward_kernel(*refs, group_size: int, epsilon: float, swish: bool,
                    threshold: int, count: int):
  """One (example, channel block): [rows, width] in, normalised out."""
  if threshold:
    x_ref, scale_ref, bias_ref, bits_ref, y_ref, mean_ref, rstd_ref = refs
  else:
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
  x = x_ref[...].astype(jnp.float32)                       # [rows, width]
  width = x.shape[1]
  # Per-channel sums, then sums over each channel's group via a [width,
  # width] same-group indicator (Triton reshapes cannot split the lane axis).
  sum_x = jnp.sum(x, axis=0)                               # [width]
  sum_sq = jnp.sum(x * x, axis=0)
  row = jax.lax.broadcasted_iota(jnp.int32, (width, width), 0) // group_size
  col = jax.lax.broadcasted_iota(jnp.int32, (width, width), 1) // group_size
  same = (row == col).astype(jnp.float32)
  mean = jnp.sum(sum_x[:, None] * same, axis=0) / count    # [width]
  mean_sq = jnp.sum(sum_sq[:, None] * same, axis=0) / count
  # One-pass variance clipped at 0, as groupnorm.group_norm.
  rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
  y = ((x - mean[None, :]) * (rstd * scale_ref[...])[None, :]
       + bias_ref[...][None, :])
  if swish:
    y = y * jax.nn.sigmoid(y)
  if threshold:
    keep = bits_ref[...].astype(jnp.int32) < threshold
    y = jnp.where(keep, y * (65536.0 / threshold), 0.0)
  y_ref[...] = y.astype(y_ref.dtype)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def _forward(x, scale, bias, bits, *, num_groups, epsilon, swish, threshold,
             out_dtype, interpret, width):
  batch, height, width_px, channels = x.shape
  rows = height * width_px
  width = width or block_channels(rows, channels, num_groups)
  group_size = channels // num_groups
  kernel = functools.partial(
      _forward_kernel, group_size=group_size, epsilon=float(epsilon),
      swish=swish, threshold=threshold, count=rows * group_size)
  block = pl.BlockSpec((None, rows, width), lambda b, c: (b, 0, c))
  vector = pl.BlockSpec((width,), lambda b, c: (c,))
  stats = pl.BlockSpec((None, width), lambda b, c: (b, c))
  in_specs = [block, vector, vector]
  args = [x.reshape(batch, rows, channels), scale.astype(jnp.float32),
          bias.astype(jnp.float32)]
  if threshold:
    in_specs.append(block)
    args.append(bits.reshape(batch, rows, channels))
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    params = pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)
  y, mean, rstd = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((batch, rows, channels), out_dtype),
                 jax.ShapeDtypeStruct((batch, channels), jnp.float32),
                 jax.ShapeDtypeStruct((batch, channels), jnp.float32)),
      grid=(batch, channels // width), in_specs=in_specs,
      out_specs=(block, stats, stats), interpret=interpret,
      compiler_params=params, name="group_norm_swish")(*args)
  return y.reshape(x.shape), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _fused(x, scale, bias, bits, num_groups, epsilon, swish, threshold,
           out_dtype, interpret, width):
  return _forward(x, scale, bias, bits, num_groups=num_groups,
                  epsilon=epsilon, swish=swish, threshold=threshold,
                  out_dtype=out_dtype, interpret=interpret, width=width)[0]


def _fused_fwd(x, scale, bias, bits, num_groups, epsilon, swish, threshold,
               out_dtype, interpret, width):
  y, mean, rstd = _forward(x, scale, bias, bits, num_groups=num_groups,
                           epsilon=epsilon, swish=swish, threshold=threshold,
                           out_dtype=out_dtype, interpret=interpret,
                           width=width)
  return y, (x, scale, bias, bits, mean, rstd)


def _fused_bwd(num_groups, epsilon, swish, threshold, out_dtype, interpret,
               width, residuals, d_out):
  del out_dtype, interpret, width
  x, scale, bias, bits, mean, rstd = residuals
  d_out = d_out.astype(jnp.float32)
  if threshold:
    keep = bits.astype(jnp.int32) < threshold
    d_out = jnp.where(keep, d_out * (65536.0 / threshold), 0.0)
  per_channel = lambda a: a.reshape(a.shape[0], 1, 1, a.shape[1])
  d_x, d_scale, d_bias = groupnorm.group_norm_backward(
      num_groups, epsilon, swish,
      (x, scale, bias, per_channel(mean), per_channel(rstd)), d_out)
  return d_x, d_scale, d_bias, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *,
               num_groups: int, epsilon: float = 1e-6, swish: bool = True,
               dropout_bits: Optional[jax.Array] = None,
               keep_threshold: int = 65536,
               out_dtype: Optional[jnp.dtype] = None,
               interpret: bool = False,
               block_width: Optional[int] = None) -> jax.Array:
  """GroupNorm (Wu & He 2018, arXiv:1803.08494), swish and dropout, fused.

  Same function as `groupnorm.group_norm` followed by `layers.Dropout` (with
  the same 16-bit draws), in one pass over the activations. float32
  statistics whatever the dtype of x.

  Args:
    x: [B, H, W, C] input, any float dtype; `supported(x.shape, num_groups)`
      must hold.
    scale: [C] float32 per-channel scale.
    bias: [C] float32 per-channel shift.
    num_groups: channel groups; must divide C.
    epsilon: added to the variance.
    swish: apply swish (x sigmoid(x)) to the normalised output.
    dropout_bits: [B, H, W, C] uint16 random bits (`layers.Dropout.bits`), or
      None for no dropout.
    keep_threshold: keep an element when its bits < this (keep probability
      keep_threshold / 2^16, kept elements scaled by its inverse); in [1,
      65536]; 65536 = no dropout.
    out_dtype: output dtype (None = that of x).
    interpret: run in the Pallas interpreter (CPU tests); False lowers to
      Triton (GPU).
    block_width: channels per kernel block (None = `block_channels`); tests
      set it to run several blocks per example.
  Returns:
    [B, H, W, C] in `out_dtype`.
  Raises:
    ValueError: a shape the kernel does not take, or a bad threshold.
  """
  if not supported(x.shape, num_groups):
    raise ValueError(
        f"fused_norm.group_norm takes [B, H, W, C] with H W and C / "
        f"num_groups powers of 2 (Triton blocks); got shape {x.shape}, "
        f"num_groups={num_groups}. Use groupnorm.group_norm for this shape "
        "(nets select it when fused_norm.supported is False).")
  if scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
    raise ValueError(f"scale and bias must be [{x.shape[-1]}]; got "
                     f"{scale.shape} and {bias.shape}.")
  if not 1 <= keep_threshold <= 65536:
    raise ValueError(f"keep_threshold must be in [1, 65536]; got "
                     f"{keep_threshold}.")
  threshold = 0 if keep_threshold == 65536 else int(keep_threshold)
  if threshold:
    if dropout_bits is None or dropout_bits.shape != x.shape:
      raise ValueError(
          f"dropout (keep_threshold={keep_threshold}) needs dropout_bits of "
          f"x's shape {x.shape}; got "
          f"{None if dropout_bits is None else dropout_bits.shape}.")
  else:
    dropout_bits = None
  if block_width is not None:
    group_size = x.shape[-1] // num_groups
    if (block_width % group_size or x.shape[-1] % block_width or
        not _is_power_of_2(block_width)):
      raise ValueError(f"block_width={block_width} must be a power of 2, a "
                       f"multiple of the group size {group_size} and divide "
                       f"{x.shape[-1]} channels.")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  return _fused(x, scale, bias, dropout_bits, num_groups, float(epsilon),
                bool(swish), threshold, out_dtype, bool(interpret),
                block_width)

