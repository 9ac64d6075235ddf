"""Convolutions and dense layers over an input given as channel parts.

An input given as a tuple of arrays is their concatenation along the last
(channel) axis, never formed: `Conv3x3`, `Dense` (here), `layers.GroupNorm`
and `layers.ResnetBlock` take the U-Nets' up-path input (h, skip) this way and
work on each part (the linear maps sum per part), so there is no concatenated
copy forward and no split of its gradient backward (a faster CPU train step;
see docs/performance.md).
"""
from typing import Any, Callable, Optional

from flax import typing as flax_typing
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Parts = tuple[jax.Array, ...]


def as_parts(x: Any) -> Parts:
  """An array or a tuple/list of channel parts -> a tuple of parts.

  Args:
    x: an array [..., C], or a tuple/list of arrays [..., C_i] that agree on
      all but the last axis.
  Returns:
    A non-empty tuple of arrays.
  Raises:
    ValueError: an empty tuple, or parts that differ in a leading axis.
  """
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if not parts:
    raise ValueError("got an empty tuple of channel parts.")
  if any(p.shape[:-1] != parts[0].shape[:-1] for p in parts):
    raise ValueError(f"channel parts must agree on all but the last axis; got "
                     f"shapes {[p.shape for p in parts]}.")
  return parts


def part_slices(parts: Parts) -> list[slice]:
  """Each part's channel range in the (virtual) concatenation."""
  ends = np.cumsum([p.shape[-1] for p in parts])
  return [slice(int(end - p.shape[-1]), int(end))
          for p, end in zip(parts, ends)]


def _sum_over_parts(parts: Parts,
                    apply: Callable[[jax.Array, slice], jax.Array]
                    ) -> jax.Array:
  """sum_i apply(part_i, rows_i), rows_i the part's channel range: a linear
  map of the concatenation, applied part by part."""
  out = None
  for part, rows in zip(parts, part_slices(parts)):
    y = apply(part, rows)
    out = y if out is None else out + y
  return out


_NHWC = ("NHWC", "HWIO", "NHWC")


@jax.custom_vjp
def conv3x3_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'SAME' stride-1 convolution [B, H, W, C] x [3, 3, C, C'].

  The forward pass and the kernel's gradient are XLA's; the input's
  gradient is written as the forward convolution of the output gradient with
  the kernel flipped in space and its channel axes swapped (the same numbers
  as autodiff's transposed convolution: tested bit for bit). Inside a while
  loop, e.g. the probability-flow ODE's solver calling a vjp of the network
  at every step, XLA:CPU ran autodiff's transposed convolution 2.6 times
  slower than this form; outside a loop the two take the same time
  (docs/performance.md). Reverse mode only, as the network's other
  custom-gradient kernels (GroupNorm, attention).
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=_NHWC)


def _conv3x3_fwd(x, kernel):
  return conv3x3_same(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, d_out):
  x, kernel = residuals
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)          # [3, 3, C', C]
  d_x = jax.lax.conv_general_dilated(d_out, flipped, (1, 1),
                                     ((1, 1), (1, 1)),
                                     dimension_numbers=_NHWC)
  _, kernel_vjp = jax.vjp(
      lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=_NHWC),
      kernel)
  return d_x, kernel_vjp(d_out)[0]


conv3x3_same.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
  """3x3 'SAME' stride-1 convolution of [B, H, W, C] (or of its channel parts:
  the sum of each part's convolution with its rows of the kernel).

  Parameters as `flax.linen.Conv`'s ('kernel' [3, 3, C, features] initialised
  lecun-normal or zeros, 'bias' zeros), float32; compute in `dtype`.

  Attributes:
    features: output channels.
    zero_init: initialise the kernel to zeros (a residual branch's last conv).
    dtype: compute dtype (None = the inputs' and kernel's result type).
  """
  features: int
  zero_init: bool = False
  dtype: Optional[flax_typing.Dtype] = None

  @nn.compact
  def __call__(self, x: Any) -> jax.Array:
    parts = as_parts(x)
    if parts[0].ndim != 4:
      raise ValueError(f"Conv3x3 {'/'.join(self.path)} takes [B, H, W, C]; "
                       f"got shape {parts[0].shape}.")
    init = (nn.initializers.zeros if self.zero_init
            else nn.initializers.lecun_normal())
    kernel = self.param("kernel", init, (3, 3, sum(p.shape[-1] for p in parts),
                                         self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    dtype = self.dtype or jnp.result_type(*parts, kernel)
    conv = lambda part, rows: conv3x3_same(part.astype(dtype),
                                           kernel[:, :, rows].astype(dtype))
    out = _sum_over_parts(parts, conv)
    return out + bias.astype(dtype)


class Dense(nn.Module):
  """`flax.linen.Dense` (same parameters and initialisation) over an array or
  its channel parts.

  Attributes:
    features: output width.
    dtype: compute dtype (None = the inputs' and kernel's result type).
  """
  features: int
  dtype: Optional[flax_typing.Dtype] = None

  @nn.compact
  def __call__(self, x: Any) -> jax.Array:
    parts = as_parts(x)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (sum(p.shape[-1] for p in parts), self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    dtype = self.dtype or jnp.result_type(*parts, kernel)
    out = _sum_over_parts(parts, lambda part, rows: jax.lax.dot_general(
        part.astype(dtype), kernel[rows].astype(dtype),
        (((part.ndim - 1,), (0,)), ((), ()))))
    return out + bias.astype(dtype)


def conv3x3(features: int, dtype: Optional[flax_typing.Dtype], name: str,
            zero_init: bool = False) -> Conv3x3:
  """3x3 'SAME' convolution, float32 params, compute in `dtype`."""
  return Conv3x3(features, zero_init=zero_init, dtype=dtype, name=name)
