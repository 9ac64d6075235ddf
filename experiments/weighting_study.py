r"""Diffusion objectives side by side: weighted ELBOs (Kingma & Gao 2023).

  python experiments/weighting_study.py --dataset=digits --steps=6000 \
      --out=runs/weighting_study

Trains one model per objective (table below), each in its own workdir
OUT/<run>/ (rerunning the command resumes an interrupted study and skips
finished runs), then writes OUT/results.md, OUT/results.json and
OUT/plots/*.png. Every run shares data, network, optimiser, steps and seed;
only `model.weighting` and the training noise schedule p(lambda)
(`model.noise_schedule`) differ. The network predicts eps in every run
(`model.parameterization='eps'`), so the objectives differ only in the
weighting and p(lambda).

  run                      w(lambda)              p(lambda) for training
  elbo                     1 (the ELBO)           the model's (fixed linear)
  sigmoid                  sigmoid(2 - lambda)    cosine
  edm_monotonic            EDM, monotonic         EDM, log sigma ~ N(-1.2, 1.44)
  v_cosine                 exp(-lambda / 2)       cosine
  eps_cosine               sech(lambda / 2)       cosine
  <each>_adaptive          the same               adaptive histogram

Non-ELBO weightings are paired with the schedule they come from (Kingma &
Gao 2023, table 1: v- and eps-MSE with the cosine schedule, EDM with its
log-normal sigma; sigmoid with cosine, as in their experiments), so that
`w / p` is the familiar per-example weight; the `_adaptive` variant of each
draws lambda from the adaptive histogram instead (K&G, adaptive noise
schedule: same objective, lower-variance estimator), over lambda in
[-15, 15] (the model's range for the ELBO). The model's own schedule is the
fixed linear one (configs/mnist5k_weighting.py), so every bpd integrates
over the same log-SNR range: [-5, 13.3] for mnist5k, [-10, 7.5] for digits
(see `base_config`).

Reported per run: test bits/dim, always the *unweighted* continuous-time
ELBO with the model's own schedule (so comparable across objectives), with
its recon/prior/diffusion terms; and a sample-quality number: the Frechet
distance between --num_samples ancestral samples and the test split in the
features of a small CNN trained on the train split by this project
(`vdm/frechet.py`). That distance is NOT Inception FID and is not comparable
to published FIDs; the table also gives its floor, train images vs test.

The bpd and its terms are means over --num_draws draws of (t, eps) per test
image (one draw's bpd is too noisy to tell the runs apart). The draws come
in i.i.d. groups of config.eval.strata draws with stratified t
(`train.eval_step`); the bpd's Monte Carlo standard error is the spread of
the groups' split means over sqrt(groups). Every run is evaluated on the
same draws (common random numbers: the draws' keys and times depend only on
the eval seed, the draw and the batch), so the difference of two runs' bpd
has the standard error of the per-group differences, far below either
run's own. results.md
lists the differences against the ELBO run and of each adaptive run against
its fixed-schedule twin with that paired standard error and marks
|difference| > 2 SE (significant at ~95%). These error bars cover the
eval's Monte Carlo noise only: each objective is one trained model (one
training seed), so they say whether two trained models differ, not how
much another training seed would move them. A finished run whose stored
result lacks this eval (or has other eval settings) is re-evaluated from
its checkpoint on a rerun, without retraining or resampling.

Plots (OUT/plots/): weightings.png (w(lambda) of every weighting, each
normalised to max 1 on the plotted range), schedules.png (p(lambda) of the
model's linear schedule (as learned by the ELBO run if learned), cosine,
shifted cosine, EDM, and each adaptive run's final histogram),
adaptive_evolution.png (the histogram at several steps of every adaptive
run; runs are continued in segments and the state read from the
checkpoint), loss_vs_logsnr.png (per run: the ELBO integrand
0.5 E||eps - eps_hat||^2 per dim over lambda on the test split, and the
weighted one w(lambda) times it), samples.png.

References:
  Kingma, Gao. Understanding Diffusion Objectives as the ELBO with Simple Data
    Augmentation. arXiv:2303.00848, 2023.
  Karras, Aittala, Aila, Laine. Elucidating the Design Space of
    Diffusion-Based Generative Models. arXiv:2206.00364, 2022.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import matplotlib  # pylint: disable=wrong-import-position
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from vdm import config_files  # pylint: disable=wrong-import-position
from vdm import config_lib  # pylint: disable=wrong-import-position
from vdm import evaluate  # pylint: disable=wrong-import-position
from vdm import frechet  # pylint: disable=wrong-import-position
from vdm import generation  # pylint: disable=wrong-import-position
from vdm import input_pipeline  # pylint: disable=wrong-import-position
from vdm import reporting  # pylint: disable=wrong-import-position
from vdm import schedules  # pylint: disable=wrong-import-position
from vdm import training_loop  # pylint: disable=wrong-import-position
from vdm import weighting  # pylint: disable=wrong-import-position

mnist5k_weighting = config_files.load_module(
    os.path.join(REPO, "configs", "mnist5k_weighting.py"))

# name: (weighting, weighting kwargs, native noise schedule).
OBJECTIVES = {
    "elbo": ("elbo", {}, "model"),
    "sigmoid": ("sigmoid", {"bias": 2.0}, "cosine"),
    "edm_monotonic": ("edm_monotonic", {}, "edm"),
    "v_cosine": ("v_cosine", {}, "cosine"),
    "eps_cosine": ("eps_cosine", {}, "cosine"),
}
LAM_PLOT = np.linspace(-15.0, 15.0, 601)
LAM_LOSS = np.linspace(-15.0, 15.0, 61)      # loss-vs-logsnr grid
NUM_SNAPSHOTS_FRACTIONS = (1 / 32, 1 / 8, 1 / 2, 1.0)
NUM_DRAWS = 256     # eval draws of (t, eps) per test example


def run_names(selected: str | None) -> list[str]:
  names = [n for base in OBJECTIVES for n in (base, base + "_adaptive")]
  if not selected:
    return names
  chosen = [n.strip() for n in selected.split(",") if n.strip()]
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    raise ValueError(f"unknown run(s) {unknown}; known: {', '.join(names)}.")
  return [n for n in names if n in chosen]


def base_config(dataset: str, steps: int,
                batch_size: int | None) -> ml_collections.ConfigDict:
  """The shared config: configs/mnist5k_weighting.py, per-dataset net."""
  config = mnist5k_weighting.get_config()
  if dataset == "digits":   # 8x8, 17 levels: a residual MLP trains in minutes
    config.data.dataset = "digits"
    config.data.vocab_size = 17
    config.model.net = "mlp"
    config.model.net_kwargs = ml_collections.ConfigDict(
        dict(hidden=256, num_res_blocks=2, dropout=0.0))
    config.training.batch_size = 64
    # The log-SNR range [-10, 7.5] that a pilot ELBO run with the learned
    # linear schedule settled on (gamma_0 -7.54, gamma_1 9.76 after 3000
    # steps). The default [-5, 13.3] made every run's bpd ~6: above lambda
    # ~5 the MLP cannot resolve the 17 levels (eps-MSE stays ~1), and the
    # ELBO integrates 0.5 nats/dim per unit of lambda there.
    config.model.gamma_min = -7.5
    config.model.gamma_max = 10.0
  elif dataset != "mnist5k":
    raise ValueError(f"--dataset must be digits or mnist5k; got {dataset!r}.")
  if batch_size:
    config.training.batch_size = batch_size
  config.training.num_steps = steps
  config.training.checkpoint_every = max(1, min(1000, steps // 4))
  config.training.max_to_keep = 1
  config.training.log_every = max(1, min(500, steps // 4))
  config.training.num_devices = 1
  return config


def run_config(base: ml_collections.ConfigDict, name: str):
  config = ml_collections.ConfigDict(base.to_dict())
  objective = name.removesuffix("_adaptive")
  w_name, w_kwargs, native = OBJECTIVES[objective]
  config.model.weighting = w_name
  config.model.weighting_kwargs = ml_collections.ConfigDict(w_kwargs)
  if name.endswith("_adaptive"):
    lam_min, lam_max = (-15.0, 15.0)
    if objective == "elbo":   # the ELBO's own range
      lam_min, lam_max = -config.model.gamma_max, -config.model.gamma_min
    config.model.noise_schedule = "adaptive"
    config.model.noise_schedule_kwargs = ml_collections.ConfigDict(
        dict(num_bins=100, lam_min=lam_min, lam_max=lam_max))
  else:
    config.model.noise_schedule = native
  return config


def snapshot_steps(steps: int) -> list[int]:
  return sorted({max(1, int(round(f * steps)))
                 for f in NUM_SNAPSHOTS_FRACTIONS})


def trained_to(config, workdir: str, step: int) -> bool:
  """Whether a run of `config` reached `step` and wrote its final eval
  there (the file `training_loop` names by `config_lib.eval_output`)."""
  name, _ = config_lib.eval_output(config, "test", step)
  return os.path.exists(os.path.join(workdir, "eval", f"{name}.json"))


def with_num_draws(config, num_draws: int) -> ml_collections.ConfigDict:
  """`config` evaluating `num_draws` draws of (t, eps) per test image.

  Training keeps the one-draw final eval (cheap, and an adaptive run makes
  one per segment); the study's K-draw eval runs once, after training.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.num_draws = num_draws
  return config


