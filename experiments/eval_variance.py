r"""How much stratifying t across eval draws lowers the ELBO's variance.

  python experiments/eval_variance.py --workdir=runs/demo_final

On the first --num_images test images of a trained run, draws the diffusion
term of the ELBO (bits/dim) at R x S times per image: R independent groups,
each of S times t_j = mod(u + j / S, 1) with one u ~ U(0, 1) per image and
fresh eps per draw (what `vdm.train.eval_step` does with strata=S). Prints
one draw's per-image standard deviation and the variance of a group's mean
relative to the mean of the same number of independent draws (1.0: no
gain), for S and for the pair (t, t + 1/2). Per-image figures: the
low-discrepancy t across a batch (`elbo.sample_times`) is left out here.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import vdm
from vdm import elbo


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--groups", type=int, default=16)
  parser.add_argument("--strata", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.strata % 2 or args.groups < 2:
    parser.error("--strata must be even (the pair uses j = 0 and S / 2) "
                 "and --groups >= 2")
  run = vdm.load_run(args.workdir)
  model, params = run.model, run.params
  x = jnp.asarray(run.dataset.read("test", np.arange(args.num_images))[
      "image"].astype(np.int32))
  f = elbo.encode(x, model.vocab_size)

  @jax.jit
  def diffusion_bpd(t, key):
    eps = jax.random.normal(key, f.shape)
    nats = elbo.diffusion_loss(model.eps_fn(params, None),
                               model.gamma_fn(params), f, t, eps,
                               num_steps=model.num_steps)
    return nats / (model.num_dims * np.log(2.0))

  start = time.time()
  key = jax.random.key(args.seed)
  losses = np.zeros((args.groups, args.strata, args.num_images))
  for r in range(args.groups):
    key, key_u = jax.random.split(key)
    u = jax.random.uniform(key_u, (args.num_images,))
    for j in range(args.strata):
      key, key_eps = jax.random.split(key)
      losses[r, j] = np.asarray(
          diffusion_bpd(jnp.mod(u + j / args.strata, 1.0), key_eps))
  # Every draw's t is U(0, 1): pooled, they give one draw's variance.
  one = losses.reshape(-1, args.num_images).var(axis=0, ddof=1)
  strat = losses.mean(axis=1).var(axis=0, ddof=1)
  pair = losses[:, [0, args.strata // 2]].mean(axis=1).var(axis=0, ddof=1)
  print(json.dumps({
      "workdir": args.workdir, "step": run.step,
      "num_images": args.num_images, "groups": args.groups,
      "strata": args.strata,
      "per_image_sd_one_draw_bpd": round(float(np.sqrt(one.mean())), 4),
      f"variance_ratio_{args.strata}_stratified_vs_independent": round(
          float(strat.sum() / (one.sum() / args.strata)), 3),
      "variance_ratio_pair_vs_2_independent": round(
          float(pair.sum() / (one.sum() / 2)), 3),
      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
  main()
