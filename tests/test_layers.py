"""Tests for vdm/nets/layers.py not covered with a kernel: Dropout. (GroupNorm,
AttentionBlock and ResnetBlock are tested with their kernels in
test_groupnorm, test_attention and test_parts, and inside the nets.)"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from vdm.nets import layers


def test_dropout_layer_keep_rate_and_scale():
  x = jnp.ones((200, 500))
  out = layers.Dropout(0.1).apply({}, x, deterministic=False,
                                  rngs={"dropout": jax.random.key(0)})
  keep = 58982 / 65536                      # round(0.9 * 2^16) / 2^16
  kept = np.asarray(out) != 0
  np.testing.assert_allclose(np.asarray(out)[kept], 1 / keep, rtol=1e-6)
  # Kept fraction within 5 standard errors of keep (1e5 Bernoulli draws).
  stderr = math.sqrt(keep * (1 - keep) / x.size)
  assert abs(kept.mean() - keep) < 5 * stderr
  # Independent halves of each 32-bit draw: no correlation between the
  # two elements sharing a word (neighbours in the flattened order).
  flat = kept.reshape(-1, 2).astype(float)
  corr = np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]
  assert abs(corr) < 5 / math.sqrt(flat.shape[0])
  np.testing.assert_array_equal(
      layers.Dropout(0.1).apply({}, x, deterministic=True), x)
