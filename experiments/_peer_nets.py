#!/usr/bin/env python3
"""Times the OFFICIAL VDM score network (forward + backward), one JSON line.

Run by experiments/benchmark_nets.py with experiments/.peer-venv's python
(see experiments/peer_env.sh); not meant to import this library. Loads
`model_vdm.py` of the official code (google-research/vdm@dc27b98, unchanged
there) by file path, builds its `ScoreUNet` with the configuration the
official configs/cifar10.py uses (Fourier features, dropout 0.1, no block
attention, gamma range [-13.3, 5]) at the given blocks/channels, and times it
with the same `measure` as our nets (same inputs, loss and timing).

  experiments/.peer-venv/bin/python experiments/_peer_nets.py \\
      --peer_dir ../shared/peers/google-research-vdm --preset tiny \\
      --batch_size 4
"""
import argparse
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True        # keep the shared peer folder clean
sys.path.insert(0, HERE)
import _bench  # noqa: E402  (presets, timing, memory, versions)
import benchmark_nets as bench  # noqa: E402  (inputs and loss)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--peer_dir", default=_bench.PEER_DIR)
  p.add_argument("--preset", choices=sorted(_bench.OFFICIAL_PRESETS),
                 default="tiny")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=1)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  path = os.path.join(args.peer_dir, "model_vdm.py")
  spec = importlib.util.spec_from_file_location("official_model_vdm", path)
  official = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(official)

  sizes = _bench.OFFICIAL_PRESETS[args.preset]
  config = official.VDMConfig(
      vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
      with_fourier_features=True, with_attention=False,
      gamma_type="learnable_scalar", gamma_min=bench.GAMMA_MIN,
      gamma_max=bench.GAMMA_MAX, sm_n_timesteps=0, sm_pdrop=0.1, **sizes)
  net = official.ScoreUNet(config)
  z_t, gamma_t, _ = bench.make_inputs(args.batch_size)
  conditioning = jnp.zeros((args.batch_size,))     # as the CIFAR-10 pipeline
  params = jax.jit(lambda key: net.init(key, z_t, gamma_t, conditioning,
                                        True))(jax.random.PRNGKey(0))["params"]

  def apply_fn(params, z, gamma, key):
    return net.apply({"params": params}, z, gamma, conditioning, False,
                     rngs={"dropout": key})

  load_before = os.getloadavg()[0]
  result = bench.measure(apply_fn, params, args.batch_size, jit=jax.jit,
                         steps=args.steps, warmup=args.warmup)
  out = {"impl": "official", "net": "vdm_unet", "preset": args.preset,
         "batch_size": args.batch_size, "dtype": "float32",
         "peer": "google-research/vdm@dc27b98 ScoreUNet", **result,
         "peak_rss_mb": round(_bench.peak_rss_mb(), 1),
         "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
         **_bench.versions(), "net_kwargs": sizes}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
