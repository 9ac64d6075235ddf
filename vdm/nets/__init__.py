"""Score networks: z_t, gamma_t (and labels) -> eps_hat (or x_hat / v_hat).

  net = vdm.nets.get("vdm_unet", num_res_blocks=32, channels=128, dropout=0.1)
  variables = net.init({"params": key_init}, z_t, gamma_t)
  eps_hat = net.apply(variables, z_t, gamma_t, labels, train=True,
                      rngs={"dropout": key_dropout})          # [B, H, W, C]

Every net takes z_t [B, H, W, C] (the MLP also [B, D]) float32, gamma_t [] or
[B], labels [B] int32 or None, and returns float32 of z_t's shape. Class-
conditional nets (num_classes > 0) embed num_classes + 1 labels, the last
being the learned null label that labels=None selects (classifier-free
guidance). `vdm.process.to_eps` turns an x or v prediction into eps_hat.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets import embeddings
from vdm.nets import mlp
from vdm.nets import unet
from vdm.nets import vdm_unet

check_labels = embeddings.check_labels
MLP = mlp.MLP
UNet = unet.UNet
VDMUNet = vdm_unet.VDMUNet

_NETS = {"vdm_unet": VDMUNet, "unet": UNet, "mlp": MLP}
NAMES = tuple(_NETS)
# The networks' compute dtypes by name (parameters and the ELBO stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


# Old spellings of `num_res_blocks` (before one name served all nets).
_RENAMED = {"n_blocks": "num_res_blocks", "num_blocks": "num_res_blocks"}


def get(name: str, *, backend: Optional[str] = None,
        **kwargs: Any) -> nn.Module:
  """Builds a score network by name.

  Args:
    name: one of `NAMES`: 'vdm_unet' (the VDM paper's network), 'unet'
      (multi-resolution), 'mlp' (vectors and flattened tiny images).
    backend: the backend the net will be compiled for ('cpu', 'gpu', 'tpu');
      it picks the attention kernel's query chunking. None: the default
      backend now, at build time (never read while tracing). Nets without
      attention ignore it.
    **kwargs: the net's fields (see its class), e.g. num_res_blocks,
      num_classes, dropout, dtype (a dtype or its name: 'float32',
      'bfloat16'; None = float32).
  Returns:
    The (unbound) Flax module.
  Raises:
    ValueError: unknown name or dtype.
    TypeError: a field the net does not have.
  """
  if name not in _NETS:
    raise ValueError(f"unknown net {name!r}; known: {', '.join(NAMES)}. Set "
                     "config.model.net to one of them.")
  for old, new in _RENAMED.items():
    if old in kwargs:
      raise TypeError(f"net field {old!r} is now called {new!r}; rename it in "
                      "config.model.net_kwargs (or the call).")
  dtype = kwargs.get("dtype")
  if isinstance(dtype, str):
    if dtype not in COMPUTE_DTYPES:
      raise ValueError(f"unknown compute dtype {dtype!r}; known: "
                       f"{', '.join(COMPUTE_DTYPES)}.")
    kwargs["dtype"] = jnp.dtype(dtype)
  net = _NETS[name]
  if "backend" in net.__dataclass_fields__:
    kwargs["backend"] = backend or jax.default_backend()
  return net(**kwargs)
