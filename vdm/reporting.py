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
  """TensorBoard event files (tensorboardX) in WORKDIR; process 0 only.

  Scalars, images (sample grids) and text (the config); read them with
  `tensorboard --logdir WORKDIR` (`pip install 'vdm[tensorboard]'`).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir=workdir)

  def write_scalars(self, step: int, scalars: dict):
    """Writes the int and float values of `scalars` (others are skipped)."""
    if self._writer is None:
      return
    for name, value in scalars.items():
      if isinstance(value, (int, float)):
        self._writer.add_scalar(name, value, step)
    self._writer.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray):
    """Writes an [H, W, C] uint8 image, C = 1 (gray) or 3 (RGB)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or (
        image.dtype != np.uint8):
      raise ValueError(f"write_image needs an [H, W, 1 or 3] uint8 image; "
                       f"got shape {image.shape}, dtype {image.dtype}.")
    if self._writer is None:
      return
    self._writer.add_image(tag, image, step, dataformats="HWC")
    self._writer.flush()

  def write_text(self, step: int, tag: str, text: str):
    """Writes `text` (markdown) under `tag`."""
    if self._writer is None:
      return
    self._writer.add_text(tag, text, step)
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def say(text: str, *, enabled: bool = True):
  """One console line (stdout, flushed), e.g. eval and sampling progress."""
  if enabled:
    print(text, flush=True)


def run_header(*, workdir: str, config_path: str | None,
               resumed_step: int | None, devices: list, process_count: int,
               dataset: str, split_sizes: dict[str, int],
               data_shape: tuple[int, ...], vocab_size: int, num_classes: int,
               net: str, num_params: int, num_steps: int, batch_size: int
               ) -> str:
  """The lines printed when training starts: what runs where on what.

  Args:
    workdir: the run directory.
    config_path: the config file given on the command line, or None.
    resumed_step: the checkpoint step training resumes from; None: new run.
    devices: `jax.devices()` (all processes).
    process_count: `jax.process_count()`.
    dataset, split_sizes, data_shape, vocab_size, num_classes: the data.
    net, num_params: the network's name and parameter count.
    num_steps, batch_size: the training length and global batch.
  Returns:
    Several lines, no trailing newline.
  """
  kinds = sorted({d.device_kind for d in devices})
  platform = devices[0].platform if devices else "?"
  start = ("new run" if resumed_step is None
           else f"resumed from step {resumed_step:,}")
  splits = " / ".join(f"{n:,} {s}" for s, n in split_sizes.items())
  shape = "x".join(map(str, data_shape))
  classes = f", {num_classes} classes" if num_classes else ""
  lines = [
      f"vdm: {start} in {workdir}",
      f"  config   {config_path or '(given in Python)'}; resolved: "
      f"{os.path.join(workdir, 'config.json')}",
      f"  devices  {len(devices)} x {platform} ({', '.join(kinds)}), "
      f"{process_count} process{'es' if process_count > 1 else ''}",
      f"  data     {dataset}: {splits}; {shape}, {vocab_size} levels{classes}",
      f"  model    {net}, {num_params:,} parameters; {num_steps:,} steps at "
      f"batch {batch_size}",
  ]
  return "\n".join(lines)


