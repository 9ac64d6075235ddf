"""Tests for the score networks (vdm/nets: vdm_unet, unet, mlp, `nets.get`):
shapes, conditioning paths, dropout, dtypes, the paper's parameter count, the
official network's function, errors. The kernels and layers have their own
files (test_groupnorm, test_attention, test_parts, test_embeddings,
test_layers).

The nets zero-initialise their output layer and every residual branch's last
layer (so at init each returns exactly z_t). Tests of what the output depends
on therefore first perturb every parameter (`nets_util.perturb`); otherwise
gamma, labels and dropout could be ignored and the test would still pass.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import nets
from vdm import official as official_import
import nets_util

# Tiny configurations, one per net (widths divisible by num_groups=4).
TINY = {
    "vdm_unet": dict(channels=16, num_res_blocks=1, num_groups=4, dropout=0.1),
    "unet": dict(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_groups=4, dropout=0.1),
    "mlp": dict(hidden=16, num_res_blocks=2, num_groups=2, dropout=0.1),
}
SHAPES = {"vdm_unet": (3, 8, 8, 3), "unet": (3, 8, 8, 3), "mlp": (3, 2)}


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def init_jit(net, z_t):
  """Variables of `net` for input z_t, initialised under jit (one compile
  instead of one per eager op). The 'rbg' key halves the compile time of the
  ~100 random initialisers on CPU (threefry is expanded per tensor)."""
  key = jax.random.key(1, impl="rbg")
  return jax.jit(net.init)(key, z_t, jnp.zeros(z_t.shape[0]))


def random_variables(net, z_t, seed=0, scale=0.2):
  """N(0, scale^2) parameters of the right shapes; eval_shape, no compile."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), z_t,
                          jnp.zeros(z_t.shape[0]))
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(scale * rs.normal(size=x.shape), x.dtype), shapes)


def make(name, shape=None, **overrides):
  """(net, z_t, random variables) for a tiny net."""
  net = nets.get(name, **{**TINY[name], **overrides})
  z_t = jax.random.normal(jax.random.key(0), shape or SHAPES[name])
  return net, z_t, random_variables(net, z_t)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
  """One tiny net per name, conditional on 3 classes: its initial and its
  perturbed variables, and jitted train and eval applies shared by tests."""
  name = request.param
  net = nets.get(name, **TINY[name], num_classes=3)
  z_t = jax.random.normal(jax.random.key(0), SHAPES[name])
  initial = init_jit(net, z_t)
  variables = nets_util.perturb(initial, 2)
  apply = jax.jit(lambda v, z, g, y, key: net.apply(
      v, z, g, y, train=True, rngs={"dropout": key}))
  apply_eval = jax.jit(lambda v, z, g, y: net.apply(v, z, g, y, train=False))
  return name, net, z_t, variables, apply, apply_eval, initial


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,shape,kwargs", [
    ("vdm_unet", (1, 32, 32, 1), {"attention": True}),
    ("unet", (3, 28, 28, 1), {"channel_mult": (1, 2, 2),
                              "attention_resolutions": (7,)}),
    ("mlp", (1, 8, 8, 3), {}),
])
def test_output_shapes_and_dtype(name, shape, kwargs):
  net, z_t, variables = make(name, shape, **kwargs)
  out = jax.jit(net.apply)(variables, z_t, jnp.linspace(-5.0, 5.0, shape[0]))
  assert out.shape == shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out - z_t).max()) > 1e-3


def test_fixture_nets_shapes_zero_init_and_no_skip(tiny):
  name, net, z_t, variables, _, apply_eval, initial = tiny
  gamma = jnp.linspace(-5.0, 5.0, z_t.shape[0])
  out = apply_eval(variables, z_t, gamma, None)
  assert out.shape == z_t.shape and out.dtype == jnp.float32
  # Zero-initialised output layer + skip from z: at init eps_hat = z_t.
  np.testing.assert_array_equal(apply_eval(initial, z_t, gamma, None), z_t)
  no_skip = nets.get(name, **TINY[name], num_classes=3, z_skip=False)
  out_no_skip = jax.jit(no_skip.apply)(variables, z_t, gamma)
  np.testing.assert_allclose(out_no_skip, out - z_t, rtol=1e-5, atol=1e-5)


