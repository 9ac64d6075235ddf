r"""Forward + backward of single layers on this backend, to choose defaults.

  python experiments/benchmark_ops.py                 # B=128, as on a GPU
  python experiments/benchmark_ops.py --batch_size 4  # CPU-sized

Times jit(grad(sum(f(...)^2))) (median of --steps calls, compiled with
`vdm.runtime.jit` as training is) of:
- attention (`attention.spatial_attention`) with the backend's default query
  chunking, one chunk, and plain autodiff of softmax(q k^T) v;
- GroupNorm + swish (`groupnorm.group_norm`, its written-out backward)
  against autodiff of the same formula;
- one 3x3 convolution 128 -> 128 at 32x32 (forward, dx and dW), as TFLOP/s,
  the ceiling that the U-Nets' convolutions reach on this backend.
Used for `attention.query_chunk_size`'s accelerator default
(docs/performance.md).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

import _bench  # noqa: E402
from vdm import runtime  # noqa: E402
from vdm.nets import attention  # noqa: E402
from vdm.nets import groupnorm  # noqa: E402


def median_time(fn, args, steps):
  """Median seconds of a steady-state call of `fn(*args)`, compiled as
  training compiles (the first call, with the compile, untimed)."""
  fn = runtime.jit(fn)
  return _bench.time_calls(lambda: fn(*args), steps=steps, warmup=0).median_s


def grad_of(fn, argnums=(0, 1, 2)):
  return jax.grad(lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32))),
                  argnums=argnums)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--dtypes", default="float32,bfloat16")
  args = p.parse_args()
  if args.batch_size < 1 or args.steps < 1:
    p.error("--batch_size and --steps must be >= 1")
  b = args.batch_size
  rng = np.random.default_rng(0)
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}"
        f" jax={jax.__version__} B={b}; milliseconds, fwd+bwd, median of "
        f"{args.steps}")
  for dtype in (jnp.dtype(d) for d in args.dtypes.split(",")):
    for h, d in ((32, 128), (16, 256)):
      t = h * h
      q, k, v = (jnp.asarray(rng.normal(size=(b, 1, h, h, d)) / d**0.25, dtype)
                 for _ in range(3))

      def naive(q, k, v, t=t, d=d):
        flat = lambda a: a.reshape(b, 1, t, d)
        w = jax.nn.softmax(jnp.einsum("bntd,bnsd->bnts", flat(q), flat(k),
                                      preferred_element_type=jnp.float32), -1)
        return jnp.einsum("bnts,bnsd->bntd", w.astype(v.dtype),
                          flat(v)).reshape(q.shape)

      chunk = attention.query_chunk_size(t, jax.default_backend())
      rows = {
          f"default (chunk {chunk})": grad_of(
              lambda q, k, v, chunk=chunk:
              attention.spatial_attention(q, k, v, chunk)),
          "one chunk": grad_of(lambda q, k, v, t=t:
                               attention.spatial_attention(q, k, v, t)),
          "autodiff": grad_of(naive)}
      print(f"attention {dtype.name} {h}x{h} D{d}: " + "  ".join(
          f"{name} {1e3 * median_time(f, (q, k, v), args.steps):.2f}"
          for name, f in rows.items()), flush=True)
    for c in (128, 256):
      x = jnp.asarray(rng.normal(size=(b, 32, 32, c)), dtype)
      scale = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
      bias = jnp.asarray(rng.normal(size=(c,)), jnp.float32)

      def naive_gn(x, scale, bias, c=c):
        xf = x.astype(jnp.float32).reshape(b, 32, 32, 32, c // 32)
        mean = xf.mean((1, 2, 4), keepdims=True)
        var = jnp.maximum(jnp.square(xf).mean((1, 2, 4), keepdims=True)
                          - mean * mean, 0.0)
        y = ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
        return nn.swish(y * scale + bias)

      rows = {"written-out": grad_of(lambda x, s, o: groupnorm.group_norm(
          x, s, o, 32, 1e-6, True)), "autodiff": grad_of(naive_gn)}
      print(f"groupnorm+swish {dtype.name} 32x32 C{c}: " + "  ".join(
          f"{name} {1e3 * median_time(f, (x, scale, bias), args.steps):.2f}"
          for name, f in rows.items()), flush=True)
    x = jnp.asarray(rng.normal(size=(b, 32, 32, 128)), dtype)
    w = jnp.asarray(rng.normal(size=(3, 3, 128, 128)) / 34.0, dtype)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    seconds = median_time(grad_of(conv, (0, 1)), (x, w), args.steps)
    flops = 3 * 2 * b * 32 * 32 * 128 * 128 * 9
    print(f"conv3x3 {dtype.name} 32x32 128->128: {1e3 * seconds:.2f} "
          f"(fwd+dx+dW), {flops / seconds / 1e12:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
  runtime.reexec_with_allocator()   # time the ops as vdm.main runs them
  main()
