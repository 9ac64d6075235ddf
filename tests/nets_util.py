"""Helpers shared by the tests of vdm/nets."""
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
