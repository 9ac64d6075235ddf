"""vdm.reporting: TensorBoard scalars, console progress, images and plots."""

import io
import os
import types

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import PIL.Image
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


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_png_stores_the_pixels_exactly_gray_as_gray(tmp_path, channels,
                                                         mode):
  image = (np.arange(12 * channels, dtype=np.uint8).reshape(3, 4, channels)
           * 7)
  path = str(tmp_path / "sub" / "x.png")
  reporting.save_png(image, path)
  with PIL.Image.open(path) as back:
    assert back.mode == mode                     # gray stays 8-bit gray
    np.testing.assert_array_equal(
        np.asarray(back).reshape(image.shape), image)


def test_save_png_rejects_what_is_not_an_hwc_uint8_image(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    reporting.save_png(np.zeros((3, 4, 1), np.float32), str(tmp_path / "x"))
  with pytest.raises(ValueError, match=r"\[H, W, 1 or 3\]"):
    reporting.save_png(np.zeros((3, 4, 4), np.uint8), str(tmp_path / "x"))


def test_upscale_repeats_each_pixel_into_a_block_up_to_the_width():
  image = np.array([[[1], [2]], [[3], [4]]], np.uint8)     # [2, 2, 1]
  big = reporting.upscale(image, min_width=5)              # factor ceil(5/2)
  assert big.shape == (6, 6, 1)
  np.testing.assert_array_equal(big[:3, :3], 1)
  np.testing.assert_array_equal(big[3:, 3:], 4)
  np.testing.assert_array_equal(big[:3, 3:], 2)
  wide = np.zeros((2, 300, 3), np.uint8)
  assert reporting.upscale(wide, min_width=256).shape == wide.shape


def test_label_columns_writes_each_label_over_its_column():
  grid = np.full((10, 60, 1), 128, np.uint8)
  out = reporting.label_columns(grid, ["1.00", "", "0.00"], cell_width=20)
  assert out.shape == (24, 60, 1)
  np.testing.assert_array_equal(out[14:], grid)            # grid unchanged
  strip = out[:14, :, 0]
  assert (strip[:, 0:20] < 128).any() and (strip[:, 40:60] < 128).any()
  assert (strip[:, 20:40] == 255).all()                    # empty label


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
  quiet.write_image(1, "samples", np.zeros((2, 2, 1), np.uint8))
  quiet.write_text(1, "config", "x")
  quiet.close()
  assert not os.listdir(off)


def test_tensorboard_reads_the_scalars_images_and_text_written(tmp_path):
  accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"train/loss": 1.25, "train/steps_per_s": 4.0})
  writer.write_image(3, "samples", np.full((5, 7, 1), 200, np.uint8))
  writer.write_text(3, "config", "    lr: 0.001")
  writer.close()
  events = accumulator.EventAccumulator(str(tmp_path), size_guidance={
      accumulator.IMAGES: 0, accumulator.SCALARS: 0, accumulator.TENSORS: 0})
  events.Reload()
  [loss] = events.Scalars("train/loss")
  assert (loss.step, loss.value) == (3, 1.25)
  [image] = events.Images("samples")
  assert (image.step, image.height, image.width) == (3, 5, 7)
  [text] = events.Tensors("config/text_summary")
  assert text.tensor_proto.string_val == [b"    lr: 0.001"]


def test_write_image_rejects_a_float_image(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path), enabled=False)
  with pytest.raises(ValueError, match="uint8"):
    writer.write_image(0, "x", np.zeros((2, 2, 1), np.float32))


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


METRICS = {"loss": 1.0, "bpd_recon": 0.0, "bpd_prior": 0.0, "bpd_diff": 1.0,
           "grad_norm": 1.0}


def test_progress_rate_excludes_the_compile_and_is_smoothed(capsys,
                                                             monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(reporting.time, "monotonic", lambda: clock[0])
  progress = reporting.Progress(101, 0, smoothing=0.5)
  clock[0] = 50.0                      # the first step took 50 s: compile
  progress.compiled(1, 50.0)
  clock[0] = 51.0                      # steps 2..11: 0.1 s each
  progress.update(11, METRICS)
  assert progress.rate == pytest.approx(10.0)
  clock[0] = 54.0                      # steps 12..21: 0.3 s each
  progress.update(21, METRICS)
  # EMA of seconds per step: 0.1 + 0.5 * (0.3 - 0.1) = 0.2.
  assert progress.rate == pytest.approx(5.0)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("compiled the train step in 50.0 s")
  assert "10.00 steps/s  eta 0:00:09" in lines[1]     # 90 steps x 0.1 s
  assert "5.00 steps/s  eta 0:00:16" in lines[2]      # 80 steps x 0.2 s


def test_progress_draws_a_tqdm_bar_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  stream = Terminal()
  progress = reporting.Progress(10, 0, stream=stream)
  progress.update(5, METRICS)
  progress.message("between")
  progress.close()
  out = stream.getvalue()
  assert "|" in out and "5/10" in out and "between" in out
  assert "\r" in out                      # the bar redraws in place


def test_run_header_names_devices_data_model_and_the_start():
  devices = [types.SimpleNamespace(platform="gpu", device_kind="H100")] * 2
  common = dict(workdir="w", config_path="configs/x.py", devices=devices,
                process_count=1, dataset="digits",
                split_sizes={"train": 1438, "test": 359}, data_shape=(8, 8, 1),
                vocab_size=17, num_classes=10, net="mlp", num_params=10722,
                num_steps=1500, batch_size=32)
  header = reporting.run_header(resumed_step=None, **common)
  assert header.splitlines() == [
      "vdm: new run in w",
      "  config   configs/x.py; resolved: " + os.path.join("w", "config.json"),
      "  devices  2 x gpu (H100), 1 process",
      "  data     digits: 1,438 train / 359 test; 8x8x1, 17 levels, "
      "10 classes",
      "  model    mlp, 10,722 parameters; 1,500 steps at batch 32"]
  resumed = reporting.run_header(resumed_step=1000, **common)
  assert resumed.splitlines()[0] == "vdm: resumed from step 1,000 in w"


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
