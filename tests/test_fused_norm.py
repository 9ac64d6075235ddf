"""Tests for vdm/nets/fused_norm.py: the fused GroupNorm + swish + dropout
Pallas kernel, run in the Pallas interpreter on the CPU against the plain
`groupnorm.group_norm` (+ `layers.Dropout`), its Triton lowering for the GPU
(lowered here without a GPU), and its selection by `nets.get`."""
import functools

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import nets
from vdm.nets import fused_norm
from vdm.nets import groupnorm
from vdm.nets import layers
import nets_util

SHAPE = (2, 4, 4, 16)      # 16 rows, 16 channels
GROUPS = 4                 # group size 4
THRESHOLD = 58982          # round(0.9 * 2^16): dropout rate 0.1


def _inputs(dtype):
  rs = np.random.RandomState(0)
  # Mean offset 3: the statistics are not the easy zero-mean case.
  x = jnp.asarray(rs.normal(size=SHAPE) * 2.0 + 3.0, dtype)
  scale = jnp.asarray(rs.normal(size=SHAPE[-1]), jnp.float32)
  bias = jnp.asarray(rs.normal(size=SHAPE[-1]), jnp.float32)
  bits = jnp.asarray(rs.randint(0, 65536, size=SHAPE), jnp.uint16)
  cotangent = jnp.asarray(rs.normal(size=SHAPE), jnp.float32)
  return x, scale, bias, bits, cotangent


def _plain(x, scale, bias, bits, *, swish, dropout):
  """groupnorm.group_norm, then Dropout's where(bits < t, y / keep, 0)."""
  y = groupnorm.group_norm(x, scale, bias, GROUPS, 1e-6, swish)
  if dropout:
    y = jnp.where(bits < THRESHOLD, y * (65536.0 / THRESHOLD), 0.0)
  return y.astype(x.dtype)


def _fused(x, scale, bias, bits, *, swish, dropout, block_width):
  return fused_norm.group_norm(
      x, scale, bias, num_groups=GROUPS, swish=swish,
      dropout_bits=bits if dropout else None,
      keep_threshold=THRESHOLD if dropout else 65536, interpret=True,
      block_width=block_width)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _value_and_grads(fused, swish, dropout, block_width, x, scale, bias,
                     bits, cotangent):
  fn = (functools.partial(_fused, block_width=block_width) if fused
        else _plain)
  f = lambda x, s, b: fn(x, s, b, bits, swish=swish, dropout=dropout)
  y, vjp = jax.vjp(f, x, scale, bias)
  return (y,) + vjp(cotangent.astype(y.dtype))


# bf16 tolerances: the output is rounded to bf16 (relative step 2^-8 = 0.4%)
# and |y| reaches ~5 (swish of a 3-sigma input times |scale| ~2), so 0.05;
# gradients sum ~32 bf16 products per group, hence the looser 0.1 on them.
@pytest.mark.parametrize("dtype, atol, grad_atol", [
    (jnp.float32, 2e-5, 1e-4), (jnp.bfloat16, 5e-2, 1e-1)])
@pytest.mark.parametrize("swish, dropout, block_width", [
    (True, True, 8),     # two channel blocks per example (two groups each)
    (True, False, None),  # one block of all 16 channels
    (False, False, 4)])   # one group per block, no swish
def test_kernel_matches_plain_group_norm_values_and_gradients(
    dtype, atol, grad_atol, swish, dropout, block_width):
  args = _inputs(dtype)
  got = _value_and_grads(True, swish, dropout, block_width, *args)
  want = _value_and_grads(False, swish, dropout, None, *args)
  assert got[0].dtype == dtype and got[1].dtype == dtype
  for name, g, w, tol in zip(("y", "d_x", "d_scale", "d_bias"), got, want,
                             (atol, grad_atol, grad_atol, grad_atol)):
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=tol,
                               rtol=tol, err_msg=name)
  if dropout:   # dropped elements are exactly zero, and ~10% are dropped
    dropped = np.asarray(args[3]) >= THRESHOLD
    assert np.all(np.float32(got[0])[dropped] == 0.0)
    assert 0.05 < dropped.mean() < 0.15


