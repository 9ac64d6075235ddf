"""VDM on downsampled ImageNet 64x64 (3.40 bpd in the paper).

  python -m vdm.main --config=configs/imagenet64.py --workdir=gs://BUCKET/i64

Needs tfds downsampled_imagenet/64x64, a manual download (see README).
Same family as imagenet32.py; at 64x64 the constant-resolution U-Net is
expensive, so this config uses the multi-resolution U-Net at the same width.
"""
import ml_collections

from vdm import config_files

imagenet32 = config_files.load_sibling(__file__, "imagenet32")


def get_config():
  config = imagenet32.get_config()
  config.data.dataset = "imagenet64"
  config.model.net = "unet"
  config.model.net_kwargs = ml_collections.ConfigDict(dict(
      channels=256, channel_mult=(1, 1, 2, 2), num_res_blocks=4,
      attention_resolutions=(16, 8), dropout=0.0,
      dtype="float32"))  # compute dtype: float32 | bfloat16 | float16
  config.training.batch_size = 512
  return config
