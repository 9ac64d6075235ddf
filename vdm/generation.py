"""Generation: the jitted sampler of a model and the sample files of a run.

Functions take the model, its parameters and the sampling options as plain
arguments (`SamplingOptions`, built from `config.sampling` by the caller).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vdm import model as model_lib
from vdm import reporting
from vdm import runtime
from vdm import sampling


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How `write_samples` samples; the fields of `config.sampling`.

  Attributes:
    sampler: 'ancestral' or 'ddim'.
    num_steps: steps of the sampler from t = 1 to 0.
    num_samples: samples in the grid.
    guidance_scale: classifier-free guidance scale (0: conditional model).
    decode: 'argmax' or 'sample', how z_0 becomes integer data.
    clip_x: clip x_hat to [-1, 1] (image data).
    num_frames: columns of the progressive-generation grid (images; 0: none).
    seed: the sampling key's seed.
    chunk_size: samples per jitted call in `sample_to_dir`.
  """
  sampler: str
  num_steps: int
  num_samples: int
  guidance_scale: float = 0.0
  decode: str = "argmax"
  clip_x: bool = True
  num_frames: int = 0
  seed: int = 0
  chunk_size: int = 1000

  @classmethod
  def from_config(cls, sampling_config) -> SamplingOptions:
    """The options of a `config.sampling` ConfigDict (a run config written
    before a field existed gets the field's default)."""
    return cls(**{field.name: sampling_config.get(field.name, field.default)
                  for field in dataclasses.fields(cls)})


def make_sampler(model: model_lib.Model, *, sampler: str, num_steps: int,
                 num_samples: int, guidance_scale: float = 0.0,
                 decode: str = "argmax", clip_x: bool = True,
                 num_frames: int = 0):
  """A jitted (params, key, labels) -> (x [N, ...] ints, frames) function.

  `frames` is [num_frames, N, ...] x_hat along the chain (progressive
  generation), or None when num_frames == 0. An optional fourth argument
  `first_index` ([] int32, default 0; num_frames == 0 only) numbers the
  samples from it: sample b
  of the call is sample first_index + b of one large call (same keys), which
  `sample_to_dir` uses to reuse one compiled function for every chunk.
  """
  shape = (num_samples, *model.data_shape)

  def run(params, key, labels, first_index=0):
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
                       clip_x=clip_x, first_index=first_index), None
    gamma_0, _ = model.endpoints(params)
    x = sampling.decode(key_decode, z_0, gamma_0, model.vocab_size,
                        mode=decode, first_index=first_index)
    return x, frames

  return runtime.jit(run)


def sample_labels(model: model_lib.Model, num_samples: int):
  """Labels for a sample grid: classes in order, or None if unconditional."""
  if not model.num_classes:
    return None
  return jnp.arange(num_samples, dtype=jnp.int32) % model.num_classes


