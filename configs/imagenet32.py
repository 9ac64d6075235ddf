"""VDM on downsampled ImageNet 32x32 (3.72 bpd in the paper).

  python -m vdm.main --config=configs/imagenet32.py --workdir=gs://BUCKET/i32

Needs tfds downsampled_imagenet/32x32, a manual download (see README).
Architecture as the VDM paper's appendix on experimental details gives it for
ImageNet 32x32: the CIFAR-10 U-Net widened to 256 channels, no dropout.
"""
from vdm import config_files

cifar10 = config_files.load_sibling(__file__, "cifar10")


def get_config():
  config = cifar10.get_config()
  config.data.dataset = "imagenet32"
  config.model.net_kwargs.channels = 256
  config.model.net_kwargs.dropout = 0.0
  config.training.batch_size = 512
  return config
