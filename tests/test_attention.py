"""Tests for vdm/nets/attention.py: the query-chunked attention kernel, its
backward pass, the per-backend chunk choice, and `layers.AttentionBlock`."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import nets
from vdm.nets import attention
from vdm.nets import layers


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_matches_numpy(num_heads):
  x = np.random.RandomState(0).normal(size=(2, 3, 2, 4)).astype(np.float32)
  module = layers.AttentionBlock(num_heads=num_heads, num_groups=2)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rs = np.random.RandomState(num_heads)
  variables = jax.tree_util.tree_map(
      lambda a: rs.normal(size=a.shape).astype(np.float32), shapes)
  out = jax.jit(module.apply)(variables, x)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                             variables["params"])
  g = x.astype(np.float64).reshape(2, 6, 2, 2)             # [B, L, G, C/G]
  g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(
      g.var((1, 3), keepdims=True) + 1e-6)
  h = g.reshape(2, 6, 4) * p["norm"]["scale"] + p["norm"]["bias"]
  qkv = h @ p["qkv"]["kernel"] + p["qkv"]["bias"]             # [B, L, 3 C]
  q, k, v = np.split(qkv, 3, axis=-1)
  d = 4 // num_heads
  heads = []
  for n in range(num_heads):
    s = slice(n * d, (n + 1) * d)
    logits = q[..., s] @ np.swapaxes(k[..., s], 1, 2) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((w / w.sum(-1, keepdims=True)) @ v[..., s])
  attn = np.concatenate(heads, -1) @ p["proj_out"]["kernel"]
  expected = x + (attn + p["proj_out"]["bias"]).reshape(x.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,query_chunk", [
    (jnp.float32, None), (jnp.float32, 3), (jnp.float32, 4),
    (jnp.bfloat16, None), (jnp.bfloat16, 6)])
def test_spatial_attention_gradient_matches_autodiff_of_the_definition(
    dtype, query_chunk):
  # The hand-written, query-chunked backward pass against float64 autodiff
  # of softmax(q k^T) v written plainly over flattened positions (12
  # positions: one chunk for None, else 4, 3 or 2 chunks).
  rs = np.random.RandomState(5)
  shape = (2, 2, 3, 4, 5)                                   # [B, N, H, W, D]
  q, k, v, d_out = (rs.normal(size=shape) for _ in range(4))

  def plain(q, k, v):
    flat = lambda a: a.reshape(2, 2, 12, 5)
    w = jax.nn.softmax(flat(q) @ jnp.swapaxes(flat(k), -1, -2), axis=-1)
    return (w @ flat(v)).reshape(shape)

  with jax.enable_x64():
    want_out, vjp = jax.vjp(plain, q, k, v)
    want = vjp(d_out)
  args = [jnp.asarray(a, dtype) for a in (q, k, v)]
  out, vjp = jax.vjp(
      lambda q, k, v: attention.spatial_attention(q, k, v, query_chunk), *args)
  grads = vjp(jnp.asarray(d_out, dtype))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=tol,
                             atol=tol)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected,
                               rtol=tol, atol=tol * np.abs(expected).max())


def test_query_chunk_size_divides_and_bad_inputs_raise():
  # CPU: one step up to 16x16, then about 8 steps.
  assert attention.query_chunk_size(1024, "cpu") == 128     # 8 steps at 32x32
  assert attention.query_chunk_size(256, "cpu") == 256      # one step at 16x16
  assert attention.query_chunk_size(64, "cpu") == 64
  assert attention.query_chunk_size(784, "cpu") == 98       # 28x28 MNIST
  assert attention.query_chunk_size(49, "cpu") == 49
  # Accelerators: one step up to 1024 rows, then the largest divisor.
  for backend in ("gpu", "tpu"):
    assert attention.query_chunk_size(1024, backend) == 1024
    assert attention.query_chunk_size(4096, backend) == 1024   # 64x64: 4 steps
    assert attention.query_chunk_size(784, backend) == 784
    assert attention.query_chunk_size(1156, backend) == 578     # 34x34
  assert attention.query_chunk_size(1024, "cpu") == 128
  with pytest.raises(ValueError, match="0 positions"):
    attention.query_chunk_size(0, "cpu")
  q = jnp.zeros((1, 1, 3, 4, 2))
  with pytest.raises(ValueError, match="must divide the 12 positions"):
    attention.spatial_attention(q, q, q, 5)
  with pytest.raises(ValueError, match="one shape"):
    attention.spatial_attention(q, q[..., :1], q)


def _scan_lengths(fn, *args):
  """Lengths of the scans in fn's jaxpr (lax.map over query chunks is one)."""
  return [int(n) for n in re.findall(r"length=(\d+)",
                                      str(jax.make_jaxpr(fn)(*args)))]


@pytest.mark.parametrize("backend,chunks", [("cpu", 8), ("gpu", 1),
                                            ("tpu", 1), (None, 1)])
def test_attention_block_chunks_queries_by_its_backend_field(backend, chunks):
  # 32x32 = 1024 positions: 8 chunks of 128 on CPU, one on an accelerator,
  # one when no backend is set; the same function either way.
  x = jnp.asarray(np.random.RandomState(0).normal(size=(1, 32, 32, 4)),
                  jnp.float32)
  module = layers.AttentionBlock(num_groups=2, backend=backend)
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.random.RandomState(1).normal(size=a.shape),
                            a.dtype),
      jax.eval_shape(module.init, jax.random.key(0), x))
  assert _scan_lengths(module.apply, variables, x) == [chunks]
  whole = layers.AttentionBlock(num_groups=2).apply(variables, x)
  # Chunking only reorders float32 sums within a row's softmax.
  np.testing.assert_allclose(module.apply(variables, x), whole, rtol=1e-5,
                             atol=1e-5)


def test_nets_pass_their_backend_and_never_read_it_while_tracing(monkeypatch):
  net = nets.get("vdm_unet", channels=8, num_res_blocks=0, num_groups=2,
                 attention=True, backend="cpu")
  z_t = jnp.zeros((1, 32, 32, 1))
  variables = jax.eval_shape(net.init, jax.random.key(0), z_t, jnp.zeros(1))

  def fail():
    raise AssertionError("jax.default_backend() read while tracing")

  monkeypatch.setattr(jax, "default_backend", fail)
  # Middle attention and one attention after the single up block: 8 chunks.
  assert _scan_lengths(net.apply, variables, z_t, jnp.zeros(1)) == [8, 8]
  gpu = net.clone(backend="gpu")
  assert _scan_lengths(gpu.apply, variables, z_t, jnp.zeros(1)) == [1, 1]