def eval_settings(config) -> dict:
  """What makes two runs' evals draw the same (t, eps): the eval seed, the
  eval batch size (the batch index and the antithetic times across a batch
  follow it), the number of draws and the draws per stratified group."""
  opts = config_lib.eval_options(config)
  return {"num_draws": int(opts["num_draws"]), "strata": int(opts["strata"]),
          "eval_seed": int(config.training.eval_seed),
          "eval_batch_size": int(config.training.eval_batch_size)}


def has_eval(result: dict, config) -> bool:
  """Whether a stored result holds the K-draw eval that `config` asks for."""
  return "bpd_groups" in result and all(
      result.get(k) == v for k, v in eval_settings(config).items())


def train_run(config, workdir: str, adaptive: bool) -> float:
  """Trains (resuming); adaptive runs in segments with histogram snapshots.

  Returns the wall seconds spent training in this call.
  """
  start = time.time()
  steps = config.training.num_steps
  if not adaptive:
    if not trained_to(config, workdir, steps):
      training_loop.train_and_evaluate(config, workdir)
    return time.time() - start
  trainer = None
  os.makedirs(os.path.join(workdir, "adaptive"), exist_ok=True)
  for end in snapshot_steps(steps):
    path = os.path.join(workdir, "adaptive", f"{end}.npz")
    if os.path.exists(path):
      continue
    segment = ml_collections.ConfigDict(config.to_dict())
    segment.training.num_steps = end
    if not trained_to(segment, workdir, end):
      training_loop.train_and_evaluate(segment, workdir)
    trainer = trainer or training_loop.Trainer(config)
    state, step = training_loop.restore_for_inference(trainer, workdir)
    state = jax.device_get(state)
    if step != end:
      raise RuntimeError(f"{workdir}: expected a checkpoint at step {end}, "
                         f"found {step}; remove the workdir and rerun.")
    np.savez(path, **state.adaptive._asdict())
  return time.time() - start