class Progress:
  """Console progress of training: steps/s, ETA and the loss terms.

  The rate is an exponential moving average of the seconds per step over
  the log windows (`smoothing`: the weight of the newest window), and
  excludes the compile (`compiled` restarts the clock after it), so the
  first ETA is not inflated by it. On a terminal a tqdm bar carries the same
  text; otherwise (a log file, a pipe) one plain line per update.
  """

  def __init__(self, num_steps: int, start: int, *, enabled: bool = True,
               smoothing: float = 0.3, stream=None):
    if not 0.0 < smoothing <= 1.0:
      raise ValueError(f"smoothing must be in (0, 1]; got {smoothing}.")
    self.num_steps, self.start = num_steps, start
    self.enabled = enabled
    self.smoothing = smoothing
    self.stream = stream if stream is not None else sys.stdout
    self.tty = enabled and hasattr(self.stream, "isatty") and (
        self.stream.isatty())
    self.rate = None   # steps/s (smoothed), None until a window is timed
    self._seconds_per_step = None
    self.last_step, self.last_time = start, time.monotonic()
    self._bar = None
    if self.tty:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(
          total=num_steps, initial=start, file=self.stream,
          dynamic_ncols=True, bar_format="{percentage:3.0f}%|{bar:20}| "
          "{n_fmt}/{total_fmt} {postfix}")

  def compiled(self, step: int, seconds: float):
    """Reports the compile (with the first step it ran) and restarts the
    clock after it."""
    self.message(f"compiled the train step in {seconds:.1f} s (first step "
                 "included); timing from here")
    self.last_step, self.last_time = step, time.monotonic()

  def update(self, step: int, metrics: dict):
    """Times the window since the last update and shows the line."""
    now = time.monotonic()
    if step > self.last_step:
      seconds = (now - self.last_time) / (step - self.last_step)
      if self._seconds_per_step is None:
        self._seconds_per_step = seconds
      else:
        self._seconds_per_step += self.smoothing * (
            seconds - self._seconds_per_step)
      self.rate = 1.0 / max(self._seconds_per_step, 1e-9)
    self.last_step, self.last_time = step, now
    if not self.enabled:
      return
    if self.rate is None:
      speed = "-- steps/s  eta --"
    else:
      eta = (self.num_steps - step) * self._seconds_per_step
      speed = f"{self.rate:.2f} steps/s  eta {_hms(eta)}"
    terms = (f"loss {metrics['loss']:.4f} bpd (recon "
             f"{metrics['bpd_recon']:.4f} prior {metrics['bpd_prior']:.4f} "
             f"diff {metrics['bpd_diff']:.4f})  grad_norm "
             f"{metrics['grad_norm']:.3g}")
    line = f"step {step}/{self.num_steps}  {speed}  {terms}"
    if self._bar is not None:
      self._bar.set_postfix_str(f"{speed}  {terms}", refresh=False)
      self._bar.update(step - self._bar.n)
      self._bar.refresh()
    else:
      print(line, file=self.stream, flush=True)
    logging.info(line)

  def message(self, text: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


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


def upscale(image: np.ndarray, *, min_width: int = 256) -> np.ndarray:
  """Enlarges an [H, W, C] image by an integer factor (nearest neighbour:
  each pixel becomes a k x k block, no smoothing) so that it is at least
  `min_width` pixels wide; wider images are returned as they are."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"upscale needs an [H, W, C] image; got shape "
                     f"{image.shape}.")
  factor = max(1, int(math.ceil(min_width / max(image.shape[1], 1))))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def label_columns(image: np.ndarray, labels: list[str], *,
                  cell_width: int) -> np.ndarray:
  """Adds a white strip above an [H, W, C] uint8 grid with `labels[i]`
  centred over column i (columns `cell_width` pixels apart).

  Used for the progressive-generation grid (columns: t from 1 to 0).
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import PIL.ImageDraw  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"label_columns needs an [H, W, C] uint8 image; got "
                     f"shape {image.shape}, dtype {image.dtype}.")
  strip = PIL.Image.new("L", (image.shape[1], 14), 255)
  draw = PIL.ImageDraw.Draw(strip)
  for i, text in enumerate(labels):
    width = draw.textlength(text)
    draw.text((i * cell_width + (cell_width - width) / 2, 1), text, fill=0)
  top = np.repeat(np.asarray(strip)[..., None], image.shape[-1], axis=-1)
  return np.concatenate([top, image], axis=0)


def save_png(image: np.ndarray, path: str):
  """Writes an [H, W, C] uint8 image as PNG: C = 1 as 8-bit grayscale, C = 3
  as RGB (the pixel values are stored as they are, no colormap)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or (
      image.dtype != np.uint8):
    raise ValueError(f"save_png needs an [H, W, 1 or 3] uint8 image; got "
                     f"shape {image.shape}, dtype {image.dtype}.")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if image.shape[-1] == 1:
    PIL.Image.fromarray(image[..., 0]).save(path)    # 2-D uint8: mode L
  else:
    PIL.Image.fromarray(image).save(path)             # [H, W, 3]: RGB


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
