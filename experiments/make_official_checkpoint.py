#!/usr/bin/env python3
"""Writes tests/data/official_tiny/: a checkpoint of a tiny OFFICIAL VDM model.

Runs in the official code's venv (experiments/peer_env.sh), never with this
library (the official code registers itself as the package `vdm`):

  PEER_DIR=../shared/peers/google-research-vdm \\
      experiments/.peer-venv/bin/python experiments/make_official_checkpoint.py

What it writes (read by tests/test_official.py):
  checkpoints-0.tar.xz  the folder `checkpoints-0/` exactly as the official
      `Experiment.train_and_evaluate` writes it (clu
      `checkpoint.MultihostCheckpoint(WORKDIR/checkpoints).save(state)`: a
      msgpack `ckpt-1.flax` of the official `TrainState` plus clu's
      TensorFlow index files), packed with tar + xz because its float32
      weights, their EMA copy and the Adam moments are ~10 MB raw;
  official_config.json  the official ml_collections config it was built from
      (the official configs/cifar10.py with sm_n_layer=1, sm_n_embd=64);
  batch.npz  4 images (uint8, 32x32x3) and the draws the official loss used
      on them: eps_0 [4, 32, 32, 3], t [4], eps [4, 32, 32, 3];
  official_elbo.json  the official `Experiment_VDM.loss_fn` (is_train=False,
      the eval path) on that batch with the EMA parameters: bpd, bpd_recon,
      bpd_latent, bpd_diff, and the per-example nats loss_recon, loss_klz,
      loss_diff of `VDM.__call__`; also for the raw parameters.

The model: the official configs/cifar10.py (learned scalar schedule,
Fourier features, no block attention) at sm_n_layer=1, sm_n_embd=64 (64
channels in the official GroupNorm's fixed 32 groups: 2 per group, the
fewest at which the network can see gamma at all). Its parameters are the
official random init plus N(0, 0.05^2) noise, so the zero-initialised output
layer does not hide the network, rounded to multiples of 1/64 so the archive
compresses (~4 bits per weight); the EMA copy differs from the raw one (so
a test can tell which one it read), and the schedule is moved off its
initial values (raw b = -12.0, w = 16.5: gamma in [-12, 4.5]; EMA b =
-12.25, w = 16.5).
"""
import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.dont_write_bytecode = True       # keep the shared peer folder clean

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER = os.path.join(HERE, "..", "..", "shared", "peers",
                            "google-research-vdm")
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "official_tiny")
SEED = 0
BATCH = 4