def test_mlp_on_images_is_mlp_on_flattened_vectors():
  net, z_t, variables = make("mlp", (3, 4, 4, 2))
  gamma = jnp.array([-3.0, 0.0, 2.0])
  out_img = jax.jit(net.apply)(variables, z_t, gamma)
  out_vec = jax.jit(net.apply)(variables, z_t.reshape(3, -1), gamma)
  assert out_img.shape == (3, 4, 4, 2)
  np.testing.assert_allclose(out_img.reshape(3, -1), out_vec, rtol=1e-6,
                             atol=1e-6)


# ------------------------------------------------- parameter count (paper)
def _paper_unet_count(num_res_blocks, channels, in_channels=3,
                      num_exponents=2):
  """Closed-form parameter count of the VDM paper U-Net, by hand."""
  c, e = channels, 4 * channels
  conv = lambda cin, cout: 9 * cin * cout + cout
  norm = lambda ch: 2 * ch
  embedding = (c * e + e) + (e * e + e)
  conv_in = conv(in_channels * (1 + 2 * num_exponents), c)
  block = norm(c) + conv(c, c) + e * c + norm(c) + conv(c, c)
  up_block = (norm(2 * c) + conv(2 * c, c) + e * c + norm(c) + conv(c, c)
              + 2 * c * c + c)                                # + 1x1 shortcut
  attention = norm(c) + 4 * (c * c + c)                       # q, k, v, out
  out = norm(c) + conv(c, in_channels)
  return (embedding + conv_in + (num_res_blocks + 2) * block
          + (num_res_blocks + 1) * up_block + attention + out)


@pytest.mark.parametrize("num_res_blocks,channels,official", [
    (32, 128, 30_578_179),   # the paper's CIFAR-10 setting
    (2, 32, 223_555),        # the peer benchmark's `tiny` preset
])
def test_vdm_unet_param_count_matches_paper_and_official(num_res_blocks,
                                                         channels, official):
  # num_groups does not change the count; 8 keeps >= 2 channels per group.
  net = nets.get("vdm_unet", num_res_blocks=num_res_blocks, channels=channels,
                 num_groups=8)
  shapes = jax.eval_shape(net.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.float32))
  count = num_params(shapes)
  assert count == _paper_unet_count(num_res_blocks, channels)
  # Official score model (google-research/vdm@dc27b98, bench_official.py
  # score_model_param_count): its first embedding Dense also reads a
  # conditioning scalar (always 0 for CIFAR-10): 4 * channels more weights.
  assert count == official - 4 * channels
  assert abs(count - official) / official < 0.01
  if num_res_blocks == 32:
    assert count == 30_577_667


@pytest.mark.skipif(not os.path.isfile(nets_util.OFFICIAL_MODEL),
                    reason=nets_util.NO_OFFICIAL_MODEL)
@pytest.mark.parametrize("attention", [False, True])
def test_vdm_unet_equals_official_network_with_mapped_params(attention):
  """Same function as the official ScoreUNet (google-research/vdm@dc27b98),
  given its parameters: the strongest fidelity check of the architecture.
  model_vdm.py is loaded by path under another name (no `vdm` shadowing)."""
  official = nets_util.load_official_model()
  config = nets_util.official_config(official, with_attention=attention)
  score_unet = official.ScoreUNet(config)
  z_t = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  gamma = jnp.array([-13.0, 0.0, 4.5])
  cond = jnp.zeros(3)
  p = jax.jit(lambda key: score_unet.init(key, z_t, gamma, cond, True))(
      jax.random.key(0, impl="rbg"))["params"]
  p = nets_util.perturb(p, 5, scale=0.2)
  expected = jax.jit(lambda p: score_unet.apply({"params": p}, z_t, gamma,
                                                cond, True))(p)

  # The mapping the checkpoint import uses (vdm/official.py).
  mapped = official_import.map_score_unet(p)
  assert official_import.architecture(p) == {
      "num_res_blocks": 1, "channels": 64, "attention": attention,
      "fourier_features": True}
  net = nets.get("vdm_unet", num_res_blocks=1, channels=64,
                 attention=attention)
  out = jax.jit(net.apply)({"params": mapped}, z_t, gamma)
  assert float(jnp.abs(expected - z_t).max()) > 0.1       # not trivially z
  # Same operations in the same order: equal up to float32 reassociation.
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- conditioning
def test_output_depends_on_gamma_per_example(tiny):
  name, net, z_t, variables, _, apply_eval, _ = tiny
  z_same = jnp.broadcast_to(z_t[:1], z_t.shape)
  gamma = jnp.array([-10.0, 0.0, 4.0])
  out = apply_eval(variables, z_same, gamma, None)
  # Same input, different gamma per example -> different outputs.
  diffs = [float(jnp.abs(out[i] - out[j]).max()) for i, j in [(0, 1), (1, 2)]]
  assert min(diffs) > 1e-3, (name, diffs)
  # Example i depends on z_i and gamma_i only: changing example 0 leaves
  # the others unchanged (no statistics across the batch).
  changed = apply_eval(variables, z_same.at[0].multiply(-2.0),
                       gamma.at[0].set(2.0), None)
  assert float(jnp.abs(changed[0] - out[0]).max()) > 1e-3
  np.testing.assert_allclose(changed[1:], out[1:], rtol=1e-5, atol=1e-5)


