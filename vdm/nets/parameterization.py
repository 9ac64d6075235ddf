"""What a network predicts (eps, x or v) and conversions between them.

A score network may predict the noise `eps`, the data `x` (written `f` in
DESIGN.md, the encoded data in (-1, 1)) or the velocity `v`; the ELBO and the
samplers consume `eps_hat`, so `to_eps` turns any prediction into `eps_hat`
given `z_t` and `gamma_t`. With the variance-preserving process of VDM
(Kingma et al. 2021, arXiv:2107.00630, section "Model"):

  alpha_t^2 = sigmoid(-gamma_t),   sigma_t^2 = sigmoid(gamma_t),
  z_t = alpha_t x + sigma_t eps,
  x_hat = (z_t - sigma_t eps_hat) / alpha_t,
  v = alpha_t eps - sigma_t x          (v-prediction: Salimans & Ho 2022,
                                        arXiv:2202.00512),
  eps = sigma_t z_t + alpha_t v,   x = alpha_t z_t - sigma_t v.

Conditioning (float32, first-order error amplification of the prediction):
  * `x_to_eps` multiplies errors in x_hat by alpha_t / sigma_t = exp(-gamma/2):
    ill-conditioned at LOW noise (gamma -> -inf). At gamma = -13.3 (the VDM
    default gamma_min) the factor is ~775.
  * `eps_to_x` multiplies errors in eps_hat by sigma_t / alpha_t = exp(gamma/2):
    ill-conditioned at HIGH noise. At gamma = 5 (gamma_max) the factor is ~12,
    at gamma = 10 ~148.
  * `v_to_eps` and `v_to_x` are rotations (no division), well conditioned at
    every noise level; `eps_to_v` divides by alpha_t and `x_to_v` by sigma_t,
    like the two conversions above.
Square roots of sigmoids are computed as `exp(-0.5 * softplus(-+gamma))`,
accurate for |gamma| up to float32's exponent range (no `1 - var` forms);
dividing by alpha or sigma is multiplying by `exp(0.5 * softplus(+-gamma))`.

All functions take `gamma_t` of shape `[]`, `[B]` or any shape that broadcasts
against `z_t` after right-padding with singleton axes, and compute in float32.
"""
from typing import Callable

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("eps", "x", "v")


def _check_name(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
        f"unknown parameterization {parameterization!r}; known: "
        f"{', '.join(PARAMETERIZATIONS)}. Set config.model.parameterization "
        "to one of them.")


def _coefficients(gamma_t: jax.typing.ArrayLike, ndim: int):
  """Returns float32 (log_alpha, log_sigma), right-padded to `ndim` axes."""
  gamma = jnp.asarray(gamma_t, jnp.float32)
  if gamma.ndim > ndim:
    raise ValueError(f"gamma_t has shape {gamma.shape}, more axes than z_t "
                     f"({ndim}); pass gamma_t of shape [] or [B].")
  gamma = gamma.reshape(gamma.shape + (1,) * (ndim - gamma.ndim))
  log_alpha = -0.5 * jax.nn.softplus(gamma)    # log sqrt(sigmoid(-gamma))
  log_sigma = -0.5 * jax.nn.softplus(-gamma)   # log sqrt(sigmoid(gamma))
  return log_alpha, log_sigma


def _prepare(pred, z_t, gamma_t):
  pred = jnp.asarray(pred, jnp.float32)
  z_t = jnp.asarray(z_t, jnp.float32)
  if pred.shape != z_t.shape:
    raise ValueError(f"prediction has shape {pred.shape} but z_t has shape "
                     f"{z_t.shape}; they must match.")
  log_alpha, log_sigma = _coefficients(gamma_t, z_t.ndim)
  return pred, z_t, log_alpha, log_sigma


