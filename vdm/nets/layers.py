"""Blocks shared by the score networks: embeddings, norms, ResNet, attention.

Conventions for every block: parameters are float32; `dtype` is the compute
dtype of convolutions and dense layers (None = float32); statistics of norms and
softmaxes are computed in float32 whatever `dtype` is.
"""
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Timestep scale of the sinusoidal embedding: gamma is mapped to [0, 1] and
# multiplied by this (VDM, Kingma et al. 2021, appendix B).
TIME_SCALE = 1000.0


def check_labels(labels: Any, num_classes: int) -> None:
  """Host-side check that class labels are valid for a net (not traceable).

  Traced labels cannot raise inside `jit`. In the embedding an index above
  the table gives a NaN row and a negative one wraps around (-1 = the null
  row), so the trainer calls this on each host batch of data labels.

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


def check_group_divisibility(channels: int, num_groups: int,
                             where: str = "GroupNorm") -> None:
  """Raises ValueError unless `num_groups` divides `channels`."""
  if num_groups < 1 or channels % num_groups:
    raise ValueError(
        f"{where}: {channels} channels are not divisible by num_groups="
        f"{num_groups}; choose channels (and channels * channel_mult) that are "
        f"multiples of num_groups, or a num_groups that divides {channels}.")


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
  """[B, C] -> [B, 1, ..., 1, C] with `ndim` axes in total."""
  return emb.reshape(emb.shape[:1] + (1,) * (ndim - 2) + emb.shape[1:])


# An input given as a tuple of arrays is their concatenation along the last
# (channel) axis, never formed: GroupNorm, Conv3x3, Dense and ResnetBlock take
# the U-Nets' up-path input [h, skip] this way and work on each part (the
# convolutions sum per part), with no concatenated copy forward and no split of
# its gradient backward: CPU train step -2.5% (paper U-Net, cifar10 batch 4),
# -3% (the mnist5k demo's U-Net).
Parts = tuple[jax.Array, ...]


def as_parts(x: Any) -> Parts:
  """An array or a tuple/list of channel parts -> a tuple of parts."""
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if not parts:
    raise ValueError("got an empty tuple of channel parts.")
  if any(p.shape[:-1] != parts[0].shape[:-1] for p in parts):
    raise ValueError(f"channel parts must agree on all but the last axis; got "
                     f"shapes {[p.shape for p in parts]}.")
  return parts


def _part_slices(parts: Parts) -> list[slice]:
  """Each part's channel range in the (virtual) concatenation."""
  ends = np.cumsum([p.shape[-1] for p in parts])
  return [slice(int(end - p.shape[-1]), int(end)) for p, end in zip(parts, ends)]


def _sum_over_parts(parts: Parts, apply) -> jax.Array:
  """sum_i apply(part_i, rows_i), rows_i the part's channel range: a linear
  map of the concatenation, applied part by part."""
  out = None
  for part, rows in zip(parts, _part_slices(parts)):
    y = apply(part, rows)
    out = y if out is None else out + y
  return out


