"""Tests for vdm/nets/embeddings.py: Fourier features, the timestep
embedding of gamma, and the host-side label check."""
import numpy as np
import pytest

from vdm import nets
from vdm.nets import embeddings


def test_fourier_features_closed_form():
  z = np.array([[-0.99, 0.0, 0.37], [0.5, 0.123, -0.25]], np.float32)
  out = embeddings.fourier_features(z, min_exponent=6, max_exponent=8)
  z64 = z.astype(np.float64)
  args = np.stack([2 * np.pi * 2.0**n * z64 for n in (6, 7)], -1)  # [2, 3, 2]
  expected = np.concatenate([np.sin(args).reshape(2, -1),
                             np.cos(args).reshape(2, -1)], -1)
  # float32 phase 2 pi 128 z: |arg| <= 800, float32 ulp there ~6e-5.
  np.testing.assert_allclose(out, expected, atol=2e-4)


def test_timestep_embedding_and_gamma_rescaling_closed_form():
  gamma = np.array([-13.3, 0.0, 5.0])
  t = embeddings.rescale_gamma(gamma, gamma_min=-13.3, gamma_max=5.0)
  np.testing.assert_allclose(t, (gamma + 13.3) / 18.3 * 1000, rtol=1e-6)
  emb = embeddings.timestep_embedding(t, 9)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  args = np.asarray(t, np.float64)[:, None] * freqs
  expected = np.concatenate([np.sin(args), np.cos(args), np.zeros((3, 1))], 1)
  np.testing.assert_allclose(emb, expected, atol=5e-4)   # |args| <= 1000


def test_check_labels():
  nets.check_labels(np.array([0, 1, 9]), 10)
  nets.check_labels(None, 0)
  with pytest.raises(ValueError, match=r"\[0, 10\); got 2 outside, e.g. "
                     r"\[10, -1\]"):
    nets.check_labels(np.array([0, 10, 3, -1]), 10)
  with pytest.raises(TypeError, match="labels must be integers; got dtype "
                     "float32"):
    nets.check_labels(np.zeros(3, np.float32), 10)
  with pytest.raises(ValueError, match=r"num_classes=0"):
    nets.check_labels(np.zeros(3, np.int32), 0)