def test_kernel_statistics_are_float32_for_bf16_input():
  # A group with mean 100 and std 0.5: bf16 statistics would lose the std
  # (bf16 resolves 100 only to 0.5); float32 ones recover the unit output.
  rs = np.random.RandomState(3)
  x = (100.0 + 0.5 * rs.normal(size=SHAPE)).astype(np.float32)
  x_bf16 = jnp.asarray(x, jnp.bfloat16)
  ones, zeros = jnp.ones(SHAPE[-1]), jnp.zeros(SHAPE[-1])
  y = fused_norm.group_norm(x_bf16, ones, zeros, num_groups=GROUPS,
                            swish=False, out_dtype=jnp.float32,
                            interpret=True)
  want = groupnorm.group_norm(x_bf16, ones, zeros, GROUPS, 1e-6, False)
  np.testing.assert_allclose(y, want, atol=1e-4)
  g = np.float64(y).reshape(2, 16, GROUPS, 4)
  np.testing.assert_allclose(g.std(axis=(1, 3)), 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_unets():
  # No down/up blocks: mid blocks, attention, one up block (a [h, skip]
  # part pair), norm_out: every kind of norm the net has.
  kwargs = dict(channels=16, num_res_blocks=0, num_groups=4, dropout=0.1,
                fourier_max=7)
  plain = nets.get("vdm_unet", backend="cpu", **kwargs)
  fused = nets.get("vdm_unet", backend="cpu", fused_norm=True, **kwargs)
  z = jnp.asarray(np.random.RandomState(1).normal(size=(2, 4, 4, 3)),
                  jnp.float32)
  gamma = jnp.array([-3.0, 2.0])
  variables = nets_util.perturb(
      jax.jit(plain.init)({"params": jax.random.key(0)}, z, gamma), seed=2)
  return plain, fused, variables, z, gamma


def test_vdm_unet_with_the_kernel_computes_the_same_function(tiny_unets):
  # Train mode: the fused norm draws the same dropout bits (same module and
  # rng) as layers.Dropout, so the two nets agree to float32 rounding,
  # gradients of every parameter included.
  plain, fused, variables, z, gamma = tiny_unets
  assert plain.fused_norm is None and fused.fused_norm == "interpret"

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grads(net, variables):
    def loss(params):
      eps = net.apply({"params": params}, z, gamma, train=True,
                      rngs={"dropout": jax.random.key(4)})
      return jnp.sum(jnp.sin(3.0 * eps)), eps
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])

  (loss_f, eps_f), grads_f = loss_and_grads(fused, variables)
  (loss_p, eps_p), grads_p = loss_and_grads(plain, variables)
  np.testing.assert_allclose(eps_f, eps_p, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss_f, loss_p, rtol=1e-5)
  flat_f = jax.tree_util.tree_leaves_with_path(grads_f)
  flat_p = jax.tree_util.tree_leaves(grads_p)
  for (path, g_f), g_p in zip(flat_f, flat_p):
    np.testing.assert_allclose(g_f, g_p, atol=1e-4, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  # Dropout matters here: eval mode gives a different output.
  eps_eval = jax.jit(plain.apply)(variables, z, gamma)
  assert float(jnp.max(jnp.abs(eps_eval - eps_p))) > 1e-3


def test_the_kernel_lowers_to_triton_for_the_gpu():
  # No GPU here: export for 'cuda' runs the Pallas Triton lowering (block
  # shapes, ops), forward and backward, at the CIFAR-10 shape in bf16.
  def loss(x, scale, bias, bits):
    y = fused_norm.group_norm(x, scale, bias, num_groups=32,
                              dropout_bits=bits, keep_threshold=THRESHOLD)
    return jnp.sum(y.astype(jnp.float32))

  sds = jax.ShapeDtypeStruct
  args = (sds((2, 32, 32, 128), jnp.bfloat16), sds((128,), jnp.float32),
          sds((128,), jnp.float32), sds((2, 32, 32, 128), jnp.uint16))
  exported = export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "__gpu$xla.gpu.triton")])(*args)
  text = exported.mlir_module()
  assert text.count("xla.gpu.triton") == 1      # the forward kernel
  assert "grid_x = 2" in text and "grid_y = 8" in text  # 8 blocks of 16