def alpha_sigma(gamma_t: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Standard deviations of the VP process; Kingma et al. 2021, section "Model".

  Args:
    gamma_t: [...] gamma (= -log SNR).
  Returns:
    (alpha_t, sigma_t), each [...] float32, with alpha_t^2 = sigmoid(-gamma_t)
    and sigma_t^2 = sigmoid(gamma_t), accurate in the tails (no `1 - var`).
  """
  log_alpha, log_sigma = _coefficients(gamma_t, jnp.ndim(gamma_t))
  return jnp.exp(log_alpha), jnp.exp(log_sigma)


def eps_to_x(eps_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
             gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """x_hat = (z_t - sigma_t eps_hat) / alpha_t (ill-conditioned at high noise).

  Args:
    eps_hat: [B, ...] predicted noise.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 x_hat.
  """
  eps_hat, z_t, log_alpha, log_sigma = _prepare(eps_hat, z_t, gamma_t)
  return (z_t - jnp.exp(log_sigma) * eps_hat) * jnp.exp(-log_alpha)


def x_to_eps(x_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
             gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """eps_hat = (z_t - alpha_t x_hat) / sigma_t (ill-conditioned at low noise).

  Args:
    x_hat: [B, ...] predicted data.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 eps_hat.
  """
  x_hat, z_t, log_alpha, log_sigma = _prepare(x_hat, z_t, gamma_t)
  return (z_t - jnp.exp(log_alpha) * x_hat) * jnp.exp(-log_sigma)


def v_to_eps(v_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
             gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """eps_hat = sigma_t z_t + alpha_t v_hat (well conditioned everywhere).

  Args:
    v_hat: [B, ...] predicted velocity.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 eps_hat.
  """
  v_hat, z_t, log_alpha, log_sigma = _prepare(v_hat, z_t, gamma_t)
  return jnp.exp(log_sigma) * z_t + jnp.exp(log_alpha) * v_hat


def v_to_x(v_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
           gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """x_hat = alpha_t z_t - sigma_t v_hat (well conditioned everywhere).

  Args:
    v_hat: [B, ...] predicted velocity.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 x_hat.
  """
  v_hat, z_t, log_alpha, log_sigma = _prepare(v_hat, z_t, gamma_t)
  return jnp.exp(log_alpha) * z_t - jnp.exp(log_sigma) * v_hat


def eps_to_v(eps_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
             gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """v_hat = (eps_hat - sigma_t z_t) / alpha_t (= alpha eps - sigma x_hat).

  Args:
    eps_hat: [B, ...] predicted noise.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 v_hat.
  """
  eps_hat, z_t, log_alpha, log_sigma = _prepare(eps_hat, z_t, gamma_t)
  return (eps_hat - jnp.exp(log_sigma) * z_t) * jnp.exp(-log_alpha)


def x_to_v(x_hat: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
           gamma_t: jax.typing.ArrayLike) -> jax.Array:
  """v_hat = (alpha_t z_t - x_hat) / sigma_t (= alpha eps_hat - sigma x).

  Args:
    x_hat: [B, ...] predicted data.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
  Returns:
    [B, ...] float32 v_hat.
  """
  x_hat, z_t, log_alpha, log_sigma = _prepare(x_hat, z_t, gamma_t)
  return (jnp.exp(log_alpha) * z_t - x_hat) * jnp.exp(-log_sigma)


def _identity(pred, z_t, gamma_t):
  return _prepare(pred, z_t, gamma_t)[0]


_TO_EPS: dict[str, Callable] = {"eps": _identity, "x": x_to_eps, "v": v_to_eps}
_TO_X: dict[str, Callable] = {"eps": eps_to_x, "x": _identity, "v": v_to_x}
_FROM_EPS: dict[str, Callable] = {"eps": _identity, "x": eps_to_x,
                                  "v": eps_to_v}


def to_eps(prediction: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
           gamma_t: jax.typing.ArrayLike, *, parameterization: str
           ) -> jax.Array:
  """Turns a network's prediction into eps_hat.

  Args:
    prediction: [B, ...] the network output: eps_hat, x_hat or v_hat.
    z_t: [B, ...] noisy latent the network saw.
    gamma_t: [] or [B] gamma at t.
    parameterization: what the network predicts, one of `PARAMETERIZATIONS`.
  Returns:
    [B, ...] float32 eps_hat.
  Raises:
    ValueError: unknown `parameterization` or mismatched shapes.
  """
  _check_name(parameterization)
  return _TO_EPS[parameterization](prediction, z_t, gamma_t)


def to_x(prediction: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
         gamma_t: jax.typing.ArrayLike, *, parameterization: str) -> jax.Array:
  """Turns a network's prediction into x_hat (e.g. progressive sampling).

  Args:
    prediction: [B, ...] the network output: eps_hat, x_hat or v_hat.
    z_t: [B, ...] noisy latent the network saw.
    gamma_t: [] or [B] gamma at t.
    parameterization: what the network predicts, one of `PARAMETERIZATIONS`.
  Returns:
    [B, ...] float32 x_hat.
  """
  _check_name(parameterization)
  return _TO_X[parameterization](prediction, z_t, gamma_t)


def from_eps(eps: jax.typing.ArrayLike, z_t: jax.typing.ArrayLike,
             gamma_t: jax.typing.ArrayLike, *, parameterization: str
             ) -> jax.Array:
  """The inverse of `to_eps`: the target a network with `parameterization`
  should output, given the true (or predicted) eps.

  Args:
    eps: [B, ...] noise.
    z_t: [B, ...] noisy latent.
    gamma_t: [] or [B] gamma at t.
    parameterization: one of `PARAMETERIZATIONS`.
  Returns:
    [B, ...] float32 eps, x or v.
  """
  _check_name(parameterization)
  return _FROM_EPS[parameterization](eps, z_t, gamma_t)
