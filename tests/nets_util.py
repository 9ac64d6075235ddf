"""Helpers shared by the tests of vdm/nets."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np


def perturb(variables, seed, scale=0.2):
  """Adds N(0, scale^2) to every parameter, undoing the zero inits (numpy
  draws: eager jax.random would compile once per parameter shape)."""
  rs = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: x + jnp.asarray(scale * rs.normal(size=x.shape), x.dtype),
      variables)


# The official code's model file (google-research/vdm@dc27b98), where a copy
# of it is beside the checkout (or at VDM_PEER_DIR).
OFFICIAL_MODEL = os.path.join(
    os.environ.get("VDM_PEER_DIR", os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "peers",
        "google-research-vdm")), "model_vdm.py")
NO_OFFICIAL_MODEL = "official VDM code not available (VDM_PEER_DIR)"


def load_official_model():
  """model_vdm.py loaded by path under another name (no `vdm` shadowing)."""
  spec = importlib.util.spec_from_file_location("official_model_vdm",
                                                OFFICIAL_MODEL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def official_config(module, **overrides):
  """The official VDMConfig of the tests' tiny net (1 block, 64 channels)."""
  fields = dict(
      vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
      with_fourier_features=True, with_attention=False,
      gamma_type="learnable_scalar", gamma_min=-13.3, gamma_max=5.0,
      sm_n_timesteps=0, sm_n_embd=64, sm_n_layer=1, sm_pdrop=0.1)
  fields.update(overrides)
  return module.VDMConfig(**fields)
