"""A seconds-scale config for the system tests (digits 8x8, small MLP).

  python -m vdm.main --config=tests/tiny_config.py --workdir=/tmp/tiny
"""
import os

import ml_collections

from vdm import config_files

digits = config_files.load_module(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "digits.py"))


def get_config():
  config = digits.get_config()
  config.model.net = "mlp"
  config.model.net_kwargs = ml_collections.ConfigDict(
      dict(hidden=32, num_res_blocks=1, dropout=0.0, dtype="float32"))
  config.training.batch_size = 8
  config.training.eval_batch_size = 100   # 359 test rows: last batch padded
  config.training.num_steps = 6
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.report_baselines = False
  config.training.num_devices = 1
  config.optimizer.warmup_steps = 2
  # The system tests check plumbing, not bpd: one draw keeps every eval
  # cheap (K stratified draws: tests/test_evaluate.py).
  config.eval.num_draws = 1
  config.sampling.num_samples = 4
  config.sampling.num_steps = 4
  config.sampling.num_frames = 2
  return config