def k_draw_eval(trainer, params, step: int, workdir: str) -> dict:
  """The test eval with trainer.config.eval.num_draws draws, written to the
  run's eval JSON (`config_lib.eval_output` names it); returns the fields
  of a result that hold it."""
  t0 = time.time()
  record = trainer.evaluate(params)
  seconds = time.time() - t0
  name, produced_by = config_lib.eval_output(trainer.config, "test", step)
  evaluate.write_eval_json(workdir, "test", step, record,
                           dataset_version=trainer.ds.version, name=name,
                           record=produced_by)
  fields = {k: record[k] for k in ("bpd", "bpd_se", "bpd_recon", "bpd_prior",
                                   "bpd_diff", "bpd_draws", "bpd_groups",
                                   "num_groups", "num_examples")}
  fields.update(eval_settings(trainer.config))
  fields["eval_seconds"] = round(seconds, 1)     # compilation included
  return fields


def reevaluate(result: dict, config, workdir: str) -> dict:
  """A finished run's stored result with the K-draw eval of `config` in
  place of its old bpd fields (rewrites result.json)."""
  trainer = training_loop.Trainer(config)
  state, step = training_loop.restore_for_inference(trainer, workdir)
  if step != result["step"]:
    raise RuntimeError(f"{workdir}: result.json is of step {result['step']} "
                       f"but the checkpoint of step {step}; remove the "
                       "workdir and rerun.")
  result.update(k_draw_eval(trainer, jax.device_get(state).ema_params, step,
                            workdir))
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def finish_run(name: str, config, workdir: str, args, extractor,
               test_images: np.ndarray, train_seconds: float,
               run_start: float) -> dict:
  """K-draw eval, samples, Frechet distance, loss-vs-lambda -> result.json.

  `config` is the run's with the study's eval (`with_num_draws`).
  """
  trainer = training_loop.Trainer(config)
  state, step = training_loop.restore_for_inference(trainer, workdir)
  state = jax.device_get(state)
  model = trainer.model
  params = state.ema_params
  evaluated = k_draw_eval(trainer, params, step, workdir)
  sampler = generation.make_sampler(
      model, sampler="ancestral", num_steps=args.sampling_steps,
      num_samples=args.num_samples, decode="argmax", clip_x=True)
  t0 = time.time()
  samples, _ = sampler(params, jax.random.key(args.seed), None)
  samples = np.asarray(jax.device_get(samples))
  sample_seconds = time.time() - t0
  np.savez_compressed(os.path.join(workdir, "samples.npz"), samples=samples)
  reporting.save_png(reporting.image_grid(reporting.to_uint8(
      samples[:64], model.vocab_size)), os.path.join(workdir, "samples.png"))
  fd = frechet.frechet_distance_features(extractor.features(samples),
                                         extractor.features(test_images))
  gamma_0, gamma_1 = (float(g) for g in model.endpoints(params))
  w_name, w_kwargs, _ = OBJECTIVES[name.removesuffix("_adaptive")]
  result = {
      "run": name, "weighting": w_name, "weighting_kwargs": w_kwargs,
      "noise_schedule": config.model.noise_schedule,
      "noise_schedule_kwargs": config.model.noise_schedule_kwargs.to_dict(),
      "step": step, **evaluated,
      "fd_classifier": fd, "num_samples": int(samples.shape[0]),
      "sampling_steps": args.sampling_steps,
      "train_seconds": round(train_seconds, 1),
      "sample_seconds": round(sample_seconds, 1),
      "gamma_0": gamma_0, "gamma_1": gamma_1,
      "loss_logsnr": LAM_LOSS.tolist(),
      "eps_mse_per_dim": reporting.loss_vs_logsnr(
          model, params, test_images, None, LAM_LOSS,
          jax.random.key(0)).tolist(),
  }
  result["run_seconds"] = round(time.time() - run_start, 1)   # all of it
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