def test_scalar_gamma_broadcasts():
  net, z_t, variables = make("mlp")
  apply = jax.jit(net.apply)
  # Different traces (scalar vs [B]); 1e-4 covers fusion-order rounding.
  np.testing.assert_allclose(apply(variables, z_t, 0.5),
                             apply(variables, z_t, jnp.full((3,), 0.5)),
                             rtol=1e-4, atol=1e-4)


def test_labels_change_output_and_none_is_null_label(tiny):
  name, net, z_t, variables, _, apply_eval, _ = tiny
  table = variables["params"]["embedding"]["label_embedding"]["embedding"]
  assert table.shape[0] == 3 + 1                  # num_classes + null row
  gamma = jnp.zeros(z_t.shape[0])
  out_0 = apply_eval(variables, z_t, gamma, jnp.zeros(3, jnp.int32))
  out_1 = apply_eval(variables, z_t, gamma, jnp.ones(3, jnp.int32))
  out_none = apply_eval(variables, z_t, gamma, None)
  out_null = apply_eval(variables, z_t, gamma, jnp.full(3, 3, jnp.int32))
  assert float(jnp.abs(out_0 - out_1).max()) > 1e-3, name
  assert float(jnp.abs(out_0 - out_none).max()) > 1e-3, name
  np.testing.assert_array_equal(out_none, out_null)


# ---------------------------------------------------------------- dropout
def test_dropout_uses_its_rng_and_is_off_in_eval(tiny):
  name, net, z_t, variables, apply, apply_eval, _ = tiny
  gamma = jnp.zeros(z_t.shape[0])
  out_a = apply(variables, z_t, gamma, None, jax.random.key(10))
  out_a2 = apply(variables, z_t, gamma, None, jax.random.key(10))
  out_b = apply(variables, z_t, gamma, None, jax.random.key(11))
  np.testing.assert_array_equal(out_a, out_a2)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-3, name
  # Eval: no rng needed, deterministic, and differs from a train draw.
  out_eval = apply_eval(variables, z_t, gamma, None)
  np.testing.assert_array_equal(out_eval,
                                apply_eval(variables, z_t, gamma, None))
  assert float(jnp.abs(out_eval - out_a).max()) > 1e-3


# ------------------------------------------------------------------ dtype
def test_bfloat16_compute_returns_float32_close_to_float32(tiny):
  name, net, z_t, variables, _, apply_eval, _ = tiny
  # z_skip=False: the output is the network's own (bf16-computed) result.
  net_bf16 = nets.get(name, **TINY[name], num_classes=3, dtype=jnp.bfloat16,
                      z_skip=False)
  shapes = jax.eval_shape(net_bf16.init, jax.random.key(1), z_t,
                          jnp.zeros(z_t.shape[0]))
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {
      jnp.dtype(jnp.float32)}
  gamma = jnp.array([-4.0, 0.0, 3.0])
  out_32 = apply_eval(variables, z_t, gamma, None) - z_t
  out_16 = jax.jit(net_bf16.apply)(variables, z_t, gamma)
  assert out_16.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits (rel. 4e-3 per op); a few layers of
  # rounding stay within a few percent of the output's scale.
  scale = float(jnp.abs(out_32).max())
  assert float(jnp.abs(out_16 - out_32).max()) < 0.05 * scale
  assert float(jnp.abs(out_16 - out_32).max()) > 0.0     # it did use bf16


# ----------------------------------------------------------------- errors
def _init(net, shape):
  # Errors are raised while tracing: eval_shape compiles nothing.
  jax.eval_shape(net.init, jax.random.key(0), jnp.zeros(shape),
                 jnp.zeros(shape[0]))


