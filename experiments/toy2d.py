r"""The 2-D toy story in pictures: data, noising, schedule, denoising.

  python experiments/toy2d.py --workdir=runs/toy2d

Trains configs/toy2d.py into WORKDIR (resuming if a checkpoint is there,
about 2 minutes on 2 CPU cores), then writes WORKDIR/figures/:
  data_vs_samples.png  test data next to ancestral samples (EMA params)
  forward.png          q(z_t | x) of the data at several t
  trajectories.png     deterministic (DDIM) paths from z_1 to z_0
  views.png            the three equivalent views of the model at one t, on a
                       grid of z: x_hat, eps_hat, and the score
                       -eps_hat / sigma_t (each is the others rewritten:
                       x_hat = (z_t + sigma_t^2 score) / alpha_t is
                       Tweedie's formula, an identity here, so the figure
                       shows the views and checks nothing)
(Luo 2022, arXiv:2208.11970, sections on the three equivalent
interpretations and Tweedie's formula.)
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import matplotlib  # pylint: disable=wrong-import-position
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from vdm import config_files  # pylint: disable=wrong-import-position
from vdm import elbo  # pylint: disable=wrong-import-position
from vdm import process  # pylint: disable=wrong-import-position
from vdm import sampling  # pylint: disable=wrong-import-position
from vdm import training_loop  # pylint: disable=wrong-import-position

toy2d = config_files.load_module(os.path.join(REPO, "configs", "toy2d.py"))


def _square(ax, title):
  ax.set_xlim(-1.6, 1.6)
  ax.set_ylim(-1.6, 1.6)
  ax.set_aspect("equal")
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/toy2d")
  parser.add_argument("--num_steps", type=int, default=None,
                      help="override training steps")
  args = parser.parse_args()
  config = toy2d.get_config()
  if args.num_steps:
    config.training.num_steps = args.num_steps
  result = training_loop.train_and_evaluate(config, args.workdir)
  if result:
    print(f"toy2d test bpd: {result['bpd']:.4f}")
  trainer = training_loop.Trainer(config)
  state, _ = training_loop.restore_for_inference(trainer, args.workdir)
  params = jax.device_get(state.ema_params)
  model = trainer.model
  gamma_fn = model.gamma_fn(params)
  eps_fn = model.eps_fn(params)
  out = os.path.join(args.workdir, "figures")
  os.makedirs(out, exist_ok=True)
  test = next(iter(trainer.ds.eval_batches("test", batch_size=2000)))
  f_data = np.asarray(elbo.encode(jnp.asarray(test["image"][test["mask"]]),
                                  model.vocab_size))

  # 1. Data vs samples.
  z_0 = jax.jit(lambda k: sampling.ancestral(
      k, eps_fn, gamma_fn, (2000, 2), num_steps=200))(jax.random.key(0))
  x = sampling.decode(None, z_0, gamma_fn(jnp.zeros(())), model.vocab_size,
                      mode="argmax")
  f_samples = np.asarray(elbo.encode(x, model.vocab_size))
  fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
  axes[0].scatter(f_data[:, 0], f_data[:, 1], s=1)
  _square(axes[0], "test data")
  axes[1].scatter(f_samples[:, 0], f_samples[:, 1], s=1, color="C1")
  _square(axes[1], "samples (ancestral, 200 steps)")
  fig.savefig(os.path.join(out, "data_vs_samples.png"), dpi=120,
              bbox_inches="tight")
  plt.close(fig)

  # 2. Forward noising q(z_t | x) at several t.
  times = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
  eps = np.asarray(jax.random.normal(jax.random.key(1), f_data.shape))
  fig, axes = plt.subplots(1, len(times), figsize=(2.4 * len(times), 2.6))
  for ax, t in zip(axes, times):
    gamma_t = jnp.full((f_data.shape[0],), gamma_fn(jnp.asarray(t)))
    z_t = np.asarray(process.diffuse(f_data, gamma_t, eps))
    ax.scatter(z_t[:, 0], z_t[:, 1], s=1)
    _square(ax, f"t={t}, log SNR={-float(gamma_t[0]):.1f}")
  fig.savefig(os.path.join(out, "forward.png"), dpi=120, bbox_inches="tight")
  plt.close(fig)

  # 3. Deterministic trajectories z_1 -> z_0 (DDIM ODE), 20 segments.
  grid_t = np.linspace(1.0, 0.0, 21)
  z = sampling.draw_z_1(jax.random.key(2), (64, 2))
  path = [np.asarray(z)]
  for t_hi, t_lo in zip(grid_t[:-1], grid_t[1:]):
    z = sampling.ddim_from(z, eps_fn, gamma_fn, num_steps=10,
                           t_start=float(t_hi), t_end=float(t_lo))
    path.append(np.asarray(z))
  path = np.stack(path)                                 # [21, 64, 2]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.scatter(f_data[:, 0], f_data[:, 1], s=1, color="0.8")
  for b in range(path.shape[1]):
    ax.plot(path[:, b, 0], path[:, b, 1], lw=0.6)
  ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, color="k")
  _square(ax, "DDIM trajectories z_1 -> z_0")
  ax.set_xlim(-3, 3)
  ax.set_ylim(-3, 3)
  fig.savefig(os.path.join(out, "trajectories.png"), dpi=120,
              bbox_inches="tight")
  plt.close(fig)

  # 4. Three equivalent views at one noise level, on a grid of z_t.
  t_view = 0.6
  lin = np.linspace(-1.5, 1.5, 21)
  zz = np.stack(np.meshgrid(lin, lin), -1).reshape(-1, 2).astype(np.float32)
  gamma_t = jnp.full((zz.shape[0],), gamma_fn(jnp.asarray(t_view)))
  _, sigma_t = (np.asarray(a)[:, None]
                      for a in process.alpha_sigma(gamma_t))
  eps_hat = np.asarray(eps_fn(jnp.asarray(zz), gamma_t))
  x_hat = np.asarray(process.eps_to_x(eps_hat, zz, gamma_t))
  score = -eps_hat / sigma_t
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
  axes[0].quiver(zz[:, 0], zz[:, 1], x_hat[:, 0] - zz[:, 0],
                 x_hat[:, 1] - zz[:, 1], angles="xy", scale_units="xy",
                 scale=1, width=0.003)
  _square(axes[0], "x_hat(z_t) - z_t  (denoised estimate)")
  axes[1].quiver(zz[:, 0], zz[:, 1], eps_hat[:, 0], eps_hat[:, 1],
                 width=0.003)
  _square(axes[1], "eps_hat(z_t)  (predicted noise)")
  axes[2].quiver(zz[:, 0], zz[:, 1], score[:, 0], score[:, 1], width=0.003)
  _square(axes[2], "score = -eps_hat / sigma_t")
  for ax in axes:
    ax.scatter(f_data[:, 0], f_data[:, 1], s=0.5, color="C1", alpha=0.3)
  fig.suptitle(f"t={t_view}, log SNR={-float(gamma_t[0]):.2f}", fontsize=9)
  fig.savefig(os.path.join(out, "views.png"), dpi=120, bbox_inches="tight")
  plt.close(fig)
  print(f"wrote figures to {out}")


if __name__ == "__main__":
  main()
