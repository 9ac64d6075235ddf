"""The VDM paper's CIFAR-10 model (2.65 bpd in the paper), for GPU / TPU.

  python -m vdm.main --config=configs/cifar10.py --workdir=gs://BUCKET/c10
  python -m vdm.main --config=configs/cifar10.py --workdir=DIR --mode=eval

Settings from Kingma et al. 2021 (arXiv:2107.00630), appendix on experimental
details, and the official configs/cifar10.py: 32 ResNet blocks at 128
channels with no downsampling, Fourier features, dropout 0.1, learned linear
schedule initialised at [-13.3, 5], continuous time, AdamW lr 2e-4 (100
warm-up steps), b2 0.99, weight decay 0.01, EMA 0.9999, batch 128.
Needs the tfds cifar10 dataset prepared in data.data_dir (see README).
"""
import ml_collections

from vdm import config_files

mnist5k = config_files.load_sibling(__file__, "mnist5k")


def get_config():
  config = mnist5k.get_config()
  config.data.dataset = "cifar10"
  config.model.net = "vdm_unet"
  config.model.net_kwargs = ml_collections.ConfigDict(dict(
      num_res_blocks=32, channels=128, dropout=0.1, attention=False,
      num_groups=32,
      # GroupNorm + swish + dropout kernel: auto = fused on GPUs (Pallas),
      # plain elsewhere | on | off; the same function either way.
      fused_norm="auto",
      dtype="float32"))  # compute dtype: float32 | bfloat16 | float16
  config.model.schedule = "learned_linear"
  config.training.batch_size = 128
  config.training.eval_batch_size = 500
  config.training.num_steps = 10_000_000
  config.training.log_every = 1000
  config.training.eval_every = 10_000
  config.training.checkpoint_every = 10_000
  config.training.max_to_keep = 3
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "none"
  config.optimizer.grad_clip = 0.0       # the paper does not clip
  config.optimizer.ema_decay = 0.9999
  config.sampling.num_steps = 1000
  config.sampling.num_samples = 100
  return config
