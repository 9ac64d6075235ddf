"""The demo model trained 6x longer: 56 minutes on 2 CPU cores, 1.097 bpd.

  python -m vdm.main --config=configs/mnist5k_long.py --workdir=runs/mnist5k_long
"""
from vdm import config_files

mnist5k = config_files.load_sibling(__file__, "mnist5k")


def get_config():
  config = mnist5k.get_config()
  config.training.num_steps = 9000
  config.training.eval_every = 3000
  config.training.checkpoint_every = 1000
  config.optimizer.ema_decay = 0.9995
  return config
