"""Evaluation: bpd over a whole split and its eval JSON.

Every example of the split counts exactly once: the input pipeline pads the
last batch and marks the padding in `mask`, and the eval step sums only the
real examples; nothing is dropped.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from vdm import parallel

TERMS = ("total", "recon", "prior", "diff")


def evaluate_split(eval_step, params, ds, *, split: str, batch_size: int,
                   mesh, num_dims: int, conditional: bool = False,
                   limit: int | None = None) -> dict:
  """bpd and its terms over every example of `split` (or `limit` of them,
  spread evenly over it; 'num_examples' in the result says how many).

  Args:
    eval_step: jitted (params, global_batch, batch_index) -> sums of the
      per-example terms in nats and 'count' (see `train.eval_step`).
    params: (EMA) parameters.
    ds: an `input_pipeline` dataset.
    batch_size: global eval batch size.
    num_dims: elements of one example (D in bits per dim).
    conditional: the model is class-conditional: 'bpd' is then
      -log p(x | y), marked by 'conditional': True.
  Returns:
    {'bpd', 'bpd_recon', 'bpd_prior', 'bpd_diff', 'bpd_se' (Monte Carlo
    standard error of 'bpd' from the spread of the R i.i.d. groups of
    draws; None for one group), 'bpd_groups' (the groups' bpd of the split,
    paired across models like the draws), 'num_groups',
    'bpd_draws' (the K draws' bpd of the split; 'bpd' is their mean),
    'num_draws', 'num_examples', 'split', 'conditional'}; where the eval
    step reports the null label's terms (a conditional model trained with
    label dropout), also 'bpd_uncond' (-log p(x), unconditional) and
    'bpd_uncond_se'.
  """
  totals, _ = _sum_over_split(eval_step, params, ds, split=split,
                              batch_size=batch_size, mesh=mesh, limit=limit)
  count = int(round(float(totals["count"])))
  to_bpd = 1.0 / (count * num_dims * math.log(2.0))
  result = {("bpd" if k == "total" else f"bpd_{k}"):
            float(totals[k]) * to_bpd for k in TERMS}
  # The draws come in R i.i.d. groups (stratified t within a group,
  # `train.eval_step`): the spread of the groups' split means is the Monte
  # Carlo standard error of `bpd` for this split (none with one group).
  draws = np.asarray(totals["total_draws"], np.float64) * to_bpd
  groups = np.asarray(totals.get("total_groups", totals["total_draws"]),
                      np.float64) * to_bpd
  result["num_draws"] = int(draws.size)
  result["num_groups"] = int(groups.size)
  result["bpd_se"] = _standard_error(groups)
  result["bpd_groups"] = groups.tolist()
  # Draw k's keys and times depend only on the eval seed, k and the batch
  # index, so two models evaluated alike see the same (t, eps): their draws
  # and groups are paired (common random numbers). The groups, not the
  # draws, are i.i.d.: the standard error of a difference between two
  # models comes from the spread of the per-group differences.
  result["bpd_draws"] = draws.tolist()
  result["conditional"] = bool(conditional)
  if "uncond_total" in totals:
    result["bpd_uncond"] = float(totals["uncond_total"]) * to_bpd
    result["bpd_uncond_se"] = _standard_error(np.asarray(
        totals.get("uncond_total_groups", totals["uncond_total_draws"]),
        np.float64) * to_bpd)
  result["num_examples"] = count
  result["split"] = split
  return result


def evaluate_split_ode(ode_step, params, ds, *, split: str, batch_size: int,
                       mesh, num_dims: int, limit: int | None = None) -> dict:
  """bpd by the probability-flow ODE over every example of `split` (or
  `limit` of them, spread evenly over it).

  Args:
    ode_step: jitted (params, global_batch, batch_index) -> {'ode_total',
      'ode_total_sq', 'count', 'nfe'} (see `train.ode_eval_step`).
    Others: as `evaluate_split`.
  Returns:
    {'bpd_ode': the mean over the split of each example's importance-
    weighted bound, in bits/dim; 'bpd_ode_se': the standard error of that
    mean over the split's examples (their spread holds the data's variation
    as well as the dequantisation and Hutchinson noise, so it bounds the
    Monte Carlo error from above); 'nfe': network evaluations per batch
    (mean over batches, all draws); 'num_examples', 'split'}; when the step
    also pairs each example with its ELBO ('diff_total', see
    `train.ode_eval_step`), 'bpd_ode_minus_elbo' and its standard error
    over the examples, 'bpd_ode_minus_elbo_se'.
  """
  totals, nfes = _sum_over_split(ode_step, params, ds, split=split,
                                 batch_size=batch_size, mesh=mesh,
                                 per_batch="nfe", limit=limit)
  count = int(round(float(totals["count"])))
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  result = {}
  for name, key in (("bpd_ode", "ode_total"),
                    ("bpd_ode_minus_elbo", "diff_total")):
    if key in totals:
      mean, se = _mean_and_se(totals[key], totals[f"{key}_sq"], count)
      result[name] = mean * to_bpd
      result[f"{name}_se"] = None if se is None else se * to_bpd
  result.update(nfe=float(np.mean(nfes)), num_examples=count, split=split)
  return result


def difference_estimate(elbo: dict, ode: dict) -> dict:
  """The ODE's bpd of the ELBO's examples, from the ODE on a subset of them.

  bpd_ode(split) = bpd_elbo(split) + mean over the subset of (ODE - ELBO)
  per example: the difference estimator of survey sampling. The ELBO over
  every example is cheap, and the paired difference varies less from
  image to image than the ODE's figure (about half on the mnist5k models,
  docs/likelihood.md), so an evenly spread subset
  (`input_pipeline.Dataset.eval_indices`) gives the split's figure with a
  smaller error than the ODE's mean over the same subset.

  Args:
    elbo: `evaluate_split`'s result ('bpd', 'bpd_se').
    ode: `evaluate_split_ode`'s result with the paired difference.
  Returns:
    {'bpd_ode_estimate', 'bpd_ode_estimate_se'}: the standard error adds
    the ELBO's Monte Carlo error and the difference's standard error over
    the subset in quadrature (the two use independent draws); None when the
    ELBO's error is unknown (one group of draws).
  """
  diff_se, elbo_se = ode["bpd_ode_minus_elbo_se"], elbo["bpd_se"]
  return {"bpd_ode_estimate": elbo["bpd"] + ode["bpd_ode_minus_elbo"],
          "bpd_ode_estimate_se": (
              None if diff_se is None or elbo_se is None
              else math.sqrt(diff_se ** 2 + elbo_se ** 2))}


def _mean_and_se(total, total_sq, count: int) -> tuple[float, float | None]:
  """Mean of per-example values from their sum and sum of squares, and
  its standard error (None for one example)."""
  mean = float(total) / count
  if count < 2:
    return mean, None
  var = max(float(total_sq) / count - mean ** 2, 0.0) * count / (count - 1)
  return mean, math.sqrt(var / count)


def _sum_over_split(step, params, ds, *, split: str, batch_size: int, mesh,
                    per_batch: str | None = None,
                    limit: int | None = None) -> tuple[dict, list]:
  """Sums `step`'s outputs over every batch of `split` (`limit` examples
  spread over it when given) (host numpy).

  Returns:
    (totals, the `per_batch` output of each batch, kept apart, not summed).
  Raises:
    ValueError: the split is empty.
    RuntimeError: the summed 'count' is not the split's size.
  """
  totals, kept = None, []
  batches = ds.eval_batches(split, batch_size=batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), limit=limit)
  for index, local in enumerate(batches):
    batch = parallel.shard_batch(mesh, local)
    sums = step(params, batch, jnp.asarray(index, jnp.int32))
    if per_batch is not None:
      kept.append(sums.pop(per_batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"split {split!r} of {ds.name!r} is empty.")
  totals, kept = jax.device_get((totals, kept))
  count = int(round(float(totals["count"])))
  expected = ds.num_eval_examples(split, limit)
  if count != expected:
    raise RuntimeError(f"evaluated {count} examples of {split!r} but "
                       f"expected {expected}: the eval iterator is broken.")
  return totals, kept


def _standard_error(draws: np.ndarray) -> float | None:
  return (float(draws.std(ddof=1) / math.sqrt(draws.size))
          if draws.size > 1 else None)


def write_eval_json(workdir: str, split: str, step: int, result: dict, *,
                    dataset_version: str, name: str | None = None,
                    record: dict | None = None) -> str:
  """WORKDIR/eval/<name>.json (default name <split>_<step>), written
  atomically; `record` (what produced the result: the run's fingerprint,
  params, estimator, seed; `config_lib.eval_output`) is stored with it."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"{name or f'{split}_{step}'}.json")
  produced_by = dict(record or {})
  record = {k: v for k, v in result.items() if k != "split"}
  record.update(produced_by)
  record.update(step=int(step), split=split, dataset_version=dataset_version)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path
