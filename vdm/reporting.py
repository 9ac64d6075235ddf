"""What a run shows people: TensorBoard scalars, console progress, images and
plots.

Every function takes plain arguments (a model, parameters, a directory, a
step, arrays); none reads a config or a trainer.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vdm import elbo
from vdm import model as model_lib
from vdm import process


class MetricWriter:
  """TensorBoard event files (tensorboardX) in WORKDIR; process 0 only."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir=workdir)

  def write_scalars(self, step: int, scalars: dict):
    if self._writer is None:
      return
    for name, value in scalars.items():
      if isinstance(value, (int, float)):
        self._writer.add_scalar(name, value, step)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class Progress:
  """Console progress: steps/s, ETA and the loss terms; a bar on a tty."""

  def __init__(self, num_steps: int, start: int, *, enabled: bool = True):
    self.num_steps, self.start = num_steps, start
    self.enabled = enabled
    self.tty = enabled and sys.stdout.isatty()
    self.t0 = time.time()
    self.last_step, self.last_time = start, self.t0

  def update(self, step: int, metrics: dict):
    if not self.enabled:
      return
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / max(rate, 1e-9)
    line = (f"step {step}/{self.num_steps}  {rate:.2f} steps/s  "
            f"eta {_hms(eta)}  loss {metrics['loss']:.4f} bpd (recon "
            f"{metrics['bpd_recon']:.4f} prior {metrics['bpd_prior']:.4f} "
            f"diff {metrics['bpd_diff']:.4f})  grad_norm "
            f"{metrics['grad_norm']:.3g}")
    if self.tty:
      frac = step / self.num_steps
      bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
      print(f"\r[{bar}] {line}", end="", flush=True)
    else:
      print(line, flush=True)
    logging.info(line)

  def message(self, text: str):
    if self.enabled:
      print(("\n" if self.tty else "") + text, flush=True)

  def close(self):
    if self.tty:
      print(flush=True)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- images


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def image_grid(images: np.ndarray, *, num_cols: int | None = None
               ) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows*(H+1)-1, cols*(W+1)-1, C] grid image."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_grid needs [N, H, W, C] images; got shape "
                     f"{images.shape}.")
  n, h, w, c = images.shape
  cols = num_cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = \
        images[i]
  return grid


def save_png(image: np.ndarray, path: str):
  """Writes an [H, W, C] uint8 image (C = 1 or 3) as PNG."""
  plt = _pyplot()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if image.shape[-1] == 1:
    plt.imsave(path, image[..., 0], cmap="gray", vmin=0, vmax=255)
  else:
    plt.imsave(path, image)


def to_uint8(x: np.ndarray, vocab_size: int) -> np.ndarray:
  """Integer levels in [0, vocab_size) -> uint8 [0, 255] for display."""
  x = np.asarray(x, np.float64)
  return np.clip(np.round(x * 255.0 / (vocab_size - 1)), 0, 255).astype(
      np.uint8)


def f_to_uint8(f: np.ndarray) -> np.ndarray:
  """Model-space values in [-1, 1] -> uint8 for display."""
  return np.clip(np.round((np.asarray(f) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def save_scatter(x: np.ndarray, vocab_size: int, path: str):
  """Writes 2-D points x [N, 2] (integer levels) as a scatter plot in model
  space, on the square [-1, 1]^2."""
  plt = _pyplot()
  f = np.asarray(elbo.encode(x, vocab_size), np.float64)
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.scatter(f[:, 0], f[:, 1], s=2)
  ax.set_xlim(-1, 1)
  ax.set_ylim(-1, 1)
  ax.set_aspect("equal")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


# ----------------------------------------------------------------- plots


def loss_vs_logsnr(model: model_lib.Model, params, x: jax.typing.ArrayLike,
                   labels: jax.typing.ArrayLike | None,
                   logsnr: np.ndarray, key: jax.Array) -> np.ndarray:
  """The denoising error E||eps - eps_hat||^2 per dim at each noise level.

  At level i, one eps ~ N(0, I) from `fold_in(key, i)` noises every example:
  `z = diffuse(encode(x), gamma = -logsnr[i], eps)`. Half of it is the ELBO
  integrand per dim and unit of log-SNR (Kingma & Gao 2023, eq. 7).

  Args:
    model: the model (`model.eps_fn`, `model.vocab_size`).
    params: its parameters (on the host or one device).
    x: [B, ...] integer data in [0, vocab_size).
    labels: [B] int class labels for a conditional model, else None.
    logsnr: [L] log-SNR levels lambda.
    key: the key of the noise draws (the same key gives the same numbers).
  Returns:
    [L] float64 mean squared eps error per dim.
  """
  x = jnp.asarray(x).astype(jnp.int32)

  # One compile for every level: gamma is an argument, not a constant.
  @jax.jit
  def mse_at(p, gamma_t, key):
    f = elbo.encode(x, model.vocab_size)
    eps = jax.random.normal(key, f.shape)
    gamma_b = jnp.full((f.shape[0],), gamma_t)
    z_t = process.diffuse(f, gamma_b, eps)
    eps_hat = model.eps_fn(p, labels)(z_t, gamma_b)
    return jnp.mean(jnp.square(eps - eps_hat))

  gammas = -np.asarray(logsnr, np.float32)
  return np.array([float(mse_at(params, g, jax.random.fold_in(key, i)))
                   for i, g in enumerate(gammas)])


def write_plots(model: model_lib.Model, params, workdir: str, step: int,
                batch: dict) -> list[str]:
  """Plots of the schedule (gamma(t), log SNR(t)) and of the denoising error
  against log-SNR on `batch`, into WORKDIR/plots/.

  Args:
    model: the model.
    params: its (EMA) parameters.
    workdir: the run directory.
    step: the training step, in the file names.
    batch: {'image': [B, ...] ints, 'label': [B]}, e.g. the first eval batch
      of the test split.
  Returns:
    The paths written: schedule_<step>.png, loss_vs_logsnr_<step>.png.
  """
  plt = _pyplot()
  params = jax.device_get(params)
  out = os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  t = jnp.linspace(0.0, 1.0, 201)
  gamma = np.asarray(jax.jit(lambda p: model.gamma_fn(p)(t))(params))
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  axes[0].plot(t, gamma)
  axes[0].set(xlabel="t", ylabel="gamma(t) = -log SNR(t)",
              title="noise schedule")
  axes[1].semilogy(t, np.exp(-gamma))
  axes[1].set(xlabel="t", ylabel="SNR(t)", title="signal-to-noise ratio")
  fig.tight_layout()
  paths = [os.path.join(out, f"schedule_{step}.png")]
  fig.savefig(paths[0], dpi=100)
  plt.close(fig)

  # 40 levels over the model's own log-SNR range, with a fixed key.
  grid = np.linspace(float(gamma[0]), float(gamma[-1]), 40)
  labels = jnp.asarray(batch["label"]) if model.num_classes else None
  mse = loss_vs_logsnr(model, params, batch["image"], labels, -grid,
                       jax.random.key(0))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.semilogy(-grid, mse, label="eps-MSE per dim")
  ax.semilogy(-grid, mse * np.exp(grid), label="x-MSE per dim")
  ax.set(xlabel="log SNR (lambda)", ylabel="MSE",
         title="denoising error vs noise level")
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out, f"loss_vs_logsnr_{step}.png"))
  fig.savefig(paths[1], dpi=100)
  plt.close(fig)
  return paths