def _register_official(peer_dir: str) -> None:
  """The official code imports itself as `vdm`: register its folder so."""
  if not os.path.isfile(os.path.join(peer_dir, "experiment_vdm.py")):
    raise SystemExit(f"{peer_dir} holds no experiment_vdm.py; set PEER_DIR "
                     "to the official code (experiments/peer_env.sh).")
  package = types.ModuleType("vdm")
  package.__path__ = [os.path.abspath(peer_dir)]
  sys.modules["vdm"] = package
  sys.path.insert(0, os.path.abspath(peer_dir))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--peer_dir", default=os.environ.get("PEER_DIR",
                                                      DEFAULT_PEER))
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)
  _register_official(args.peer_dir)

  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  from clu import checkpoint
  from configs import cifar10 as official_config   # the official file
  import vdm.experiment_vdm
  import vdm.train_state

  config = official_config.get_config()
  config.model.sm_n_layer = 1
  config.model.sm_n_embd = 64

  # The official Experiment's model, params and optimizer, without its
  # dataset (Experiment.__init__ opens CIFAR-10 with tfds).
  exp = vdm.experiment_vdm.Experiment_VDM.__new__(
      vdm.experiment_vdm.Experiment_VDM)
  exp.config = config
  model, variables = exp.get_model_and_params(jax.random.PRNGKey(SEED))
  rs = np.random.RandomState(SEED)

  def noisy(tree, scale):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.round(
            (np.asarray(x) + scale * rs.normal(size=x.shape)) * 64) / 64,
                              x.dtype), tree)

  params = flax.core.unfreeze(variables["params"])
  gamma = params.pop("gamma")
  params = noisy(params, 0.05)
  ema = jax.tree_util.tree_map(
      lambda x: x + jnp.asarray(np.round(rs.normal(size=x.shape)) / 64,
                                x.dtype), params)
  params["gamma"] = {"b": jnp.full_like(gamma["b"], -12.0),
                     "w": jnp.full_like(gamma["w"], 16.5)}
  ema["gamma"] = {"b": jnp.full_like(gamma["b"], -12.25),
                  "w": jnp.full_like(gamma["w"], 16.5)}
  state = vdm.train_state.TrainState.create(
      apply_fn=model.apply, variables={"params": flax.core.freeze(params)},
      optax_optimizer=exp.get_optimizer)
  state = state.replace(ema_params=flax.core.freeze(ema), step=1234)
  exp.state = state

  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as workdir:
    # As Experiment.train_and_evaluate saves (the state unreplicated).
    ckpt = checkpoint.MultihostCheckpoint(
        os.path.join(workdir, "checkpoints"), max_to_keep=5)
    ckpt.save(state)
    with tarfile.open(os.path.join(args.out, "checkpoints-0.tar.xz"),
                      "w:xz", preset=9) as tar:
      tar.add(os.path.join(workdir, "checkpoints-0"), arcname="checkpoints-0")
  with open(os.path.join(args.out, "official_config.json"), "w") as f:
    f.write(config.to_json(indent=2, sort_keys=True) + "\n")

  images = rs.randint(0, 256, size=(BATCH, 32, 32, 3)).astype(np.uint8)
  inputs = {"images": jnp.asarray(images),
            "conditioning": jnp.zeros((BATCH,))}   # as the CIFAR-10 eval
  key = jax.random.PRNGKey(SEED + 1)

  def draws(module, images):
    """The draws of VDM.__call__ under the same 'sample' rng: its three
    make_rng calls on the same scope give the same keys in this order."""
    f = module.encdec.encode(images)
    eps_0 = jax.random.normal(module.make_rng("sample"), shape=f.shape)
    t0 = jax.random.uniform(module.make_rng("sample"))
    t = jnp.mod(t0 + jnp.arange(0., 1., step=1. / images.shape[0]), 1.)
    eps = jax.random.normal(module.make_rng("sample"), shape=f.shape)
    return eps_0, t, eps

  def recompute(module, images, eps_0, t, eps):
    """VDM.__call__'s recon and diffusion losses from the given draws (a
    check that `draws` found the draws the official loss used)."""
    f = module.encdec.encode(images)
    g_0 = module.gamma(0.)
    recon = -module.encdec.logprob(images, f + jnp.exp(0.5 * g_0) * eps_0,
                                   g_0)
    g_t, dg_t = jax.jvp(module.gamma, (t,), (jnp.ones_like(t),))
    var_t = jax.nn.sigmoid(g_t)[:, None, None, None]
    z_t = jnp.sqrt(1. - var_t) * f + jnp.sqrt(var_t) * eps
    eps_hat = module.score_model(z_t, g_t, jnp.zeros((f.shape[0],)), True)
    diff = .5 * dg_t * jnp.sum(jnp.square(eps - eps_hat), axis=(1, 2, 3))
    return recon, diff

  results = {"peer": "google-research/vdm@dc27b98 Experiment_VDM.loss_fn "
                     "(is_train=False), VDM.__call__",
             "jax": jax.__version__, "flax": flax.__version__}
  for name, p in (("ema_params", state.ema_params),
                  ("params", state.params)):
    # loss_fn splits its rng: (rng, sample_rng); the model gets sample_rng.
    _, sample_rng = jax.random.split(key)
    _, scalars = exp.loss_fn(p, inputs, key, is_train=False)
    out = model.apply({"params": p}, **inputs, rngs={"sample": sample_rng},
                      deterministic=True)
    results[name] = {
        **{k: float(v) for k, v in scalars["scalars"].items()
           if k.startswith("bpd")},
        "loss_recon": np.asarray(out.loss_recon).tolist(),
        "loss_klz": np.asarray(out.loss_klz).tolist(),
        "loss_diff": np.asarray(out.loss_diff).tolist()}
    eps_0, t, eps = model.apply({"params": p}, inputs["images"],
                                rngs={"sample": sample_rng}, method=draws)
    recon, diff = model.apply({"params": p}, inputs["images"], eps_0, t, eps,
                              method=recompute)
    np.testing.assert_allclose(recon, out.loss_recon, rtol=1e-6)
    np.testing.assert_allclose(diff, out.loss_diff, rtol=1e-6)
  with open(os.path.join(args.out, "official_elbo.json"), "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write("\n")
  buffer = io.BytesIO()
  np.savez_compressed(buffer, images=images, eps_0=np.asarray(eps_0),
                      t=np.asarray(t), eps=np.asarray(eps))
  with open(os.path.join(args.out, "batch.npz"), "wb") as f:
    f.write(buffer.getvalue())
  for name in sorted(os.listdir(args.out)):
    size = os.path.getsize(os.path.join(args.out, name))
    print(f"{name}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