# --------------------------------------------------------------------- output


def _w(name: str):
  w_name, w_kwargs, _ = OBJECTIVES[name]
  return weighting.get(w_name, **w_kwargs)


def comparisons(names: list[str]) -> list[tuple[str, str]]:
  """(run, reference) pairs to compare: every run against the ELBO run,
  then each adaptive run against its fixed-schedule twin."""
  pairs = [(n, "elbo") for n in names if n != "elbo" and "elbo" in names]
  for name in names:
    twin = name.removesuffix("_adaptive")
    if twin != name and twin in names and (name, twin) not in pairs:
      pairs.append((name, twin))
  return pairs


def paired_difference(run: dict, reference: dict) -> dict:
  """bpd(run) - bpd(reference) on common random numbers.

  Draw k of both evals used the same (t, eps), so their groups' bpd are
  paired. The unit that is i.i.d. is the group, not the draw: the draws of
  a group share stratified times (negatively correlated), while the groups
  are independent (the antithetic times across a batch only stratify
  within one draw). So the difference's standard error is the spread of the
  R per-group differences over sqrt(R). 'se_unpaired' is what it would be
  with independent draws for the two runs, sqrt(se_run^2 + se_reference^2).
  """
  for key in ("num_draws", "strata", "eval_seed", "eval_batch_size",
              "num_examples"):
    if run[key] != reference[key]:
      raise ValueError(f"{run['run']} and {reference['run']} were evaluated "
                       f"with {key} {run[key]} vs {reference[key]}: their "
                       "draws are not paired.")
  d = np.asarray(run["bpd_groups"]) - np.asarray(reference["bpd_groups"])
  diff = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(d.size))
  return {"run": run["run"], "reference": reference["run"], "diff": diff,
          "se": se, "z": diff / se, "significant": bool(abs(diff) > 2 * se),
          "se_unpaired": math.hypot(run["bpd_se"], reference["bpd_se"])}


