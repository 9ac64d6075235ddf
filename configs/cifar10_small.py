"""The paper's CIFAR-10 architecture shrunk to a CPU-sized smoke run.

  python -m vdm.main --config=configs/cifar10_small.py --workdir=runs/c10s
"""
from vdm import config_files

cifar10 = config_files.load_sibling(__file__, "cifar10")


def get_config():
  config = cifar10.get_config()
  config.model.net_kwargs.num_res_blocks = 2  # the paper: 32
  config.model.net_kwargs.channels = 32        # the paper: 128
  # 32 groups of 1 channel would normalise the noise embedding away.
  config.model.net_kwargs.num_groups = 8
  config.training.batch_size = 8         # fits 2 CPU cores; paper: 128
  config.training.eval_batch_size = 100
  config.training.num_steps = 200
  config.training.log_every = 20
  config.training.eval_every = 0
  # A smoke run: one draw over the 10,000 test images (16 would take ~16x
  # as long on a CPU); no standard error is reported with one draw.
  config.eval.num_draws = 1
  config.training.checkpoint_every = 100
  config.sampling.num_steps = 50
  config.sampling.num_samples = 16
  return config