def frame_times(num_steps: int, num_frames: int) -> np.ndarray:
  """[num_frames] t of each progressive frame (`sampling.progressive`):
  frame k is x_hat after round(k num_steps / (num_frames - 1)) of the
  num_steps steps from t = 1, i.e. at t = 1 - steps / num_steps."""
  if num_frames == 1:
    return np.zeros(1)
  k = np.arange(num_frames)
  steps = (k * num_steps + (num_frames - 1) // 2) // (num_frames - 1)
  return 1.0 - steps / num_steps


def write_samples(model: model_lib.Model, params, workdir: str, step: int,
                  options: SamplingOptions, *, writer=None,
                  min_width: int = 256, name: str | None = None) -> str:
  """Samples the model and writes WORKDIR/samples/<step>.png and .npz.

  Images also get a progressive-generation grid <step>_progressive.png when
  `options.num_frames` > 0 (columns labelled with t); 2-D data gets a
  scatter plot as <step>.png. Grids are enlarged (nearest neighbour) to at
  least `min_width` pixels; gray images stay 8-bit gray.

  Args:
    model: the model.
    params: its (EMA) parameters, fetchable by this process.
    workdir: the run directory.
    step: the training step, in the file names.
    options: how to sample.
    writer: a `reporting.MetricWriter` that also gets the image grids
      (TensorBoard tags 'samples' and 'samples_progressive'), or None.
    min_width: the grids' minimum width in pixels.
    name: the files' stem instead of <step> (`config_lib.sample_output`
      names them by what produced them).
  Returns:
    The path of <step>.png.
  """
  images = len(model.data_shape) == 3
  num_frames = options.num_frames if images else 0
  run = make_sampler(model, sampler=options.sampler,
                     num_steps=options.num_steps,
                     num_samples=options.num_samples,
                     guidance_scale=options.guidance_scale,
                     decode=options.decode, clip_x=options.clip_x,
                     num_frames=num_frames)
  params = jax.device_get(params)
  labels = sample_labels(model, options.num_samples)
  x, frames = jax.device_get(run(params, jax.random.key(options.seed),
                                 labels))
  out = os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  stem = name or str(step)
  np.savez_compressed(os.path.join(out, f"{stem}.npz"), samples=x,
                      labels=np.asarray(labels) if labels is not None else [])
  path = os.path.join(out, f"{stem}.png")
  if images:
    grid = reporting.upscale(reporting.image_grid(
        reporting.to_uint8(x, model.vocab_size)), min_width=min_width)
    reporting.save_png(grid, path)
    if writer is not None:
      writer.write_image(step, "samples", grid)
    if frames is not None:
      rows = min(8, options.num_samples)
      # rows = samples, columns = time (t = 1 -> 0), like the DDPM figure.
      seq = np.transpose(np.asarray(frames)[:, :rows], (1, 0, 2, 3, 4))
      seq = seq.reshape(-1, *seq.shape[2:])
      cols = frames.shape[0]
      grid = reporting.image_grid(reporting.f_to_uint8(seq), num_cols=cols)
      # At least 40 px per column, so that each label fits over it.
      width = max(min_width, 40 * cols)
      big = reporting.upscale(grid, min_width=width)
      cell = (big.shape[1] // grid.shape[1]) * (model.data_shape[1] + 1)
      labels_t = [f"t={t:.2f}" if i == 0 else f"{t:.2f}" for i, t in
                  enumerate(frame_times(options.num_steps, cols))]
      big = reporting.label_columns(big, labels_t, cell_width=cell)
      reporting.save_png(big, os.path.join(out, f"{stem}_progressive.png"))
      if writer is not None:
        writer.write_image(step, "samples_progressive", big)
  else:
    reporting.save_scatter(x, model.vocab_size, path)
  return path


META_FILE = "meta.json"


def _atomic_savez(path: str, **arrays) -> None:
  """np.savez_compressed to `path` via a temporary file and a rename, so a
  killed run leaves a whole chunk or none."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def sample_to_dir(model: model_lib.Model, params, workdir: str, name: str,
                  options: SamplingOptions, *, progress=None) -> str:
  """Writes options.num_samples samples in chunks, resuming where it stopped.

  For sample-quality work (N = 50,000 for FID) no single jitted call holds
  all samples: one function compiled for `options.chunk_size` samples runs
  once per chunk (the last chunk padded), and chunk i goes to
  WORKDIR/samples/<name>/chunk_<i>.npz (`samples` [n, ...] int32, `labels`,
  `first_index`), written atomically. A rerun skips the chunks on disk.
  Sample j is drawn from fold_in(key(seed), j)'s keys whatever the chunking
  (`make_sampler`'s first_index), so the chunks concatenated
  (`load_samples`) equal one call over all N samples.

  Args:
    model: the model.
    params: its (EMA) parameters, fetchable by this process.
    workdir: the run directory.
    name: the directory under WORKDIR/samples (e.g.
      `config_lib.sample_output`: named by what produced the samples).
    options: how to sample (num_frames is ignored: no progressive grid).
    progress: called as progress(chunks_done, num_chunks) after each chunk,
      or None.
  Returns:
    The directory.
  Raises:
    ValueError: bad counts, or the directory holds chunks of other options
      (its meta.json differs): use another name.
  """
  for field in ("num_samples", "chunk_size"):
    value = getattr(options, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"options.{field}={value!r}: expected an int >= 1 "
                       f"(config.sampling.{field}).")
  if not name or os.sep in name or name in (".", ".."):
    raise ValueError(f"name={name!r}: expected one directory name under "
                     "WORKDIR/samples.")
  out = os.path.join(workdir, "samples", name)
  os.makedirs(out, exist_ok=True)
  meta = {k: v for k, v in dataclasses.asdict(options).items()
          if k != "num_frames"}
  meta_path = os.path.join(out, META_FILE)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      stored = json.load(f)
    if stored != meta:
      raise ValueError(
          f"{out} holds chunks sampled with {stored}, not {meta}; resume "
          "with the same sampling options, or write to another name.")
  else:
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, meta_path)

  size, total = options.chunk_size, options.num_samples
  num_chunks = -(-total // size)
  todo = [i for i in range(num_chunks)
          if not os.path.exists(os.path.join(out, f"chunk_{i}.npz"))]
  if todo:
    run = make_sampler(model, sampler=options.sampler,
                       num_steps=options.num_steps, num_samples=size,
                       guidance_scale=options.guidance_scale,
                       decode=options.decode, clip_x=options.clip_x)
    params = jax.device_get(params)
    key = jax.random.key(options.seed)
    # Labels of all N samples (classes in order), cut per chunk; the padded
    # tail of the last chunk repeats them (its samples are dropped).
    labels = sample_labels(model, num_chunks * size)
  for done, i in enumerate(todo, start=1):
    first = i * size
    count = min(size, total - first)
    chunk_labels = (None if labels is None
                    else labels[first:first + size])
    x, _ = run(params, key, chunk_labels, jnp.int32(first))
    x = np.asarray(jax.device_get(x))[:count]
    _atomic_savez(
        os.path.join(out, f"chunk_{i}.npz"), samples=x,
        labels=(np.asarray(chunk_labels)[:count] if chunk_labels is not None
                else np.zeros((0,), np.int32)),
        first_index=np.int64(first))
    if progress is not None:
      progress(num_chunks - len(todo) + done, num_chunks)
  return out


def load_samples(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """The samples of a `sample_to_dir` directory, in order.

  Returns:
    (samples [N, ...] int32, labels [N] int32 or [0] if unconditional).
  Raises:
    FileNotFoundError: no meta.json, or a chunk is missing (rerun
      `sample_to_dir` with the same options to finish it).
  """
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{meta_path} not found: {directory} was not "
                            "written by generation.sample_to_dir.")
  with open(meta_path) as f:
    meta = json.load(f)
  num_chunks = -(-meta["num_samples"] // meta["chunk_size"])
  samples, labels = [], []
  for i in range(num_chunks):
    path = os.path.join(directory, f"chunk_{i}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} is missing ({num_chunks} chunks expected): rerun the "
          "sampling with the same options to finish it.")
    with np.load(path) as chunk:
      samples.append(chunk["samples"])
      labels.append(chunk["labels"])
  return np.concatenate(samples), np.concatenate(labels)