@pytest.mark.parametrize("make_net,shape,exc,match", [
    (lambda: nets.get("unet", **{**TINY["unet"], "channel_mult": (1, 2, 2, 2),
                                 "attention_resolutions": ()}),
     (1, 28, 28, 1), ValueError,
     r"divisible by 8; got 28x28\. Use at most 3 levels"),
    (lambda: nets.get("unet", **TINY["unet"]), (1, 9, 8, 1), ValueError,
     r"divisible by 2; got 9x8"),
    (lambda: nets.get("unet", **{**TINY["unet"],
                                 "attention_resolutions": (16,)}),
     (1, 8, 8, 1), ValueError, r"\[16\], which no level has.*\[8, 4\]"),
    (lambda: nets.get("vdm_unet", channels=24, num_res_blocks=1),
     (1, 8, 8, 3),
     ValueError, r"24 channels are not divisible by num_groups=32"),
    (lambda: nets.get("vdm_unet", channels=32, num_res_blocks=1),
     (1, 8, 8, 3),
     ValueError, r"one channel per group.*use num_groups <= 16"),
    (lambda: nets.get("unet", **{**TINY["unet"], "channels": 6}),
     (1, 8, 8, 3), ValueError, r"6 channels are not divisible by num_groups=4"),
    (lambda: nets.get("mlp", hidden=10, num_groups=4), (2, 2), ValueError,
     r"10 channels are not divisible by num_groups=4"),
    (lambda: nets.get("vdm_unet", **TINY["vdm_unet"]), (2, 5), ValueError,
     r"shape \[B, H, W, C\]; got shape \(2, 5\)"),
    (lambda: nets.get("vdm_unet", **TINY["vdm_unet"], fourier_min=8),
     (1, 8, 8, 3), ValueError, r"fourier_min < fourier_max"),
    (lambda: nets.get("mlp", **{**TINY["mlp"], "dropout": 1.0}), (2, 2),
     ValueError,
     r"dropout must be in \[0, 1\); got 1.0"),
])
def test_construction_errors(make_net, shape, exc, match):
  with pytest.raises(exc, match=match):
    _init(make_net(), shape)


def test_unknown_net_name():
  with pytest.raises(ValueError, match=r"unknown net 'resnet'; known: "
                     r"vdm_unet, unet, mlp"):
    nets.get("resnet")


def test_dtype_by_name():
  assert nets.get("mlp", dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="unknown compute dtype 'int8'"):
    nets.get("mlp", dtype="int8")


def test_unknown_net_field():
  with pytest.raises(TypeError, match="hiden"):
    nets.get("mlp", hiden=3)


@pytest.mark.parametrize("name,old", [("vdm_unet", "n_blocks"),
                                      ("mlp", "num_blocks")])
def test_old_block_count_names_say_the_new_one(name, old):
  with pytest.raises(TypeError, match=f"{old!r} is now called "
                     "'num_res_blocks'"):
    nets.get(name, **{old: 2})


def test_backend_is_resolved_when_the_net_is_built():
  # None -> the default backend at build time, kept as a field (nothing
  # reads it while tracing); an explicit one is kept; the MLP has none.
  assert nets.get("vdm_unet").backend == jax.default_backend()
  assert nets.get("unet", backend="gpu").backend == "gpu"
  assert "backend" not in nets.MLP.__dataclass_fields__
  assert nets.get("mlp", backend="gpu").hidden == nets.MLP.hidden


def test_call_errors():
  # Raised while tracing: eval_shape compiles nothing.
  net, z_t, variables = make("mlp")
  apply = lambda *args: jax.eval_shape(net.apply, variables, z_t, *args)
  with pytest.raises(ValueError, match=r"num_classes=0 \(unconditional"):
    apply(0.0, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match=r"gamma_t must have shape \[\] or "
                     r"\[B\] = \(3,\); got \(2,\)"):
    apply(jnp.zeros(2))
  cond, z_t, variables = make("mlp", num_classes=2)
  apply = lambda *args: jax.eval_shape(cond.apply, variables, z_t, *args)
  with pytest.raises(TypeError, match="labels must be integers"):
    apply(0.0, jnp.zeros(3))
  with pytest.raises(ValueError, match=r"labels must have shape \[B\]"):
    apply(0.0, jnp.zeros((3, 1), jnp.int32))


