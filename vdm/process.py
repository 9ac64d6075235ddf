"""The variance-preserving diffusion process of VDM, written once.

With `gamma = -log SNR` (Kingma et al. 2021, arXiv:2107.00630, section
"Forward time diffusion process"):

  alpha_t^2 = sigmoid(-gamma_t),   sigma_t^2 = sigmoid(gamma_t),
  z_t = alpha_t x + sigma_t eps,
  x_hat = (z_t - sigma_t eps_hat) / alpha_t,
  v = alpha_t eps - sigma_t x          (v-prediction: Salimans & Ho 2022,
                                        arXiv:2202.00512),
  eps = sigma_t z_t + alpha_t v,   x = alpha_t z_t - sigma_t v.

Here `x` is the encoded data in (-1, 1) (`f` in DESIGN.md). Square roots of
sigmoids are `exp(0.5 * log_sigmoid(+-gamma))`, accurate for |gamma| up to
float32's exponent range (no `1 - var` forms); dividing by alpha or sigma
multiplies by `exp(-0.5 * log_sigmoid(+-gamma))`.

A score network may predict `eps`, `x` or `v`; the ELBO and the samplers
consume `eps_hat`, so `to_eps` turns any prediction into `eps_hat`.
Conditioning of the conversions (first-order error amplification, float32):
  * `x_to_eps` multiplies errors in x_hat by alpha_t / sigma_t = exp(-gamma/2):
    ill-conditioned at LOW noise (gamma -> -inf); ~775 at gamma = -13.3.
  * `eps_to_x` multiplies errors in eps_hat by sigma_t / alpha_t = exp(gamma/2):
    ill-conditioned at HIGH noise; ~12 at gamma = 5, ~148 at gamma = 10.
  * `v_to_eps` and `v_to_x` are rotations (no division), well conditioned at
    every noise level; `eps_to_v` divides by alpha_t and `x_to_v` by sigma_t.

Also here, because every layer uses them: the callable types `GammaFn` and
`EpsFn`, the per-example broadcast `per_example`, and the array checks
(`check_same_shape`, `check_per_example`, `check_logsnr_range`,
`check_gamma_range`), which run in plain Python on static values at trace
time (`is_concrete` says when a value can be checked). The integer check is
`vdm.checks.check_int`, kept free of jax for the input pipeline.
"""
from typing import Callable

import jax
import jax.numpy as jnp

# gamma_fn(t [B]) -> gamma_t [B]; elementwise and increasing in t.
GammaFn = Callable[[jax.Array], jax.Array]
# eps_fn(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...].
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

PARAMETERIZATIONS = ("eps", "x", "v")


# ----------------------------------------------------------------------------
# Argument checks (plain Python on static values; free at run time).


def is_concrete(*values) -> bool:
  """True if no value is a tracer, i.e. its value can be checked in Python."""
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def check_logsnr_range(lam_min, lam_max) -> None:
  """Raises ValueError unless lam_min < lam_max (skipped for traced values)."""
  if is_concrete(lam_min, lam_max) and not float(lam_min) < float(lam_max):
    raise ValueError(
        f"lam_min={float(lam_min)!r} must be < lam_max={float(lam_max)!r}; "
        "pass a log-SNR range with lam_min below lam_max (e.g. -15.0, 15.0).")


def check_gamma_range(gamma_min, gamma_max) -> None:
  """Raises ValueError unless gamma_min < gamma_max (skipped when traced)."""
  if is_concrete(gamma_min, gamma_max) and not (float(gamma_min)
                                                < float(gamma_max)):
    raise ValueError(
        f"gamma_min={float(gamma_min)!r} must be < gamma_max="
        f"{float(gamma_max)!r} (gamma = -logsnr increases from t=0 to t=1); "
        "swap them or pick e.g. gamma_min=-13.3, gamma_max=5.0.")


def check_same_shape(name_a: str, a: jax.Array, name_b: str,
                     b: jax.Array) -> None:
  """Raises ValueError unless `a` and `b` (e.g. eps and f) have one shape."""
  if a.shape != b.shape:
    raise ValueError(
        f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
        "they must be equal (draw eps with jax.random.normal(key, f.shape)).")


def check_per_example(name: str, value: jax.Array, f: jax.Array, *,
                      f_name: str = "f") -> None:
  """Raises ValueError unless `value` is [] or [B] with B = f.shape[0]."""
  if f.ndim < 1:
    raise ValueError(f"{f_name} must have a leading batch axis [B, ...]; got "
                     f"shape {f.shape}.")
  if value.ndim == 0:
    return
  if value.shape != (f.shape[0],):
    raise ValueError(
        f"{name} must have shape [B] = ({f.shape[0]},) to match {f_name} of "
        f"shape {f.shape}; got shape {value.shape}. Give one value per "
        "example.")