def write_table(results: list[dict], comparison: list[dict], out: str,
                meta: dict) -> str:
  lines = [
      f"Dataset {meta['dataset']} ({meta['dataset_version']}), "
      f"{meta['steps']} steps x batch {meta['batch_size']} per run, "
      f"net {meta['net']}, seed {meta['seed']}; {meta['machine']}; "
      f"wall time of the runs (training, eval, sampling, Frechet) "
      f"{meta['runs_wall_minutes']:.1f} min.",
      "",
      "| run | w(lambda) | training p(lambda) | test bpd ± SE | recon | "
      "prior | diff | Frechet dist. (classifier features, not FID) | "
      "train s |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    kwargs = ", ".join(f"{k}={v}" for k, v in r["weighting_kwargs"].items())
    w_label = r["weighting"] + (f" ({kwargs})" if kwargs else "")
    lines.append(
        f"| {r['run']} | {w_label} | {r['noise_schedule']} | "
        f"{r['bpd']:.4f} ± {r['bpd_se']:.4f} | {r['bpd_recon']:.4f} | "
        f"{r['bpd_prior']:.4f} | {r['bpd_diff']:.4f} | "
        f"{r['fd_classifier']:.2f} | {r['train_seconds']:.0f} |")
  lines += [
      "",
      f"Reference: Frechet distance of {meta['num_floor']} train images to "
      f"the test split (the floor): {meta['fd_floor']:.2f}; per-pixel "
      f"categorical baseline {meta['baseline_bpd']:.4f} bpd, uniform "
      f"{meta['uniform_bpd']:.4f} bpd.",
      f"bpd: unweighted continuous-time ELBO with each model's own schedule "
      f"on all {meta['num_test']} test examples (EMA params), the mean of "
      f"{meta['num_draws']} draws of (t, eps) per example in "
      f"{meta['num_groups']} i.i.d. groups of {meta['strata']} with "
      f"stratified t (eval seed {meta['eval_seed']}, eval batch "
      f"{meta['eval_batch_size']}); SE: its Monte Carlo standard error, sd "
      f"of the groups' split means / sqrt({meta['num_groups']}). One draw's "
      f"bpd (what a one-draw eval reports) has an sd of "
      f"{meta['one_draw_sd_min']:.3f}-{meta['one_draw_sd_max']:.3f} bpd "
      f"over the runs. The {meta['num_draws']}-draw eval took "
      f"{meta['eval_seconds_min']:.1f}-{meta['eval_seconds_max']:.1f} s "
      f"per run, compilation included. Frechet "
      f"distance: {meta['num_samples']} ancestral samples "
      f"({meta['sampling_steps']} steps) vs the test split in the "
      f"{meta['num_features']}-d features of a CNN trained on the train split"
      f" (test accuracy {meta['classifier_accuracy']:.3f}); "
      + frechet.NOT_FID_NOTE,
      "train s: wall seconds of training incl. compilation; adaptive runs "
      "train in 4 segments (histogram snapshots), each compiling anew and "
      "ending with a test eval.",
      "",
      "Paired differences (common random numbers: every run saw the same "
      f"{meta['num_draws']} draws of (t, eps) per test example). diff: "
      "bpd(run) - bpd(reference), negative = run better; SE: sd of the "
      f"{meta['num_groups']} per-group differences / sqrt"
      f"({meta['num_groups']}); z = diff / SE; significant: |diff| > 2 SE "
      "(~95% for one comparison; if no pair differed, "
      f"{0.05 * len(comparison):.1f} of these {len(comparison)} would "
      "cross it by chance on average); "
      "SE unpaired: the SE with independent draws per run, for comparison. "
      "The SEs are of the eval's Monte Carlo noise only (one trained model "
      "per objective; training noise is not in them).",
      "",
      "| run | reference | diff (bpd) | SE | z | significant | SE unpaired |",
      "|---|---|---|---|---|---|---|"]
  for c in comparison:
    lines.append(
        f"| {c['run']} | {c['reference']} | {c['diff']:+.4f} | "
        f"{c['se']:.4f} | {c['z']:+.1f} | "
        f"{'yes' if c['significant'] else 'no'} | {c['se_unpaired']:.4f} |")
  path = os.path.join(out, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"meta": meta, "runs": [
        {k: v for k, v in r.items() if k not in ("loss_logsnr",
                                                 "eps_mse_per_dim")}
        for r in results], "paired_differences": comparison}, f, indent=2)
  return path


