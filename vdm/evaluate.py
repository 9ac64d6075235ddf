"""Evaluation: bpd over a whole split, eval JSON, metrics, samples and plots.

Every example of the split counts exactly once: the input pipeline pads the
last batch and marks the padding in `mask`, and the eval step sums only the
real examples; nothing is dropped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vdm import parallel
from vdm import runtime

TERMS = ("total", "recon", "prior", "diff")


def evaluate_split(eval_step, params, ds, *, split: str, batch_size: int,
                   mesh, num_dims: int) -> dict:
  """bpd and its terms over every example of `split`.

  Args:
    eval_step: jitted (params, global_batch, batch_index) -> sums of the
      per-example terms in nats and 'count' (see `train.eval_step`).
    params: (EMA) parameters.
    ds: an `input_pipeline` dataset.
    batch_size: global eval batch size.
    num_dims: elements of one example (D in bits per dim).
  Returns:
    {'bpd', 'bpd_recon', 'bpd_prior', 'bpd_diff', 'num_examples', 'split'}.
  """
  totals = None
  batches = ds.eval_batches(split, batch_size=batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
  for index, local in enumerate(batches):
    batch = parallel.shard_batch(mesh, local)
    sums = eval_step(params, batch, jnp.asarray(index, jnp.int32))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"split {split!r} of {ds.name!r} is empty.")
  totals = jax.device_get(totals)
  count = int(round(float(totals["count"])))
  expected = ds.num_examples(split)
  if count != expected:
    raise RuntimeError(f"evaluated {count} examples of {split!r} but the "
                       f"split has {expected}: the eval iterator is broken.")
  to_bpd = 1.0 / (count * num_dims * math.log(2.0))
  result = {("bpd" if k == "total" else f"bpd_{k}"):
            float(totals[k]) * to_bpd for k in TERMS}
  result["num_examples"] = count
  result["split"] = split
  return result


def write_eval_json(workdir: str, split: str, step: int, result: dict, *,
                    dataset_version: str) -> str:
  """WORKDIR/eval/<split>_<step>.json, written atomically."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"{split}_{step}.json")
  record = {k: v for k, v in result.items() if k != "split"}
  record.update(step=int(step), split=split, dataset_version=dataset_version)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


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
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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


# --------------------------------------------------------------- samples


def make_sampler(model, *, sampler: str, num_steps: int, num_samples: int,
                 guidance_scale: float = 0.0, decode: str = "argmax",
                 clip_x: bool = True, num_frames: int = 0):
  """A jitted (params, key, labels) -> (x [N, ...] ints, frames) function.

  `frames` is [num_frames, N, ...] x_hat along the chain (progressive
  generation), or None when num_frames == 0.
  """
  from vdm import sampling  # pylint: disable=g-import-not-at-top
  shape = (num_samples, *model.data_shape)

  def run(params, key, labels):
    key_z, key_decode = jax.random.split(key)
    gamma_fn = model.gamma_fn(params)
    eps_fn = model.eps_fn(params, labels)
    if model.num_classes and guidance_scale > 0:
      null = jnp.full_like(labels, model.num_classes)
      eps_fn = sampling.guided(eps_fn, model.eps_fn(params, null),
                               guidance_scale)
    if num_frames:
      z_0, frames = sampling.progressive(
          key_z, eps_fn, gamma_fn, shape, num_steps=num_steps,
          num_frames=num_frames, sampler=sampler, clip_x=clip_x)
    else:
      fn = sampling.ancestral if sampler == "ancestral" else sampling.ddim
      z_0, frames = fn(key_z, eps_fn, gamma_fn, shape, num_steps=num_steps,
                       clip_x=clip_x), None
    gamma_0, _ = model.endpoints(params)
    x = sampling.decode(key_decode, z_0, gamma_0, model.vocab_size,
                        mode=decode)
    return x, frames

  return runtime.jit(run)


def sample_labels(model, num_samples: int):
  """Labels for a sample grid: classes in order, or None if unconditional."""
  if not model.num_classes:
    return None
  return jnp.arange(num_samples, dtype=jnp.int32) % model.num_classes


def write_samples(trainer, params, workdir: str, step: int) -> str:
  """Samples the model and writes WORKDIR/samples/<step>.png and .npz (and a
  progressive-generation grid <step>_progressive.png for images)."""
  cfg = trainer.config.sampling
  model = trainer.model
  images = len(model.data_shape) == 3
  num_frames = cfg.num_frames if images else 0
  run = make_sampler(model, sampler=cfg.sampler, num_steps=cfg.num_steps,
                     num_samples=cfg.num_samples,
                     guidance_scale=cfg.guidance_scale, decode=cfg.decode,
                     clip_x=cfg.clip_x, num_frames=num_frames)
  params = jax.device_get(params)
  labels = sample_labels(model, cfg.num_samples)
  x, frames = jax.device_get(run(params, jax.random.key(cfg.seed), labels))
  out = os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  np.savez_compressed(os.path.join(out, f"{step}.npz"), samples=x,
                      labels=np.asarray(labels) if labels is not None else [])
  path = os.path.join(out, f"{step}.png")
  if images:
    save_png(image_grid(to_uint8(x, model.vocab_size)), path)
    if frames is not None:
      rows = min(8, cfg.num_samples)
      # rows = samples, columns = time (t = 1 -> 0), like the DDPM figure.
      seq = np.transpose(np.asarray(frames)[:, :rows], (1, 0, 2, 3, 4))
      seq = seq.reshape(-1, *seq.shape[2:])
      save_png(image_grid(f_to_uint8(seq), num_cols=frames.shape[0]),
               os.path.join(out, f"{step}_progressive.png"))
  else:
    _scatter(x, model.vocab_size, path)
  return path


def _scatter(x, vocab_size: int, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  f = 2.0 * (np.asarray(x, np.float64) + 0.5) / vocab_size - 1.0
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.scatter(f[:, 0], f[:, 1], s=2)
  ax.set_xlim(-1, 1)
  ax.set_ylim(-1, 1)
  ax.set_aspect("equal")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def write_plots(trainer, params, workdir: str, step: int) -> list[str]:
  """Plots of the schedule (gamma(t), log SNR(t)) and of the diffusion loss
  against log-SNR on a test batch, into WORKDIR/plots/."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from vdm import elbo  # pylint: disable=g-import-not-at-top
  model = trainer.model
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

  # Diffusion loss vs log-SNR: eps-MSE per dim at a grid of noise levels on
  # (up to) 64 test examples, with a fixed key.
  batch = next(iter(trainer.ds.eval_batches("test", batch_size=64)))
  x = jnp.asarray(batch["image"]).astype(jnp.int32)
  labels = jnp.asarray(batch["label"]) if model.num_classes else None

  @jax.jit
  def mse_at(p, gamma_t, key):
    f = elbo.encode(x, model.vocab_size)
    eps = jax.random.normal(key, f.shape)
    gamma_b = jnp.full((f.shape[0],), gamma_t)
    z_t = elbo.diffuse(f, gamma_b, eps)
    eps_hat = model.eps_fn(p, labels)(z_t, gamma_b)
    return jnp.mean(jnp.square(eps - eps_hat))

  grid = np.linspace(float(gamma[0]), float(gamma[-1]), 40)
  key = jax.random.key(0)
  mse = np.array([float(mse_at(params, g, jax.random.fold_in(key, i)))
                  for i, g in enumerate(grid)])
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
