"""The demo model trained for about an hour on 2 CPU cores.

  python -m vdm.main --config=configs/mnist5k_long.py --workdir=runs/mnist5k_long
"""
from configs import mnist5k


def get_config():
  config = mnist5k.get_config()
  config.model.net_kwargs.channels = 48
  config.model.net_kwargs.num_res_blocks = 2
  config.training.num_steps = 12000
  config.training.eval_every = 3000
  config.training.checkpoint_every = 1000
  config.optimizer.ema_decay = 0.9995
  return config
