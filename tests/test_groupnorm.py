"""Tests for vdm/nets/groupnorm.py: the GroupNorm kernel, its written-out
backward pass, and the `layers.GroupNorm` module that owns its parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.nets import groupnorm
from vdm.nets import layers


def test_group_norm_matches_numpy():
  x = np.random.RandomState(0).normal(2.0, 3.0, (2, 4, 4, 6)).astype(
      np.float32)
  module = layers.GroupNorm(num_groups=3)
  rs = np.random.RandomState(1)
  variables = {"params": {"scale": rs.normal(size=6).astype(np.float32),
                          "bias": rs.normal(size=6).astype(np.float32)}}
  out = jax.jit(module.apply)(variables, x)
  g = x.astype(np.float64).reshape(2, 4, 4, 3, 2)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  expected = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
  p = variables["params"]
  expected = expected * np.asarray(p["scale"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, swish", [
    ((2, 3, 4, 8), True), ((2, 3, 4, 8), False), ((3, 32), True)])
def test_group_norm_gradients_match_autodiff_of_the_definition(shape, swish):
  # The written-out backward pass against float64 autodiff of the plain
  # two-pass definition, for the input, scale and bias; mean offset 3 (as a
  # ResNet feature might carry) keeps the check away from the easy case.
  rs = np.random.RandomState(7)
  x = rs.normal(size=shape) * 2.0 + 3.0
  scale, bias = rs.normal(size=shape[-1]), rs.normal(size=shape[-1])
  d_out = rs.normal(size=shape)

  def plain(x, scale, bias):
    g = x.reshape(x.shape[:-1] + (4, shape[-1] // 4))
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    return jax.nn.swish(y) if swish else y

  with jax.enable_x64():
    want_out, vjp = jax.vjp(plain, x, scale, bias)
    want = vjp(d_out)
  fn = lambda x, s, b: groupnorm.group_norm(x, s, b, 4, 1e-6, swish)
  out, vjp = jax.vjp(fn, *(jnp.asarray(a, jnp.float32)
                           for a in (x, scale, bias)))
  got = vjp(jnp.asarray(d_out, jnp.float32))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
  # bfloat16 input: gradient in bfloat16, close to the float32 one.
  _, vjp16 = jax.vjp(fn, jnp.asarray(x, jnp.bfloat16),
                     *(jnp.asarray(a, jnp.float32) for a in (scale, bias)))
  d_x16 = vjp16(jnp.asarray(d_out, jnp.float32))[0]
  assert d_x16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(d_x16, np.float64), want[0],
                             atol=0.05 * np.abs(want[0]).max())


def test_group_divisibility_error_names_the_fix():
  groupnorm.check_group_divisibility(12, 4)
  with pytest.raises(ValueError, match=r"net: 12 channels are not divisible "
                     r"by num_groups=5"):
    groupnorm.check_group_divisibility(12, 5, "net")
  with pytest.raises(ValueError, match="num_groups=0"):
    groupnorm.check_group_divisibility(12, 0)
