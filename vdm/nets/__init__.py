"""Score networks: z_t, gamma_t (and labels) -> eps_hat (or x_hat / v_hat).

  net = vdm.nets.get("vdm_unet", num_blocks=32, channels=128, dropout=0.1)
  variables = net.init({"params": key_init}, z_t, gamma_t)
  eps_hat = net.apply(variables, z_t, gamma_t, labels, train=True,
                      rngs={"dropout": key_dropout})          # [B, H, W, C]

Every net takes z_t [B, H, W, C] (the MLP also [B, D]) float32, gamma_t [] or
[B], labels [B] int32 or None, and returns float32 of z_t's shape. Class-
conditional nets (num_classes > 0) embed num_classes + 1 labels, the last
being the learned null label that labels=None selects (classifier-free
guidance). `vdm.process.to_eps` turns an x or v prediction into eps_hat.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vdm.nets import layers
from vdm.nets import mlp
from vdm.nets import unet
from vdm.nets import vdm_unet

check_labels = layers.check_labels
MLP = mlp.MLP
UNet = unet.UNet
VDMUNet = vdm_unet.VDMUNet

_NETS = {"vdm_unet": VDMUNet, "unet": UNet, "mlp": MLP}
NAMES = tuple(_NETS)


def get(name: str, **kwargs: Any) -> nn.Module:
  """Builds a score network by name.

  Args:
    name: one of `NAMES`: 'vdm_unet' (the VDM paper's network), 'unet'
      (multi-resolution), 'mlp' (vectors and flattened tiny images).
    **kwargs: the net's fields (see its class), e.g. num_classes, dropout,
      dtype (a dtype or its name: 'float32', 'bfloat16'; None = float32).
  Returns:
    The (unbound) Flax module.
  Raises:
    ValueError: unknown name.
    TypeError: a field the net does not have.
  """
  if name not in _NETS:
    raise ValueError(f"unknown net {name!r}; known: {', '.join(NAMES)}. Set "
                     "config.model.net to one of them.")
  dtype = kwargs.get("dtype")
  if isinstance(dtype, str):
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"unknown compute dtype {dtype!r}; known: float32, "
                       "bfloat16, float16.")
    kwargs["dtype"] = jnp.dtype(dtype)
  return _NETS[name](**kwargs)
