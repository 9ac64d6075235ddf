r"""Where the spread of the paired ODE - ELBO difference comes from.

  python experiments/ode_variance.py --workdir=runs/long --num_images=20

The eval's difference estimator (`--config.eval.ode_num_examples`, see
docs/likelihood.md) has the error sd(d_i) / sqrt(N) with d_i = ODE_i -
ELBO_i of N images. Each d_i holds the image's true difference and two
Monte Carlo errors: the ODE's (one dequantisation draw, Hutchinson probes)
and the ELBO's (K draws of (t, eps)). On N images spread over the test split
this script measures each part of var(d_i), in (bits/dim)^2:

- the ODE three times per image: (A) dequantisation draw 1, probes 1; (B)
  draw 1, probes 2; (C) draw 2, probes 3. Hutchinson's variance is
  mean_i (A_i - B_i)^2 / 2, the ODE's whole Monte Carlo variance
  mean_i (A_i - C_i)^2 / 2;
- the ELBO by R groups of S draws with t stratified per image, t_j =
  mod(u + j / S, 1) with one u ~ U(0, 1) per image and group, as
  experiments/eval_variance.py draws them (the eval's `train.eval_step`
  also spreads u over the batch, `model.elbo_times`; each image's t is
  U(0, 1) either way): its variance at K draws is
  mean_i var_r(group means)_i / (K / S);
- var_i(d_i) with the ODE's solve A and the ELBO of the eval's K draws
  (the first K / S groups), and what the Monte Carlo parts leave of it: the
  images' own spread.

Then the error of the difference estimate on N images that each option
gives (more ELBO draws per ODE image, more probes), from these parts.

The split holds only where the solver's own error is small against the
probes' noise: two solves with other probes take other steps, so their
difference also holds the solver's error (experiments/ode_tolerance.py
measures it; at the joint norm's rtol 1e-4, the default here until
2026-12-07, it was most of what this script counted as Hutchinson's).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import vdm
from vdm import likelihood


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_images", type=int, default=20)
  parser.add_argument("--dequantization", default="truncated_normal",
                      choices=likelihood.DEQUANTIZATIONS)
  parser.add_argument("--num_probes", type=int, default=1)
  parser.add_argument("--tol", type=float, default=1e-5,
                      help="the solver's rtol = atol (the eval's default)")
  parser.add_argument("--error_norm", default="separate",
                      choices=likelihood.ERROR_NORMS,
                      help="the solver's error norm (the eval's default)")
  parser.add_argument("--elbo_draws", type=int, default=16,
                      help="K, the eval's ELBO draws per image")
  parser.add_argument("--elbo_groups", type=int, default=64,
                      help="R groups of --strata draws for the ELBO's "
                      "variance")
  parser.add_argument("--strata", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.elbo_draws % args.strata or not (
      args.strata <= args.elbo_draws <= args.elbo_groups * args.strata):
    parser.error("--elbo_draws must be a multiple of --strata, at most "
                 "--elbo_groups x --strata")
  if args.num_images < 2:
    parser.error("--num_images must be >= 2")
  run = vdm.load_run(args.workdir)
  model, params = run.model, run.params
  indices = run.dataset.eval_indices("test", args.num_images)
  x = jnp.asarray(run.dataset.read("test", indices)["image"].astype(np.int32))
  to_bpd = 1.0 / (model.num_dims * math.log(2.0))
  eps_fn, gamma_fn = model.eps_fn(params, None), model.gamma_fn(params)
  gamma_0 = model.endpoints(params)[0]

  @jax.jit
  def ode_bpd(key_noise, key_probe):
    z, log_q = likelihood.dequantize(x, model.vocab_size, gamma_0, key_noise,
                                     dequantization=args.dequantization)
    logp, nfe = likelihood.ode_log_density(
        eps_fn, gamma_fn, z, key=key_probe, divergence="hutchinson",
        num_probes=args.num_probes, rtol=args.tol, atol=args.tol,
        error_norm=args.error_norm)
    return -(logp - log_q) * to_bpd, nfe

  @jax.jit
  def elbo_group(key):
    u = jax.random.uniform(jax.random.fold_in(key, args.strata), (x.shape[0],))
    totals = [model.elbo_terms(params, x, None, jax.random.fold_in(key, j),
                               jnp.mod(u + j / args.strata, 1.0))["total"]
              for j in range(args.strata)]
    return jnp.mean(jnp.stack(totals), axis=0) * to_bpd

  key = jax.random.key(args.seed)
  keys = jax.random.split(key, 6)
  start = time.time()
  groups = np.stack([np.asarray(elbo_group(k)) for k in
                     jax.random.split(keys[0], args.elbo_groups)])
  elbo_s = time.time() - start
  solves, nfes, ode_s = {}, {}, []
  for name, (kn, kp) in {"A": (keys[1], keys[2]), "B": (keys[1], keys[3]),
                         "C": (keys[4], keys[5])}.items():
    start = time.time()
    bpd, nfe = ode_bpd(kn, kp)
    solves[name], nfes[name] = np.asarray(bpd, np.float64), int(nfe)
    ode_s.append(time.time() - start)

  n = args.num_images
  elbo_k = groups[:args.elbo_draws // args.strata].mean(axis=0)
  var_group = groups.var(axis=0, ddof=1)                    # per image
  var_elbo_k = float(np.mean(var_group) / (args.elbo_draws // args.strata))
  var_hutch = float(np.mean(np.square(solves["A"] - solves["B"])) / 2)
  var_ode = float(np.mean(np.square(solves["A"] - solves["C"])) / 2)
  diff = solves["A"] - elbo_k
  var_diff = float(np.var(diff, ddof=1))
  var_images = var_diff - var_ode - var_elbo_k
  # The error of the difference estimate on n images, per option.
  def se(elbo_draws, probes):
    # Each part's estimate is noisy and may come out negative: floored at 0.
    var = (max(var_images, 0.0) + max(var_ode - var_hutch, 0.0)
           + var_hutch / probes * args.num_probes
           + float(np.mean(var_group)) / (elbo_draws // args.strata))
    return round(math.sqrt(var / n), 4)
  print(json.dumps({
      "workdir": args.workdir, "step": run.step, "num_images": n,
      "dequantization": args.dequantization, "num_probes": args.num_probes,
      "tol": args.tol, "error_norm": args.error_norm,
      "elbo_draws": args.elbo_draws,
      "elbo_groups": args.elbo_groups, "strata": args.strata,
      "bpd_ode_solves": {k: round(float(v.mean()), 4)
                         for k, v in solves.items()},
      "bpd_elbo": round(float(groups.mean()), 4),
      "nfe": nfes,
      "var_paired_difference": round(var_diff, 5),
      "var_ode_monte_carlo": round(var_ode, 5),
      "var_ode_hutchinson": round(var_hutch, 5),
      "var_elbo_monte_carlo_at_k": round(var_elbo_k, 5),
      "var_images_own": round(var_images, 5),
      "se_difference_now": round(math.sqrt(var_diff / n), 4),
      "se_projected": {
          f"elbo_draws={k},probes={p}": se(k, p)
          for k in (args.elbo_draws, 4 * args.elbo_draws)
          for p in (args.num_probes, 4 * args.num_probes)},
      "seconds": {"elbo": round(elbo_s, 1),
                  "ode_solves": [round(s, 1) for s in ode_s]}}))


if __name__ == "__main__":
  main()
