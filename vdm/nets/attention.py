"""Query-chunked spatial attention with a written-out backward pass.

`spatial_attention` is the kernel; `query_chunk_size` picks its chunk per
backend. The backend is a plain argument: `layers.AttentionBlock` holds it as
a field that `nets.get` fills in when the net is built, so nothing here reads
the default backend while tracing.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Most query rows per step of `spatial_attention` on a GPU/TPU.
ACCELERATOR_QUERY_CHUNK = 1024


def query_chunk_size(positions: int, backend: str) -> int:
  """Query rows per step of `spatial_attention` on `backend`.

  CPU: one step up to 256 positions (16x16), else the largest divisor of
  `positions` that is <= positions // 8 (eight steps at 32x32). GPU/TPU: the
  largest divisor <= ACCELERATOR_QUERY_CHUNK (one step up to 32x32). Why they
  differ: on CPU a [B, N, chunk, positions] logits block that stays in cache
  wins, an accelerator wants the largest matmuls; the measurements are in
  docs/performance.md.

  Args:
    positions: H W, the number of query (and key) positions.
    backend: a `jax.default_backend()` value: 'cpu', or an accelerator
      ('gpu', 'tpu', ...).
  Returns:
    A divisor of `positions`.
  Raises:
    ValueError: positions < 1.
  """
  if positions < 1:
    raise ValueError(f"attention over {positions} positions.")
  if backend == "cpu":
    target = positions if positions <= 256 else positions // 8
  else:
    target = ACCELERATOR_QUERY_CHUNK
  return max(c for c in range(1, min(target, positions) + 1)
             if positions % c == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      query_chunk: Optional[int] = None) -> jax.Array:
  """softmax(q k^T) v over all positions, for [B, N heads, H, W, D] operands.

  Logits and softmax in float32, the weights in v's dtype. Memory-efficient,
  in the manner of FlashAttention (Dao et al. 2022, arXiv:2205.14135): the
  queries are processed `query_chunk` rows at a time, the forward pass keeps
  only each row's log-sum-exp, and the backward pass recomputes each block's
  weights and uses the paper's row identity sum_j P_ij dP_ij = sum_d dO_id
  O_id. Every contraction is laid out as a row-major matmul (keys, values,
  queries and output gradients transposed once to [.., D, HW]); the
  [B, N, HW, HW] matrix is never formed when chunked.

  Args:
    q: [B, N, H, W, D] queries, pre-scaled (by 1 / sqrt(D) in attention).
    k: [B, N, H, W, D] keys.
    v: [B, N, H, W, D] values.
    query_chunk: query rows per step; must divide H W. None: all positions
      in one step. `query_chunk_size` gives the backend's choice.
  Returns:
    [B, N, H, W, D] in v's dtype.
  Raises:
    ValueError: operands of different shapes or not 5-D; a chunk that does
      not divide H W.
  """
  return _spatial_attention_fwd(q, k, v, query_chunk)[0]


def _attention_chunks(q, query_chunk):
  """[B, N, H, W, D] -> ([B, N, T, D], number of query chunks)."""
  b, n, h, w, d = q.shape
  t = h * w
  chunk = query_chunk or t
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