def plot_weightings(path: str):
  fig, ax = plt.subplots(figsize=(6, 4))
  lam = LAM_PLOT
  for name in OBJECTIVES:
    w = np.asarray(_w(name)(jnp.float32(lam)), np.float64)
    ax.semilogy(lam, w / w.max(), label=name)
  ax.set(xlabel="log-SNR lambda", ylabel="w(lambda) / max w",
         title="weightings (each normalised to max 1 on [-15, 15])",
         ylim=(1e-5, 2))
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_schedules(path: str, results: dict[str, dict], out: str, config,
                   resolution: int):
  lam = jnp.float32(LAM_PLOT)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ax = axes[0]
  g_min, g_max = config.model.gamma_min, config.model.gamma_max
  learned = config.model.schedule != "fixed_linear"
  ax.plot(LAM_PLOT, schedules.get_density(
      "fixed_linear", gamma_min=g_min, gamma_max=g_max)(lam),
          label=f"model's linear{', init' if learned else ''} "
          f"[{-g_max:g}, {-g_min:g}]")
  if learned and "elbo" in results:
    r = results["elbo"]
    ax.plot(LAM_PLOT, schedules.get_density(
        "fixed_linear", gamma_min=r["gamma_0"], gamma_max=r["gamma_1"])(lam),
            label=f"model's linear, learned by elbo [{-r['gamma_1']:.1f}, "
            f"{-r['gamma_0']:.1f}]")
  ax.plot(LAM_PLOT, schedules.get_density("cosine")(lam), label="cosine")
  shift = schedules.cosine_shift(resolution)
  ax.plot(LAM_PLOT, schedules.get_density("cosine", shift=shift)(lam),
          label=f"shifted cosine (shift {shift:+.2f}, res {resolution})")
  ax.plot(LAM_PLOT, schedules.get_density("edm")(lam), label="EDM")
  ax.set(xlabel="log-SNR lambda", ylabel="p(lambda)",
         title="fixed noise schedules")
  ax.legend(fontsize=7)
  ax = axes[1]
  for name in results:
    final = _final_adaptive(out, name)
    if final is not None:
      ax.plot(LAM_PLOT, schedules.adaptive_density(final, lam), label=name)
  ax.set(xlabel="log-SNR lambda", ylabel="p(lambda)",
         title="adaptive schedules, end of training")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _load_adaptive(path: str) -> schedules.AdaptiveState:
  data = np.load(path)
  return schedules.AdaptiveState(**{k: jnp.asarray(data[k])
                                    for k in schedules.AdaptiveState._fields})


def _snapshots(out: str, name: str) -> list[tuple[int, str]]:
  directory = os.path.join(out, name, "adaptive")
  if not os.path.isdir(directory):
    return []
  return sorted((int(f.split(".")[0]), os.path.join(directory, f))
                for f in os.listdir(directory) if f.endswith(".npz"))


def _final_adaptive(out: str, name: str):
  snaps = _snapshots(out, name)
  return _load_adaptive(snaps[-1][1]) if snaps else None


