"""Generation: the jitted sampler of a model and the sample files of a run.

Functions take the model, its parameters and the sampling options as plain
arguments (`SamplingOptions`, built from `config.sampling` by the caller).
"""

from __future__ import annotations

import dataclasses
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
  """
  sampler: str
  num_steps: int
  num_samples: int
  guidance_scale: float = 0.0
  decode: str = "argmax"
  clip_x: bool = True
  num_frames: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, sampling_config) -> SamplingOptions:
    """The options of a `config.sampling` ConfigDict."""
    return cls(**{field.name: sampling_config[field.name]
                  for field in dataclasses.fields(cls)})


def make_sampler(model: model_lib.Model, *, sampler: str, num_steps: int,
                 num_samples: int, guidance_scale: float = 0.0,
                 decode: str = "argmax", clip_x: bool = True,
                 num_frames: int = 0):
  """A jitted (params, key, labels) -> (x [N, ...] ints, frames) function.

  `frames` is [num_frames, N, ...] x_hat along the chain (progressive
  generation), or None when num_frames == 0.
  """
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


def sample_labels(model: model_lib.Model, num_samples: int):
  """Labels for a sample grid: classes in order, or None if unconditional."""
  if not model.num_classes:
    return None
  return jnp.arange(num_samples, dtype=jnp.int32) % model.num_classes


def write_samples(model: model_lib.Model, params, workdir: str, step: int,
                  options: SamplingOptions) -> str:
  """Samples the model and writes WORKDIR/samples/<step>.png and .npz.

  Images also get a progressive-generation grid <step>_progressive.png when
  `options.num_frames` > 0; 2-D data gets a scatter plot as <step>.png.

  Args:
    model: the model.
    params: its (EMA) parameters, fetchable by this process.
    workdir: the run directory.
    step: the training step, in the file names.
    options: how to sample.
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
  np.savez_compressed(os.path.join(out, f"{step}.npz"), samples=x,
                      labels=np.asarray(labels) if labels is not None else [])
  path = os.path.join(out, f"{step}.png")
  if images:
    reporting.save_png(reporting.image_grid(
        reporting.to_uint8(x, model.vocab_size)), path)
    if frames is not None:
      rows = min(8, options.num_samples)
      # rows = samples, columns = time (t = 1 -> 0), like the DDPM figure.
      seq = np.transpose(np.asarray(frames)[:, :rows], (1, 0, 2, 3, 4))
      seq = seq.reshape(-1, *seq.shape[2:])
      reporting.save_png(
          reporting.image_grid(reporting.f_to_uint8(seq),
                               num_cols=frames.shape[0]),
          os.path.join(out, f"{step}_progressive.png"))
  else:
    reporting.save_scatter(x, model.vocab_size, path)
  return path