@pytest.mark.parametrize("shape, groups, width", [
    ((128, 32, 32, 128), 32, 16),   # CIFAR-10: 1024 rows x 16 channels
    ((2, 4, 4, 16), 4, 16),         # small: all channels in one block
    ((2, 8, 8, 256), 8, 256),       # 64 rows: up to 256 channels
    ((2, 28, 28, 32), 8, 0),        # 784 rows: not a power of 2
    ((2, 4, 4, 24), 4, 0),          # group size 6
])
def test_block_channels_and_supported(shape, groups, width):
  rows = shape[1] * shape[2]
  assert fused_norm.block_channels(rows, shape[-1], groups) == width
  assert fused_norm.supported(shape, groups) == (width > 0)
  assert not fused_norm.supported((2, 16), 4)      # [B, C] stays plain


def test_errors_say_what_is_wrong():
  x, scale, bias, bits, _ = _inputs(jnp.float32)
  with pytest.raises(ValueError, match="powers of 2"):
    fused_norm.group_norm(x[:, :3], scale, bias, num_groups=GROUPS)
  with pytest.raises(ValueError, match=r"scale and bias must be \[16\]"):
    fused_norm.group_norm(x, scale[:8], bias, num_groups=GROUPS)
  with pytest.raises(ValueError, match="keep_threshold must be in"):
    fused_norm.group_norm(x, scale, bias, num_groups=GROUPS,
                          keep_threshold=0)
  with pytest.raises(ValueError, match="needs dropout_bits"):
    fused_norm.group_norm(x, scale, bias, num_groups=GROUPS,
                          keep_threshold=THRESHOLD)
  with pytest.raises(ValueError, match="block_width=2 must be"):
    fused_norm.group_norm(x, scale, bias, num_groups=GROUPS, block_width=2)
  with pytest.raises(ValueError, match="dropout_bits need the fused"):
    layers.GroupNorm(GROUPS).init(jax.random.key(0), x, bits, THRESHOLD)
  with pytest.raises(ValueError, match="fused_norm='gpu' is unknown"):
    layers.GroupNorm(GROUPS, fused_norm="gpu").init(jax.random.key(0), x)


@pytest.mark.parametrize("choice, backend, kind", [
    ("auto", "cpu", None), ("auto", "tpu", None), ("auto", "gpu", "triton"),
    (True, "gpu", "triton"), ("on", "cpu", "interpret"), ("off", "gpu", None),
    (False, "gpu", None)])
def test_nets_get_selects_the_kernel_per_backend(choice, backend, kind):
  assert nets.resolve_fused_norm(choice, backend) == kind
  net = nets.get("vdm_unet", backend=backend, fused_norm=choice)
  assert net.fused_norm == kind
  # Default 'auto': the CPU keeps the plain function (the demo's path).
  assert nets.get("vdm_unet", backend="cpu").fused_norm is None


def test_nets_get_rejects_bad_fused_norm_choices():
  with pytest.raises(ValueError, match="unknown fused_norm 'yes'"):
    nets.get("vdm_unet", fused_norm="yes")
  with pytest.raises(ValueError, match="unknown fused_norm 1"):
    nets.resolve_fused_norm(1, "gpu")
  with pytest.raises(ValueError, match="unknown fused_norm None"):
    nets.resolve_fused_norm(None, "gpu")
  with pytest.raises(TypeError, match="only 'vdm_unet' takes it"):
    nets.get("unet", fused_norm=True)
