"""Base config of the weighting study (Kingma & Gao 2023 objectives).

  python experiments/weighting_study.py --dataset=mnist5k --steps=5000 \
      --out=runs/weighting_study_mnist5k
  python experiments/weighting_study.py --dataset=digits --steps=6000 \
      --out=runs/weighting_study          # 2 CPU cores, ~10-15 minutes

The study sets `model.weighting`, `model.noise_schedule` (and their kwargs)
per run and `data`/`model.net` per dataset; everything else is shared so that
only the objective differs. Single runs work too:

  python -m vdm.main --config=configs/mnist5k_weighting.py \
      --workdir=runs/sigmoid --config.model.weighting=sigmoid \
      --config.model.noise_schedule=adaptive
"""
from vdm import config_files

mnist5k = config_files.load_sibling(__file__, "mnist5k")


def get_config():
  config = mnist5k.get_config()
  config.model.net_kwargs.dropout = 0.0   # short runs: no regulariser needed
  # A fixed schedule, so every run's bpd is the ELBO over the same log-SNR
  # range ([-5, 13.3] here). A learned one gets its endpoint gradients only
  # from the recon and prior terms when training draws lambda from another
  # p: they drift, and the eval bpd would integrate over another range.
  config.model.schedule = "fixed_linear"
  config.training.num_steps = 5000
  config.training.log_every = 500
  config.training.checkpoint_every = 1000   # an interrupted study resumes
  config.training.report_baselines = False
  # Constant LR after warm-up: the update of step s does not depend on
  # num_steps, so a run continued in segments (to snapshot the adaptive
  # histogram) makes exactly the updates of one uninterrupted run.
  config.optimizer.decay = "none"
  config.sampling.num_samples = 0   # the study draws its own samples
  return config
