"""VDM on 2-D toy data with a residual MLP (about 2 minutes on 2 CPU cores).

  python -m vdm.main --config=configs/toy2d.py --workdir=runs/toy2d
  python experiments/toy2d.py --workdir=runs/toy2d   # figures
"""
import ml_collections

from vdm import config_files

mnist5k = config_files.load_sibling(__file__, "mnist5k")


def get_config():
  config = mnist5k.get_config()
  config.data.dataset = "toy2d"
  config.data.vocab_size = 256           # levels per coordinate
  config.model.net = "mlp"
  config.model.net_kwargs = ml_collections.ConfigDict(dict(
      hidden=256, num_res_blocks=3, dropout=0.0,
      dtype="float32"))  # compute dtype: float32 | bfloat16 | float16
  config.training.batch_size = 256
  config.training.eval_batch_size = 1000
  config.training.num_steps = 4000
  config.training.checkpoint_every = 2000
  config.optimizer.learning_rate = 1e-3
  config.sampling.num_samples = 2000
  config.sampling.num_steps = 200
  config.sampling.clip_x = False
  return config
