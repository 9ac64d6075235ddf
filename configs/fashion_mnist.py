"""VDM on the full Fashion-MNIST (60k/10k), offline from Debian's package.

  make fashion-mnist      # apt-get install dataset-fashion-mnist (root)
  python -m vdm.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
"""
from vdm import config_files

mnist5k_long = config_files.load_sibling(__file__, "mnist5k_long")


def get_config():
  config = mnist5k_long.get_config()
  config.data.dataset = "fashion_mnist"
  config.training.eval_batch_size = 500
  return config
