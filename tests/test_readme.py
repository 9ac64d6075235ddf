"""README.md: every Python block runs as written, on a tiny trained run.

The blocks load `runs/demo`; here that is a 6-step run of the tiny digits
config (tests/tiny_config.py) in a temporary directory, made the current
directory while the blocks run. The same run's TensorBoard events are read
back with TensorBoard's own reader.
"""

import os
import re

import pytest

from vdm import training_loop
import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md")) as _f:
  README = _f.read()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  """A directory holding runs/demo, a tiny trained run."""
  root = tmp_path_factory.mktemp("readme")
  training_loop.train_and_evaluate(tiny_config.get_config(),
                           str(root / "runs" / "demo"),
                           config_path="tests/tiny_config.py")
  return root


def test_readme_is_a_short_page_that_points_only_inside_the_repository():
  assert len(README.splitlines()) <= 200
  assert len(BLOCKS) >= 2
  links = re.findall(r"\]\(([^)#]+)\)", README)
  assert links                                     # images and docs
  for link in links:
    assert not link.startswith(("..", "/")), link
    assert os.path.exists(os.path.join(REPO, link)), f"broken link {link}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, demo_root, monkeypatch,
                                             capsys):
  monkeypatch.chdir(demo_root)
  code = compile(BLOCKS[index], f"README.md, python block {index + 1}",
                 "exec")
  exec(code, {"__name__": "__readme__"})  # pylint: disable=exec-used
  assert capsys.readouterr().out          # each block prints its result


@pytest.mark.slow
def test_a_runs_events_hold_scalars_images_and_text(demo_root):
  accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  events = accumulator.EventAccumulator(
      str(demo_root / "runs" / "demo"), size_guidance={
          accumulator.IMAGES: 0, accumulator.SCALARS: 0,
          accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()
  for name in ("train/loss", "train/bpd_recon", "train/bpd_prior",
               "train/bpd_diff", "train/learning_rate", "train/grad_norm",
               "train/steps_per_s", "eval/bpd"):
    assert name in tags["scalars"], name
  assert [s.step for s in events.Scalars("train/loss")] == [2, 4, 6]
  assert [s.step for s in events.Scalars("eval/bpd")] == [6]
  assert all(s.value > 0 for s in events.Scalars("train/steps_per_s"))
  assert set(tags["images"]) == {"samples", "samples_progressive"}
  [grid] = events.Images("samples")
  assert grid.step == 6 and grid.width >= 256     # upscaled for viewing
  [config] = events.Tensors("config/text_summary")
  text = config.tensor_proto.string_val[0].decode()
  assert '"dataset": "digits"' in text
