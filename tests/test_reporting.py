"""vdm.reporting: TensorBoard scalars, console progress, images and plots."""

import os
import types

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from vdm import model as model_lib
from vdm import reporting
import tiny_config


def fake_model(vocab_size, eps_fn, num_classes=0):
  """The attributes of a `Model` that `loss_vs_logsnr` reads."""
  return types.SimpleNamespace(vocab_size=vocab_size, num_classes=num_classes,
                               eps_fn=eps_fn)


def test_image_grid_places_each_image_with_a_white_border():
  images = np.stack([np.full((2, 3, 1), 10 * i, np.uint8) for i in range(5)])
  grid = reporting.image_grid(images)          # 5 images -> 3 columns, 2 rows
  assert grid.shape == (2 * 3 - 1, 3 * 4 - 1, 1)
  np.testing.assert_array_equal(grid[0:2, 4:7], 10)     # image 1: row 0, col 1
  np.testing.assert_array_equal(grid[3:5, 4:7], 40)     # image 4: row 1, col 1
  np.testing.assert_array_equal(grid[2, :], 255)        # border row
  np.testing.assert_array_equal(grid[3:5, 8:11], 255)   # empty sixth slot
  assert reporting.image_grid(images, num_cols=5).shape == (2, 19, 1)


def test_image_grid_rejects_a_single_image():
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    reporting.image_grid(np.zeros((8, 8, 1), np.uint8))


def test_to_uint8_maps_the_levels_onto_0_255():
  np.testing.assert_array_equal(reporting.to_uint8(np.array([0, 8, 16]), 17),
                                [0, 128, 255])
  np.testing.assert_array_equal(
      reporting.f_to_uint8(np.array([-1.0, 0.0, 1.0, 1.5])), [0, 128, 255, 255])


def test_save_png_round_trips_a_gray_image(tmp_path):
  image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
  path = str(tmp_path / "sub" / "x.png")
  reporting.save_png(image, path)
  back = matplotlib.image.imread(path)          # [3, 4, 4] RGBA in [0, 1]
  # atol: the gray colormap's 256-entry lookup table moves some levels by 1.
  np.testing.assert_allclose(np.round(back[..., 0] * 255), image[..., 0],
                             atol=1)


def test_save_scatter_writes_a_png(tmp_path):
  path = str(tmp_path / "s.png")
  reporting.save_scatter(np.array([[0, 255], [128, 3]]), 256, path)
  assert matplotlib.image.imread(path).ndim == 3


def test_metric_writer_writes_events_only_when_enabled(tmp_path):
  on, off = tmp_path / "on", tmp_path / "off"
  os.makedirs(off)
  writer = reporting.MetricWriter(str(on))
  writer.write_scalars(1, {"train/loss": 1.5, "split": "test"})
  writer.close()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(on))
  quiet = reporting.MetricWriter(str(off), enabled=False)
  quiet.write_scalars(1, {"train/loss": 1.5})
  quiet.close()
  assert not os.listdir(off)


def test_progress_prints_one_line_per_update(capsys):
  progress = reporting.Progress(10, 0)
  metrics = {"loss": 1.23456, "bpd_recon": 0.1, "bpd_prior": 0.02,
             "bpd_diff": 1.1, "grad_norm": 3.14159}
  progress.update(5, metrics)
  progress.message("done")
  progress.close()
  lines = capsys.readouterr().out.splitlines()   # not a tty under pytest
  assert lines[0].startswith("step 5/10  ")
  assert lines[0].endswith("loss 1.2346 bpd (recon 0.1000 prior 0.0200 "
                           "diff 1.1000)  grad_norm 3.14")
  assert lines[1] == "done"
  reporting.Progress(10, 0, enabled=False).update(5, metrics)
  assert not capsys.readouterr().out


@pytest.mark.parametrize("lam", [-4.0, 0.0, 3.0])
def test_loss_vs_logsnr_matches_a_float64_reference(lam):
  # eps_hat = z_t: the error eps - z_t = (1 - sigma) eps - alpha f is known in
  # closed form given the draws, and a swapped sign of lambda (alpha <->
  # sigma) or a wrong encoding would change it.
  vocab, key = 17, jax.random.key(7)
  x = np.arange(24).reshape(3, 8) % vocab
  model = fake_model(vocab, lambda params, labels: lambda z, gamma: z)
  mse = reporting.loss_vs_logsnr(model, {}, x, None, np.array([lam, lam]),
                                 key)
  f = 2.0 * (x + 0.5) / vocab - 1.0
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  for i in range(2):   # level i draws its eps from fold_in(key, i)
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape),
                     np.float64)
    expected = np.mean(((1 - sigma) * eps - alpha * f) ** 2)
    # rtol: float32 arithmetic on O(1) values.
    np.testing.assert_allclose(mse[i], expected, rtol=1e-5)
  assert mse.dtype == np.float64 and mse[0] != mse[1]   # separate draws


def test_loss_vs_logsnr_passes_the_labels_to_the_network():
  x = np.zeros((4, 2), np.int32)
  labels = jnp.arange(4)
  model = fake_model(
      4, lambda params, labels: lambda z, gamma: jnp.zeros_like(z)
      + params["scale"] * labels[:, None], num_classes=4)
  key = jax.random.key(0)
  mse = reporting.loss_vs_logsnr(model, {"scale": 1.0}, x, labels,
                                 np.array([0.0]), key)
  eps = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (4, 2)),
                   np.float64)
  expected = np.mean((eps - np.arange(4)[:, None]) ** 2)
  np.testing.assert_allclose(mse[0], expected, rtol=1e-5)


def test_write_plots_writes_both_figures(tmp_path):
  config = tiny_config.get_config()
  model = model_lib.build(config.model, (8, 8, 1), 17, 10)
  params = model.init(jax.random.key(0))
  batch = {"image": np.arange(4 * 64).reshape(4, 8, 8, 1) % 17,
           "label": np.arange(4, dtype=np.int32)}
  paths = reporting.write_plots(model, params, str(tmp_path), 3, batch)
  assert [os.path.relpath(p, tmp_path) for p in paths] == [
      os.path.join("plots", "schedule_3.png"),
      os.path.join("plots", "loss_vs_logsnr_3.png")]
  for path in paths:
    assert matplotlib.image.imread(path).ndim == 3
