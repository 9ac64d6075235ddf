"""Tests for vdm.checks: the one integer check, its types and messages."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import checks


@pytest.mark.parametrize("value", [0, 3, np.int32(7), np.int64(1),
                                   jnp.int32(2)])
def test_check_int_accepts_python_numpy_and_jax_ints(value):
  out = checks.check_int("n", value, minimum=0)
  assert out == int(value) and type(out) is int


CHECK_INT_ERRORS = [
    ("float", dict(value=2.5, minimum=1), TypeError,
     r"^n must be an int; got 2\.5 \(float\)\.$"),
    ("bool", dict(value=True, minimum=0), TypeError,
     r"n must be an int; got True \(bool\)"),
    ("float_array", dict(value=jnp.float32(3)), TypeError,
     r"n must be an int"),
    ("none", dict(value=None), TypeError, r"got None \(NoneType\)"),
    ("below", dict(value=0, minimum=1), ValueError,
     r"^n must be >= 1; got 0\.$"),
    ("above", dict(value=6, minimum=1, maximum=5), ValueError,
     r"n must be in \[1, 5\]; got 6"),
    ("above_max_only", dict(value=6, maximum=5), ValueError,
     r"n must be <= 5; got 6"),
    ("hint", dict(value=-1, minimum=0, hint="Use 0 to switch it off."),
     ValueError, r"got -1\. Use 0 to switch it off\.$"),
]


@pytest.mark.parametrize("kwargs,error,match",
                         [c[1:] for c in CHECK_INT_ERRORS],
                         ids=[c[0] for c in CHECK_INT_ERRORS])
def test_check_int_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    checks.check_int("n", **kwargs)


def test_check_int_refuses_a_traced_value():
  def f(n):
    checks.check_int("num_steps", n, minimum=1)
    return n
  with pytest.raises(TypeError, match=r"num_steps must be an int; got "
                     r".*Tracer"):
    jax.jit(f)(3)


def test_checks_imports_no_jax():
  # The input pipeline uses it and must stay free of jax.
  code = "import sys, vdm.checks; print('jax' in sys.modules)"
  out = subprocess.check_output([sys.executable, "-c", code], text=True)
  assert out.strip() == "False"