# ----------------------------------------------------------------------------
# Broadcasting and the process.


def per_example(value: jax.typing.ArrayLike, ndim: int) -> jax.Array:
  """[] or [B] (or [B, ...]) -> broadcastable against [B, ...] of rank `ndim`.

  A scalar stays a scalar; otherwise singleton axes are appended up to `ndim`
  axes, so `[B] -> [B, 1, ..., 1]`.

  Args:
    value: [] or [B, ...] per-example values (e.g. gamma_t).
    ndim: rank of the array `value` is to broadcast against.
  Returns:
    `value` (same dtype), [] or [B, ..., 1, 1] with `ndim` axes.
  """
  value = jnp.asarray(value)
  if value.ndim == 0:
    return value
  if value.ndim > ndim:
    raise ValueError(f"a per-example value of shape {value.shape} has more "
                     f"axes than the array it scales ({ndim}); pass it with "
                     "shape [] or [B].")
  return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def log_alpha_sigma(gamma_t: jax.typing.ArrayLike
                    ) -> tuple[jax.Array, jax.Array]:
  """(log alpha_t, log sigma_t) = 0.5 log_sigmoid(-+gamma_t); see `alpha_sigma`.

  Args:
    gamma_t: [...] gamma (= -log SNR).
  Returns:
    Two [...] float32 arrays, finite for every finite gamma_t.
  """
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  return (0.5 * jax.nn.log_sigmoid(-gamma_t),
          0.5 * jax.nn.log_sigmoid(gamma_t))


def alpha_sigma(gamma_t: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Standard deviations of the VP process; Kingma et al. 2021, section "Model".

  Args:
    gamma_t: [...] gamma (= -log SNR).
  Returns:
    (alpha_t, sigma_t), each [...] float32, with alpha_t^2 = sigmoid(-gamma_t)
    and sigma_t^2 = sigmoid(gamma_t), accurate in the tails (no `1 - var`).

  Example:
    >>> from vdm import process
    >>> alpha, sigma = process.alpha_sigma(0.0)
    >>> round(float(alpha) ** 2, 6), round(float(sigma) ** 2, 6)
    (0.5, 0.5)
  """
  log_alpha, log_sigma = log_alpha_sigma(gamma_t)
  return jnp.exp(log_alpha), jnp.exp(log_sigma)


def diffuse(f: jax.typing.ArrayLike, gamma_t: jax.typing.ArrayLike,
            eps: jax.typing.ArrayLike) -> jax.Array:
  """Draws z_t ~ q(z_t | x): `z_t = alpha_t f + sigma_t eps`.

  `alpha_t = sqrt(sigmoid(-gamma_t))`, `sigma_t = sqrt(sigmoid(gamma_t))`;
  Kingma et al. 2021, section "Forward time diffusion process".

  Args:
    f: [B, ...] data in (-1, 1).
    gamma_t: [] or [B] gamma at t, broadcast over the trailing dims of f.
    eps: [B, ...] standard normal noise, the shape of f.
  Returns:
    [B, ...] z_t.

  Example:
    >>> from vdm import process
    >>> z = process.diffuse(jnp.ones((1, 2)), jnp.zeros(1), jnp.zeros((1, 2)))
    >>> round(float(z[0, 0]) ** 2, 6)   # alpha^2 = sigmoid(0)
    0.5
  """
  f = jnp.asarray(f, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  check_same_shape("eps", eps, "f", f)
  check_per_example("gamma_t", gamma_t, f)
  alpha_t, sigma_t = alpha_sigma(per_example(gamma_t, f.ndim))
  return alpha_t * f + sigma_t * eps


# ----------------------------------------------------------------------------
# What a network predicts (eps, x or v) and the conversions between them.


def _check_name(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
        f"unknown parameterization {parameterization!r}; known: "
        f"{', '.join(PARAMETERIZATIONS)}. Set config.model.parameterization "
        "to one of them.")


def _prepare(pred, z_t, gamma_t):
  """float32 pred, z_t and (log_alpha, log_sigma) broadcastable against z_t."""
  pred = jnp.asarray(pred, jnp.float32)
  z_t = jnp.asarray(z_t, jnp.float32)
  if pred.shape != z_t.shape:
    raise ValueError(f"prediction has shape {pred.shape} but z_t has shape "
                     f"{z_t.shape}; they must match.")
  log_alpha, log_sigma = log_alpha_sigma(per_example(gamma_t, z_t.ndim))
  return pred, z_t, log_alpha, log_sigma


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
