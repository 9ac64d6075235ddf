"""Tests for vdm/nets/parts.py: convolutions and dense layers over channel
parts, and the layers that take parts (GroupNorm, ResnetBlock), against the
same modules on the concatenated input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.nets import layers
from vdm.nets import parts
import nets_util


def test_channel_parts_equal_the_concatenated_input():
  # GroupNorm (groups aligned with the parts, and not: concatenated then),
  # Conv3x3, Dense and a whole ResnetBlock on (h, skip) against the same
  # modules, same parameters, on concatenate([h, skip]).
  rs = np.random.RandomState(11)
  h = jnp.asarray(rs.normal(size=(2, 5, 6, 8)), jnp.float32)
  skip = jnp.asarray(rs.normal(size=(2, 5, 6, 4)) * 3 + 1, jnp.float32)
  whole = jnp.concatenate([h, skip], axis=-1)
  for num_groups in (4, 3):                 # group size 3 straddles the parts
    norm = layers.GroupNorm(num_groups, swish=True)
    v = nets_util.perturb(norm.init(jax.random.key(0), whole), 1)
    got = norm.apply(v, (h, skip))
    assert isinstance(got, tuple)
    np.testing.assert_allclose(np.concatenate(got, -1), norm.apply(v, whole),
                               rtol=1e-5, atol=1e-5)
  for module in (parts.Conv3x3(7), parts.Dense(7)):
    v = nets_util.perturb(module.init(jax.random.key(0), whole), 2)
    np.testing.assert_allclose(module.apply(v, (h, skip)),
                               module.apply(v, whole), rtol=1e-5, atol=1e-5)
  block = layers.ResnetBlock(8, num_groups=4)
  emb = jnp.asarray(rs.normal(size=(2, 16)), jnp.float32)
  v_parts = block.init(jax.random.key(3), (h, skip), emb, train=False)
  v = block.init(jax.random.key(3), whole, emb, train=False)
  jax.tree.map(np.testing.assert_array_equal, v_parts, v)  # same params
  v = nets_util.perturb(v, 4)

  def loss(v, h, skip, parts):
    x = (h, skip) if parts else jnp.concatenate([h, skip], axis=-1)
    return jnp.sum(jnp.sin(block.apply(v, x, emb, train=False)))

  grads = [jax.grad(loss, (0, 1, 2))(v, h, skip, parts) for parts in (1, 0)]
  for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv3x3_gradients_equal_autodiff_also_inside_a_loop(dtype):
  # conv3x3_same writes the input's gradient as a forward convolution with
  # the flipped kernel: the same numbers as autodiff of lax's convolution,
  # alone and inside a fori_loop (where it is there to be faster).
  rs = np.random.RandomState(5)
  x = jnp.asarray(rs.normal(size=(2, 7, 6, 5)), dtype)
  kernel = jnp.asarray(rs.normal(size=(3, 3, 5, 4)) * 0.3, dtype)
  d_out = jnp.asarray(rs.normal(size=(2, 7, 6, 4)), dtype)
  plain = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def grads(conv, x):
    out, vjp = jax.vjp(conv, x, kernel)
    return (out,) + vjp(d_out)

  tol = 2e-2                       # bfloat16
  want = jax.jit(lambda x: grads(plain, x))(x)
  got = jax.jit(lambda x: grads(parts.conv3x3_same, x))(x)
  # In a loop: iteration i takes (i + 1) x; the last one's are 2 x's.
  looped = jax.jit(lambda x: jax.lax.fori_loop(
      0, 2, lambda i, c: grads(parts.conv3x3_same,
                               x * (i + 1).astype(x.dtype)),
      grads(plain, x)))(x)
  want_2 = jax.jit(lambda x: grads(plain, 2 * x))(x)
  for g, w in zip(got + looped, want + want_2):
    if dtype == jnp.float32:             # float32: the same bits
      np.testing.assert_array_equal(g, w)
      continue
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(w, np.float32), atol=tol * scale)


def test_conv3x3_and_dense_initialise_as_flax():
  # Same parameter names, shapes and initial values as flax.linen's modules:
  # checkpoints and the official-weights mapping stay valid.
  x = jnp.ones((1, 4, 4, 6))
  for ours, theirs in [
      (parts.Conv3x3(5), nn.Conv(5, (3, 3), padding="SAME")),
      (parts.Conv3x3(5, zero_init=True),
       nn.Conv(5, (3, 3), kernel_init=nn.initializers.zeros)),
      (parts.Dense(5), nn.Dense(5))]:
    a, b = ours.init(jax.random.key(7), x), theirs.init(jax.random.key(7), x)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_allclose(ours.apply(a, x), theirs.apply(b, x),
                               rtol=1e-6, atol=1e-6)


def test_channel_parts_errors():
  with pytest.raises(ValueError, match="empty tuple"):
    parts.as_parts(())
  with pytest.raises(ValueError, match="agree on all but the last axis"):
    parts.as_parts((jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5, 2))))
  with pytest.raises(ValueError, match=r"takes \[B, H, W, C\]"):
    parts.Conv3x3(3).init(jax.random.key(0), jnp.zeros((4, 2)))