def plot_adaptive_evolution(path: str, out: str, names: list[str]):
  names = [n for n in names if _snapshots(out, n)]
  if not names:
    return
  fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    snaps = _snapshots(out, name)
    first = _load_adaptive(snaps[0][1])
    initial = schedules.adaptive_init(
        num_bins=first.loss_ema.shape[0], lam_min=float(first.edges[0]),
        lam_max=float(first.edges[-1]))
    lam = jnp.float32(LAM_PLOT)
    colors = plt.cm.viridis(np.linspace(0, 1, len(snaps) + 1))
    ax.plot(LAM_PLOT, schedules.adaptive_density(initial, lam),
            color=colors[0], label="step 0")
    for color, (step, snap) in zip(colors[1:], snaps):
      ax.plot(LAM_PLOT, schedules.adaptive_density(_load_adaptive(snap), lam),
              color=color, label=f"step {step}")
    ax.set(xlabel="log-SNR lambda", title=name)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("p(lambda)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_loss_vs_logsnr(path: str, results: dict[str, dict], config):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for lam in (-config.model.gamma_max, -config.model.gamma_min):
    axes[0].axvline(lam, color="gray", linestyle=":", linewidth=1)
  colors = dict(zip(OBJECTIVES, plt.cm.tab10(np.arange(len(OBJECTIVES)))))
  for name, r in results.items():
    objective = name.removesuffix("_adaptive")
    lam = np.asarray(r["loss_logsnr"])
    elbo_density = 0.5 * np.asarray(r["eps_mse_per_dim"])   # nats/dim/lambda
    w = np.asarray(_w(objective)(jnp.float32(lam)), np.float64)
    style = "--" if name.endswith("_adaptive") else "-"
    axes[0].semilogy(lam, elbo_density, style, color=colors[objective],
                     label=name)
    weighted = w * elbo_density
    axes[1].semilogy(lam, weighted / weighted.max(), style,
                     color=colors[objective], label=name)
  axes[0].set(xlabel="log-SNR lambda",
              ylabel="0.5 E||eps - eps_hat||^2 per dim",
              title="ELBO integrand on the test split (bpd sums it "
              "between the dotted lines)")
  axes[1].set(xlabel="log-SNR lambda", ylabel="normalised",
              title="weighted integrand w(lambda) x ELBO integrand",
              ylim=(1e-4, 2))
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_samples(path: str, out: str, names: list[str], vocab_size: int):
  rows = []
  for name in names:
    f = os.path.join(out, name, "samples.npz")
    if os.path.exists(f):
      rows.append((name, np.load(f)["samples"][:16]))
  if not rows:
    return
  fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.55 * len(rows) + 0.2),
                           squeeze=False)
  for ax, (name, x) in zip(axes[:, 0], rows):
    grid = reporting.image_grid(reporting.to_uint8(x, vocab_size),
                                num_cols=x.shape[0])
    ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
  fig.tight_layout(pad=0.2, h_pad=0.1)
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="digits",
                      help="digits (8x8, MLP) | mnist5k (28x28, UNet)")
  parser.add_argument("--steps", type=int, default=6000,
                      help="training steps per run")
  parser.add_argument("--out", default=os.path.join(REPO, "runs",
                                                    "weighting_study"))
  parser.add_argument("--runs", default="",
                      help="comma-separated subset of runs (default: all)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--num_samples", type=int, default=1000,
                      help="samples for the Frechet distance")
  parser.add_argument("--sampling_steps", type=int, default=250)
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--num_draws", type=int, default=NUM_DRAWS,
                      help="draws of (t, eps) per test example in the bpd")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.num_samples < 2 or args.sampling_steps < 1:
    parser.error("--steps and --sampling_steps must be >= 1 and "
                 "--num_samples >= 2")
  names = run_names(args.runs)
  base = base_config(args.dataset, args.steps, args.batch_size)
  strata = config_lib.eval_options(base)["strata"]
  if args.num_draws < 2 * strata or args.num_draws % strata:
    parser.error(f"--num_draws must be a multiple of eval.strata={strata} "
                 "with at least two groups (the standard errors need two)")
  wall_start = time.time()
  out = os.path.abspath(args.out)
  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  ds = input_pipeline.create(base.data.dataset)
  test_images = np.concatenate([b["image"][b["mask"]] for b in
                                ds.eval_batches("test", batch_size=1000)])
  extractor = frechet.load_or_train(ds)
  results = {}
  for name in names:
    workdir = os.path.join(out, name)
    result_path = os.path.join(workdir, "result.json")
    config = run_config(base, name)
    eval_config = with_num_draws(config, args.num_draws)
    if os.path.exists(result_path):
      with open(result_path) as f:
        results[name] = json.load(f)
      if not has_eval(results[name], eval_config):
        print(f"[{name}] done before; evaluating its bpd with "
              f"{args.num_draws} draws", flush=True)
        results[name] = reevaluate(results[name], eval_config, workdir)
      r = results[name]
      print(f"[{name}] done before: bpd {r['bpd']:.4f} ± {r['bpd_se']:.4f}")
      continue
    print(f"[{name}] weighting={config.model.weighting} "
          f"noise_schedule={config.model.noise_schedule} -> {workdir}",
          flush=True)
    run_start = time.time()
    seconds = train_run(config, workdir, name.endswith("_adaptive"))
    results[name] = finish_run(name, eval_config, workdir, args, extractor,
                               test_images, seconds, run_start)
    r = results[name]
    print(f"[{name}] test bpd {r['bpd']:.4f} ± {r['bpd_se']:.4f} "
          f"({args.num_draws} draws, {r['eval_seconds']:.1f}s)  Frechet "
          f"(classifier) {r['fd_classifier']:.2f}  train {seconds:.0f}s",
          flush=True)

  train_images = np.concatenate([b["image"][b["mask"]] for b in
                                 ds.eval_batches("train", batch_size=1000)])
  # The floor with as many real images as samples (the distance's estimate
  # is biased upwards by O(features / N), so N must match to compare).
  subset = train_images[np.random.default_rng(0).permutation(
      train_images.shape[0])[:args.num_samples]]
  one_draw_sd = [float(np.std(r["bpd_draws"], ddof=1))
                 for r in results.values()]
  eval_seconds = [r["eval_seconds"] for r in results.values()]
  meta = {
      "dataset": ds.name, "dataset_version": ds.version,
      "steps": args.steps, "batch_size": base.training.batch_size,
      "net": f"{base.model.net} {base.model.net_kwargs.to_dict()}",
      "seed": base.training.seed, "num_samples": args.num_samples,
      "sampling_steps": args.sampling_steps,
      "num_test": int(test_images.shape[0]),
      "num_floor": int(subset.shape[0]),
      "fd_floor": frechet.frechet_distance_features(
          extractor.features(subset), extractor.features(test_images)),
      "num_features": int(extractor.info["num_features"]),
      "classifier_accuracy": extractor.info["test_accuracy"],
      "baseline_bpd": input_pipeline.baseline_bpd(ds, split="test"),
      "uniform_bpd": math.log2(ds.vocab_size),
      "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__} "
                 f"{jax.default_backend()}",
      "runs_wall_minutes": sum(r.get("run_seconds", math.nan)
                               for r in results.values()) / 60,
      **eval_settings(with_num_draws(base, args.num_draws)),
      "num_groups": args.num_draws // strata,
      "one_draw_sd_min": min(one_draw_sd),
      "one_draw_sd_max": max(one_draw_sd),
      "eval_seconds_min": min(eval_seconds),
      "eval_seconds_max": max(eval_seconds),
      "invocation_wall_minutes": (time.time() - wall_start) / 60,
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
  }
  ordered = [results[n] for n in names]
  comparison = [paired_difference(results[a], results[b])
                for a, b in comparisons(names)]
  table = write_table(ordered, comparison, out, meta)
  plots = os.path.join(out, "plots")
  plot_weightings(os.path.join(plots, "weightings.png"))
  plot_schedules(os.path.join(plots, "schedules.png"), results, out, base,
                 resolution=ds.shape[0])
  plot_adaptive_evolution(os.path.join(plots, "adaptive_evolution.png"), out,
                          [n for n in names if n.endswith("_adaptive")])
  plot_loss_vs_logsnr(os.path.join(plots, "loss_vs_logsnr.png"), results,
                      base)
  plot_samples(os.path.join(plots, "samples.png"), out, names, ds.vocab_size)
  with open(table) as f:
    print("\n" + f.read())
  print(f"plots in {plots}")


if __name__ == "__main__":
  main()
