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


# config.model.net_kwargs.fused_norm: 'auto' = the fused GroupNorm kernel
# where it pays (GPU), the plain function elsewhere; 'on' (or True) = the
# kernel everywhere (on the CPU in the Pallas interpreter: slow, for tests);
# 'off' (or False) = never. Strings in configs: a ConfigDict field keeps its
# type, so --config...fused_norm=off overrides 'auto'.
FUSED_NORM_CHOICES = ("auto", "on", "off", True, False)


def resolve_fused_norm(choice: Any, backend: str) -> Optional[str]:
  """The nets' `fused_norm` field for a config choice on a backend.

  Args:
    choice: 'auto', 'on' (True) or 'off' (False), `FUSED_NORM_CHOICES`.
    backend: 'cpu', 'gpu' or 'tpu'.
  Returns:
    'triton' (GPU kernel), 'interpret' (the kernel in the Pallas
    interpreter) or None (the plain `groupnorm.group_norm`).
  Raises:
    ValueError: an unknown choice.
  """
  if isinstance(choice, bool):
    choice = "on" if choice else "off"
  if choice not in ("auto", "on", "off"):
    raise ValueError(f"unknown fused_norm {choice!r}; known: 'auto', 'on', "
                     "'off' (or True, False). Set "
                     "config.model.net_kwargs.fused_norm.")
  if choice == "off" or (choice == "auto" and backend != "gpu"):
    return None   # the CPU's fastest (and the TPU's: no Triton there)
  return "triton" if backend == "gpu" else "interpret"


# Old spellings of `num_res_blocks` (before one name served all nets).
_RENAMED = {"n_blocks": "num_res_blocks", "num_blocks": "num_res_blocks"}


def get(name: str, *, backend: Optional[str] = None,
        **kwargs: Any) -> nn.Module:
  """Builds a score network by name.

  Args:
    name: one of `NAMES`: 'vdm_unet' (the VDM paper's network), 'unet'
      (multi-resolution), 'mlp' (vectors and flattened tiny images).
    backend: the backend the net will be compiled for ('cpu', 'gpu', 'tpu');
      it picks the attention kernel's query chunking and, for 'vdm_unet',
      the GroupNorm kernel (`resolve_fused_norm`). None: the default backend
      now, at build time (never read while tracing). Nets without attention
      ignore it.
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
  backend = backend or jax.default_backend()
  if "backend" in net.__dataclass_fields__:
    kwargs["backend"] = backend
  if "fused_norm" in net.__dataclass_fields__:
    kwargs["fused_norm"] = resolve_fused_norm(
        kwargs.get("fused_norm", "auto"), backend)
  elif "fused_norm" in kwargs:
    raise TypeError(f"net {name!r} has no fused GroupNorm kernel; remove "
                    "fused_norm from config.model.net_kwargs (only "
                    "'vdm_unet' takes it).")
  return net(**kwargs)
