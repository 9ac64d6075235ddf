"""Argument checks shared by every layer, in plain Python (no jax).

Kept free of jax so that host-side code that must not load it (the input
pipeline) uses the same check as the math and the system: one place decides
what counts as an integer and how the error reads (`TypeError` for a wrong
type, `ValueError` for a value out of range, both quoting the value and, with
`hint`, saying how to fix it).
"""
import operator
from typing import Optional


def check_int(name: str, value, *, minimum: Optional[int] = None,
              maximum: Optional[int] = None, hint: str = "") -> int:
  """Returns `value` as an int if it is an integer in [minimum, maximum].

  Python ints and integer scalars of numpy and (concrete) jax pass; floats,
  bools and jax tracers do not, so a static argument traced by mistake is
  caught.

  Args:
    name: the argument's name, quoted in the error.
    value: the value to check.
    minimum: smallest allowed value, or None for no bound.
    maximum: largest allowed value, or None for no bound.
    hint: a sentence appended to the error saying how to fix it.
  Returns:
    `value` as a Python int.
  Raises:
    TypeError: `value` is not an integer (floats and bools are refused).
    ValueError: `value` is outside [minimum, maximum].

  Example:
    >>> from vdm import checks
    >>> checks.check_int("num_steps", 4, minimum=1)
    4
  """
  suffix = f" {hint}" if hint else ""
  try:
    if isinstance(value, bool):
      raise TypeError
    number = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an int; got {value!r} "
                    f"({type(value).__name__}).{suffix}") from None
  if minimum is not None and maximum is not None:
    expected = f"in [{minimum}, {maximum}]"
  elif minimum is not None:
    expected = f">= {minimum}"
  else:
    expected = f"<= {maximum}"
  if ((minimum is not None and number < minimum)
      or (maximum is not None and number > maximum)):
    raise ValueError(f"{name} must be {expected}; got {number!r}.{suffix}")
  return number
