"""Importing checkpoints of the official VDM code (vdm/official.py).

tests/data/official_tiny/ was written by the OFFICIAL code itself, in its own
venv (experiments/make_official_checkpoint.py): a tiny model's checkpoint in
the official format (clu's checkpoints-0/ckpt-1.flax, packed with tar + xz)
and the official loss's ELBO terms on a fixed batch, with the draws (eps_0,
t, eps) it used. The import must reproduce those terms from our code.
"""
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import checkpointing
from vdm import config_lib
from vdm import elbo
from vdm import learned_schedules
from vdm import official
import nets_util

DATA = pathlib.Path(__file__).parent / "data" / "official_tiny"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(config, model, restored state, metadata, step) of the imported run."""
  root = tmp_path_factory.mktemp("official")
  with tarfile.open(DATA / "checkpoints-0.tar.xz") as tar:
    tar.extractall(root, filter="data")
  workdir = str(root / "run")
  config, step = official.import_checkpoint(
      str(root), workdir, official_config=str(DATA / "official_config.json"))
  model, template, _ = official.build_state(config)
  with checkpointing.Manager(os.path.join(workdir, "checkpoints"),
                             read_only=True) as ckpt:
    state, metadata, restored_step = ckpt.restore_latest(template)
  return {"root": root, "workdir": workdir, "config": config, "model": model,
          "state": state, "metadata": metadata, "step": step,
          "restored_step": restored_step}


def test_the_run_is_one_eval_and_sample_accept(imported):
  stored = config_lib.load_run_config(imported["workdir"])
  config_lib.validate(stored, mode="eval")
  config_lib.validate(stored, mode="sample")
  config_lib.check_changes(stored, imported["config"], imported["workdir"])
  assert imported["step"] == imported["restored_step"] == 1234
  assert imported["metadata"]["config_hash"] == config_lib.run_fingerprint(
      stored)
  net = stored.model.net_kwargs
  assert (stored.model.net, net.num_res_blocks, net.channels, net.attention,
          net.num_groups) == ("vdm_unet", 1, 64, False, 32)
  assert (stored.model.schedule, stored.model.gamma_min,
          stored.model.gamma_max, stored.data.dataset) == (
              "learned_linear", -13.3, 5.0, "cifar10")
  assert stored.optimizer.ema_decay == 0.9999


@pytest.mark.parametrize("which", ["ema_params", "params"])
def test_imported_elbo_terms_equal_the_official_ones(imported, which):
  expected = json.loads((DATA / "official_elbo.json").read_text())[which]
  draws = np.load(DATA / "batch.npz")
  model, params = imported["model"], getattr(imported["state"], which)
  x = jnp.asarray(draws["images"], jnp.int32)

  @jax.jit
  def terms(params):
    # What Model.elbo_terms computes, at the official draws.
    gamma_0, gamma_1 = model.endpoints(params)
    f = elbo.encode(x, model.vocab_size)
    z_0 = elbo.diffuse(f, jnp.broadcast_to(gamma_0, f.shape[:1]),
                       draws["eps_0"])
    return {"loss_recon": elbo.reconstruction_loss(x, z_0, gamma_0,
                                                   model.vocab_size),
            "loss_klz": elbo.prior_loss(f, gamma_1),
            "loss_diff": elbo.diffusion_loss(
                model.eps_fn(params), model.gamma_fn(params), f, draws["t"],
                draws["eps"], num_steps=model.num_steps)}

  ours = terms(params)
  # float32 end to end on both sides, in other orders: the schedule's |w|
  # passes through softplus(inverse_softplus(.)) (~1 ulp of gamma_1), the
  # convolutions sum differently (test_nets: 1e-5) and the recon term sums
  # 3,072 log-probabilities (ours from a window of levels, the official from
  # all 256). Measured: at most 7e-6 relative (loss_klz, from gamma_1's ulp),
  # so 2e-5; a wrong parameter, draw or schedule moves a term by > 1e-3.
  for name in ("loss_recon", "loss_klz", "loss_diff"):
    np.testing.assert_allclose(ours[name], expected[name], rtol=2e-5,
                               err_msg=name)
  to_bpd = 1 / (model.num_dims * np.log(2))
  total = sum(float(jnp.mean(ours[k])) for k in ours) * to_bpd
  assert total == pytest.approx(expected["bpd"], rel=2e-5)


def test_raw_and_ema_params_are_both_imported(imported):
  state = imported["state"]
  assert float(state.ema_params["schedule"]["gamma_0"]) == -12.25
  assert float(state.params["schedule"]["gamma_0"]) == -12.0
  gamma_1 = imported["model"].endpoints(state.params)[1]
  assert float(gamma_1) == pytest.approx(4.5, abs=2e-6)


def test_import_refuses_an_existing_run_and_a_wrong_config(imported,
                                                          tmp_path):
  with pytest.raises(FileExistsError, match="already holds a run"):
    official.import_checkpoint(str(imported["root"]), imported["workdir"])
  # Default official config: 32 blocks of 128 channels, not this network.
  with pytest.raises(ValueError, match="sm_n_layer=32, sm_n_embd=128"):
    official.import_checkpoint(str(imported["root"]), str(tmp_path / "b"))
  with pytest.raises(FileNotFoundError, match="no official checkpoint"):
    official.find_checkpoint(str(tmp_path))


def test_find_checkpoint_takes_workdir_folder_or_file(imported):
  folder = imported["root"] / "checkpoints-0"
  expected = str(folder / "ckpt-1.flax")
  assert official.find_checkpoint(str(imported["root"])) == expected
  assert official.find_checkpoint(str(folder)) == expected
  assert official.find_checkpoint(expected) == expected


@pytest.mark.skipif(not os.path.isfile(nets_util.OFFICIAL_MODEL),
                    reason=nets_util.NO_OFFICIAL_MODEL)
def test_learnable_nnet_maps_to_learned_net():
  """The official monotone-net schedule, at random parameters, equals our
  learned_net with the mapped ones (gamma and gamma')."""
  module = nets_util.load_official_model()
  config = nets_util.official_config(module, gamma_type="learnable_nnet")
  schedule = module.NoiseSchedule_NNet(config)
  t = jnp.linspace(0.0, 1.0, 11)
  p = schedule.init(jax.random.key(0), t)["params"]
  rs = np.random.RandomState(0)
  p = jax.tree.map(lambda x: x + 0.3 * rs.normal(size=x.shape), p)
  ours = learned_schedules.MonotoneNet(num_features=official.NNET_FEATURES)
  mapped = official.map_schedule(p)
  g_off, dg_off = jax.jvp(lambda s: schedule.apply({"params": p}, s), (t,),
                          (jnp.ones_like(t),))
  g_ours, dg_ours = jax.jvp(lambda s: ours.apply({"params": mapped}, s), (t,),
                            (jnp.ones_like(t),))
  np.testing.assert_allclose(official.official_nnet_gamma(p, t), g_off,
                             atol=2e-5)
  np.testing.assert_allclose(g_ours, g_off, atol=2e-5)
  np.testing.assert_allclose(dg_ours, dg_off, rtol=1e-4)


def test_import_official_command_writes_a_run(imported, tmp_path):
  # The `vdm import-official` command (absl flags, like every entry point)
  # writes the same run as the library call, and `vdm info` reads it.
  workdir = str(tmp_path / "cli_run")
  repo = pathlib.Path(__file__).resolve().parents[1]
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "vdm.main", *args], capture_output=True,
      text=True, cwd=repo, timeout=300)
  proc = run("import-official", str(imported["root"]), f"--workdir={workdir}",
             f"--official_config={DATA / 'official_config.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "imported step 1234 (1 blocks x 64 channels" in proc.stdout
  assert config_lib.load_run_config(workdir).to_dict() == (
      config_lib.load_run_config(imported["workdir"]).to_dict())
  info = run("info", f"--workdir={workdir}")
  assert info.returncode == 0 and "newest 1234" in info.stdout, info.stderr
  proc = run("import-official", str(imported["root"]))     # no --workdir
  assert proc.returncode == 2 and proc.stderr.startswith("error: usage: vdm "
                                                          "import-official")
