"""VDM on scikit-learn's 8x8 digits (17 levels), a seconds-scale smoke run.

  python -m vdm.main --config=configs/digits.py --workdir=runs/digits
"""
from vdm import config_files

mnist5k = config_files.load_sibling(__file__, "mnist5k")


def get_config():
  config = mnist5k.get_config()
  config.data.dataset = "digits"
  config.data.vocab_size = 17            # pixel values 0..16
  config.model.net_kwargs.channel_mult = (1, 2)
  config.model.net_kwargs.attention_resolutions = ()
  config.training.num_steps = 1000
  config.training.checkpoint_every = 500
  config.sampling.num_steps = 100
  return config