class Conv3x3(nn.Module):
  """3x3 'SAME' stride-1 convolution of [B, H, W, C] (or of its channel parts:
  the sum of each part's convolution with its rows of the kernel).

  Parameters as `flax.linen.Conv`'s ('kernel' [3, 3, C, features] initialised
  lecun-normal or zeros, 'bias' zeros), float32; compute in `dtype`.
  """
  features: int
  zero_init: bool = False
  dtype: Optional[Dtype] = None

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
    conv = lambda part, rows: jax.lax.conv_general_dilated(
        part.astype(dtype), kernel[:, :, rows].astype(dtype), (1, 1),
        ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = _sum_over_parts(parts, conv)
    return out + bias.astype(dtype)


class Dense(nn.Module):
  """`flax.linen.Dense` (same parameters and initialisation) over an array or
  its channel parts."""
  features: int
  dtype: Optional[Dtype] = None

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


def conv3x3(features: int, dtype: Optional[Dtype], name: str,
            zero_init: bool = False) -> Conv3x3:
  """3x3 'SAME' convolution, float32 params, compute in `dtype`."""
  return Conv3x3(features, zero_init=zero_init, dtype=dtype, name=name)


def _group_stats(x: jax.Array, num_groups: int, epsilon: float):
  """Per-(example, group) mean and 1/std, repeated to [B, 1.., C] (float32)."""
  group_size = x.shape[-1] // num_groups
  grouped = x.reshape(x.shape[:-1] + (num_groups, group_size))
  axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
  mean = grouped.mean(axis=axes)                            # [B, G]
  var = jnp.maximum(jnp.square(grouped).mean(axis=axes) - jnp.square(mean),
                    0.0)
  return (_per_channel(mean, group_size, x.ndim),
          _per_channel(jax.lax.rsqrt(var + epsilon), group_size, x.ndim))


def _per_channel(a: jax.Array, group_size: int, ndim: int) -> jax.Array:
  """[B, G] per-group values -> [B, 1.., G group_size] per channel."""
  return expand_to(jnp.repeat(a, group_size, axis=-1), ndim)


def _swish_grad(y, d_out):
  """d_out * swish'(y) = d_out s (1 + y (1 - s)), s = sigmoid(y)."""
  sig = jax.nn.sigmoid(y)
  return d_out * sig * (1.0 + y * (1.0 - sig))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               num_groups: int, epsilon: float, swish: bool) -> jax.Array:
  """Group normalisation (Wu & He 2018) of [B, ..., C], then optionally swish.

  float32 statistics over all non-batch axes of each of `num_groups` channel
  groups; one-pass variance E[x^2] - E[x]^2 clipped at 0 (as Flax's default
  and the official VDM code): float32 keeps it accurate while |mean| / std of a
  group stays well below ~1e3, true of pre-activation ResNet features. The
  backward pass is written out: one reduction over the activations, then one
  elementwise pass with [B, 1.., C] coefficients, swish recomputed from the
  input; 2-3x faster forward + backward than autodiff of the same formula on
  CPU. Where the variance is clipped (a constant group) it differentiates the
  unclipped formula.

  Returns:
    float32, the shape of x.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, swish):
  xf = x.astype(jnp.float32)
  mean, rstd = _group_stats(xf, num_groups, epsilon)
  y = (xf - mean) * (rstd * scale) + bias
  return (nn.swish(y) if swish else y), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, swish, residuals, d_out):
  del epsilon
  x, scale, bias, mean, rstd = residuals
  xf = x.astype(jnp.float32)
  centred = xf - mean
  d_y = d_out.astype(jnp.float32)
  if swish:
    d_y = _swish_grad(centred * (rstd * scale) + bias, d_y)
  # Both per-(example, channel) sums in one reduction over [.., 2 C]: one
  # library call instead of two, and the parameter gradients come from these
  # [B, C] sums (summed over the batch apart, XLA would merge the two sums of
  # d_y into a third pass over the activations). GN + swish forward + backward
  # inside a chain of the paper's ResNet blocks: ~4% faster per block.
  sums = jnp.concatenate([d_y, d_y * centred], axis=-1).sum(
      axis=tuple(range(1, x.ndim - 1)))                      # [B, 2 C]
  channels = x.shape[-1]
  sum_dy = sums[:, :channels]
  sum_dy_xhat = sums[:, channels:] * rstd.reshape(rstd.shape[0], channels)
  group_size = channels // num_groups
  count = group_size * math.prod(x.shape[1:-1])
  group_mean = lambda a: _per_channel(
      a.reshape(a.shape[0], num_groups, group_size).sum(-1) / count,
      group_size, x.ndim)
  m1 = group_mean(sum_dy * scale)
  m2 = group_mean(sum_dy_xhat * scale)
  # dx = rstd (d_y scale - m1 - x_hat m2), per-channel coefficients.
  d_x = d_y * (rstd * scale) - centred * (rstd * rstd * m2) - rstd * m1
  return d_x.astype(x.dtype), sum_dy_xhat.sum(0), sum_dy.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """Group normalisation (Wu & He 2018, arXiv:1803.08494), float32 statistics,
  optionally followed by swish (`group_norm`, with its fused backward pass).

  Works for [B, H, W, C] and [B, C], or their channel parts (a tuple, see
  `as_parts`): each part is normalised on its own when the groups do not
  straddle parts (else they are concatenated first), and the result is a tuple
  of parts.

  Attributes:
    num_groups: channel groups; must divide the channel count.
    epsilon: added to the variance.
    swish: apply swish to the normalised output.
    dtype: output dtype (None = that of the input).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  swish: bool = False
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: Any) -> Any:
    parts = as_parts(x)
    channels = sum(p.shape[-1] for p in parts)
    check_group_divisibility(channels, self.num_groups,
                             f"GroupNorm {'/'.join(self.path)}")
    scale = self.param("scale", nn.initializers.ones, (channels,),
                       jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    group_size = channels // self.num_groups
    if any(p.shape[-1] % group_size for p in parts):
      parts = (jnp.concatenate(parts, axis=-1),)
    outs = tuple(
        group_norm(p, scale[rows], bias[rows], p.shape[-1] // group_size,
                   self.epsilon, self.swish).astype(self.dtype or p.dtype)
        for p, rows in zip(parts, _part_slices(parts)))
    return outs if isinstance(x, (tuple, list)) else outs[0]


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

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"dropout rate must be in [0, 1); got {self.rate}.")
    threshold = round((1.0 - self.rate) * 65536)          # keep if bits < it
    if deterministic or threshold >= 65536:
      return x
    if threshold == 0:
      raise ValueError(f"dropout rate {self.rate} rounds to 1 at 16 bits.")
    size = x.size
    bits = jax.random.bits(self.make_rng("dropout"), ((size + 1) // 2,),
                           jnp.uint32)
    bits = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)
    keep = bits[:size].reshape(x.shape) < threshold
    scale = jnp.asarray(65536.0 / threshold, x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


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
  dtype: Optional[Dtype] = None

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
  `as_parts`); the block then never forms their concatenation.

  Attributes:
    out_channels: output width (None = input width).
    dropout: drop rate (rng collection 'dropout', only when train=True).
    num_groups: GroupNorm groups.
    scale_shift: FiLM conditioning instead of additive.
    dtype: compute dtype.
  """
  out_channels: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = 32
  scale_shift: bool = False
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: Any, emb: jax.Array, *, train: bool) -> jax.Array:
    parts = as_parts(x)
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
    h = GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                  name="norm_1")(parts)
    h = conv3x3(out, self.dtype, "conv_1")(h)
    if self.scale_shift:
      film = nn.Dense(2 * out, dtype=self.dtype, param_dtype=jnp.float32,
                      name="film")(emb)                        # [B, 2 out]
      scale, shift = jnp.split(expand_to(film, h.ndim), 2, axis=-1)
      h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm_2")(h)
      h = nn.swish(h * (1 + scale) + shift)
    else:
      h = h + expand_to(nn.Dense(
          out, use_bias=False, kernel_init=nn.initializers.zeros,
          dtype=self.dtype, param_dtype=jnp.float32, name="cond")(emb), h.ndim)
      h = GroupNorm(self.num_groups, swish=True, dtype=self.dtype,
                    name="norm_2")(h)
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(out, self.dtype, "conv_2", zero_init=True)(h)
    if channels != out:
      x = Dense(out, dtype=self.dtype, name="shortcut")(parts)
    else:
      x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return x.astype(h.dtype) + h


# Most query rows per step of `spatial_attention` on a GPU/TPU.
ACCELERATOR_QUERY_CHUNK = 1024


def query_chunk_size(positions: int, backend: Optional[str] = None) -> int:
  """Query rows per step of `spatial_attention` on `backend` (default: jax's
  default backend).

  CPU: one step up to 256 positions (16x16), else the largest divisor of
  `positions` that is <= positions // 8. Eight steps at 32x32: on 2 CPU
  cores the [B, N, chunk, positions] logits block then stays in cache
  (forward + backward 1.9x faster than the whole matrix at B16 D32, 1.4x at
  B4 D128; 4 or 16 steps were slower at one or the other). At 16x16 one step
  ran 1.3-2.2x faster than 4 (B16 D64, B16 D128, B4 D256), and the
  multi-resolution U-Net's CPU forward + backward 5-17% faster.

  GPU/TPU: the largest divisor <= ACCELERATOR_QUERY_CHUNK. One step at 32x32:
  on an H100 eight steps ran forward + backward 1.9-2.9x slower than one
  (B128: 32x32 D128 6.5 vs 3.4 ms float32, 4.8 vs 2.4 ms bfloat16; 16x16
  D256 1.7 vs 0.6 ms); larger maps are still split so that the logits block
  stays at most 1024 x positions per example and head.
  """
  if positions < 1:
    raise ValueError(f"attention over {positions} positions.")
  if (backend or jax.default_backend()) == "cpu":
    target = positions if positions <= 256 else positions // 8
  else:
    target = ACCELERATOR_QUERY_CHUNK
  return max(c for c in range(1, min(target, positions) + 1)
             if positions % c == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      query_chunk: Optional[int] = None) -> jax.Array:
  """softmax(q k^T) v over all positions, for [B, N heads, H, W, D] operands.

  `q` comes pre-scaled. Logits and softmax in float32, the weights in v's
  dtype. Memory-efficient, in the manner of FlashAttention (Dao et al. 2022,
  arXiv:2205.14135): the queries are processed `query_chunk` rows at a time
  (default `query_chunk_size(H W)`, which depends on the backend; it must
  divide H W), the forward pass keeps only each row's log-sum-exp, and the
  backward pass recomputes each block's weights and uses the paper's row
  identity sum_j P_ij dP_ij = sum_d dO_id O_id. Every contraction is laid out
  as a row-major matmul (keys, values, queries and output gradients
  transposed once to [.., D, HW]): the [B, N, HW, HW] matrix is never formed
  when chunked, and the tiny paper U-Net's CPU train step (attention at
  32x32) is ~1.15x faster than with the whole matrix.
  """
  return _spatial_attention_fwd(q, k, v, query_chunk)[0]


def _attention_chunks(q, query_chunk):
  """[B, N, H, W, D] -> ([B, N, T, D], number of query chunks)."""
  b, n, h, w, d = q.shape
  t = h * w
  chunk = query_chunk or query_chunk_size(t)
  if chunk < 1 or t % chunk:
    raise ValueError(f"query_chunk={chunk} must divide the {t} positions.")
  return q.reshape(b, n, t, d), t // chunk


def _rows(a, chunks):
  """[B, N, T, D] -> [chunks, B, N, T / chunks, D]."""
  b, n, t, d = a.shape
  return jnp.moveaxis(a.reshape(b, n, chunks, t // chunks, d), 2, 0)


def _cols(a, chunks):
  """[B, N, T, D] -> [chunks, B, N, D, T / chunks]."""
  return jnp.swapaxes(_rows(a, chunks), -1, -2)


def _unrows(a):
  """Inverse of `_rows`."""
  c, b, n, t, d = a.shape
  return jnp.moveaxis(a, 0, 2).reshape(b, n, c * t, d)


def _spatial_attention_fwd(q, k, v, query_chunk):
  shape = q.shape
  if q.ndim != 5 or k.shape != shape or v.shape != shape:
    raise ValueError(f"spatial_attention takes q, k, v of one shape [B, N, H, "
                     f"W, D]; got {q.shape}, {k.shape}, {v.shape}.")
  q, chunks = _attention_chunks(q, query_chunk)
  k, v = k.reshape(q.shape), v.reshape(q.shape)
  k_t = jnp.swapaxes(k, -1, -2)                               # [B, N, D, T]

  def block(q_c):                                             # [B, N, c, D]
    logits = jnp.einsum("bncd,bndt->bnct", q_c, k_t,
                        preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bnct,bntd->bncd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    return out.astype(v.dtype), (top + jnp.log(total))[..., 0]

  out, lse = jax.lax.map(block, _rows(q, chunks))   # lse: [chunks, B, N, c]
  out = _unrows(out)
  return out.reshape(shape), (q, k, v, out, lse)


def _spatial_attention_bwd(query_chunk, residuals, d_out):
  del query_chunk                                  # chunks: from lse's shape
  q, k, v, out, lse = residuals
  chunks, shape = lse.shape[0], d_out.shape          # shape: [B, N, H, W, D]
  d_out = d_out.reshape(q.shape).astype(v.dtype)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  row = jnp.moveaxis(row.reshape(row.shape[:2] + (chunks, -1)), 2, 0)
  k_t, v_t = jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2)

  def block(carry, xs):
    d_k_t, d_v_t = carry                              # [B, N, D, T] float32
    q_c, q_c_t, d_out_c, d_out_c_t, lse_c, row_c = xs
    logits = jnp.einsum("bncd,bndt->bnct", q_c, k_t,
                        preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - lse_c[..., None])
    d_v_t += jnp.einsum("bndc,bnct->bndt", d_out_c_t,
                        weights.astype(v.dtype),
                        preferred_element_type=jnp.float32)
    d_weights = jnp.einsum("bncd,bndt->bnct", d_out_c, v_t,
                           preferred_element_type=jnp.float32)
    d_logits = (weights * (d_weights - row_c[..., None])).astype(q.dtype)
    d_q_c = jnp.einsum("bnct,bntd->bncd", d_logits, k,
                       preferred_element_type=jnp.float32)
    d_k_t += jnp.einsum("bndc,bnct->bndt", q_c_t, d_logits,
                        preferred_element_type=jnp.float32)
    return (d_k_t, d_v_t), d_q_c.astype(q.dtype)

  zeros = jnp.zeros(k_t.shape, jnp.float32)
  (d_k_t, d_v_t), d_q = jax.lax.scan(
      block, (zeros, zeros),
      (_rows(q, chunks), _cols(q, chunks), _rows(d_out, chunks),
       _cols(d_out, chunks), lse, row))
  d_k = jnp.swapaxes(d_k_t, -1, -2).astype(k.dtype)
  d_v = jnp.swapaxes(d_v_t, -1, -2).astype(v.dtype)
  return tuple(g.reshape(shape) for g in (_unrows(d_q), d_k, d_v))


spatial_attention.defvjp(_spatial_attention_fwd, _spatial_attention_bwd)


class AttentionBlock(nn.Module):
  """Self-attention over all positions of [B, H, W, C], residual, zero-init
  output projection (Vaswani et al. 2017; as in VDM appendix B).

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups.
    dtype: compute dtype (softmax in float32).
  """
  num_heads: int = 1
  num_groups: int = 32
  dtype: Optional[Dtype] = None

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
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    qkv = nn.Dense(3 * channels, dtype=self.dtype, param_dtype=jnp.float32,
                   name="qkv")(h)
    # [B, N, H, W, D] operands, heads apart from the batch (spatial_attention
    # lays its contractions out as row-major matmuls itself).
    qkv = qkv.reshape(x.shape[:-1] + (3, self.num_heads, head_dim))
    qkv = jnp.moveaxis(qkv, (-3, -2), (1, 2))             # [B, 3, N, H, W, D]
    q = qkv[:, 0] * (1.0 / math.sqrt(head_dim))
    k, v = qkv[:, 1], qkv[:, 2]
    out = spatial_attention(q, k, v)                        # [B, N, H, W, D]
    out = jnp.moveaxis(out, 1, -2)                           # [B, H, W, N, D]
    out = nn.Dense(channels, kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=jnp.float32,
                   name="proj_out")(out.reshape(x.shape))
    return x.astype(out.dtype) + out
