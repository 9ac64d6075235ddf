"""Tests for vdm.decoder: the windowed log p(x | z_0) and its closed-form
gradient against autodiff of the full log_softmax (DESIGN's decoder)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import decoder


def _full_log_prob(x, u, s, vocab_size):
  """log_softmax(-0.5 s (u - f_v)^2)[x] over all levels, by autodiff."""
  f = 2.0 * (jnp.arange(vocab_size) + 0.5) / vocab_size - 1.0
  logits = -0.5 * s[..., None] * jnp.square(u[..., None] - f)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_p, x[..., None], axis=-1)[..., 0]


# gamma_0 = -13.3 takes the 17-level window, -5 sums all levels; 16 levels
# always sum all (the window would cover them), at a noise that spreads x.
@pytest.mark.parametrize("gamma_0,vocab_size", [(-13.3, 256), (-5.0, 256),
                                                (-3.0, 16)])
def test_log_prob_and_gradients_match_full_log_softmax(gamma_0, vocab_size):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randint(0, vocab_size, (4, 6)), jnp.int32)
  f = 2.0 * (x + 0.5) / vocab_size - 1.0
  sigma_over_alpha = np.exp(gamma_0 / 2)
  u = jnp.asarray(f + sigma_over_alpha * rs.normal(size=(4, 6)), jnp.float32)
  s = jnp.full((4, 1), np.exp(-gamma_0), jnp.float32)
  got = jax.jit(decoder.log_prob, static_argnums=3)(x, u, s, vocab_size)
  want = _full_log_prob(x, u, jnp.broadcast_to(s, u.shape), vocab_size)
  # atol: log-probabilities near 0 are sums of float32 terms of size ~1.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  total = lambda fn: (lambda u, s: fn(x, u, s, vocab_size).sum())
  got_du, got_ds = jax.grad(total(decoder.log_prob), (0, 1))(u, s)
  want_du, want_ds = jax.grad(
      total(lambda x, u, s, v: _full_log_prob(
          x, u, jnp.broadcast_to(s, u.shape), v)), (0, 1))(u, s)
  # rtol: the gradient in u is s (f_x - E f), s up to 6e5: relative accuracy.
  np.testing.assert_allclose(got_du, want_du, rtol=2e-4, atol=1e-3)
  np.testing.assert_allclose(got_ds, want_ds, rtol=2e-4, atol=1e-9)
