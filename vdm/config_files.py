"""Config files (`configs/*.py`) loaded by path, never imported as a package.

The configs are files beside the code, not part of the installed wheel (a
top-level package named `configs` would collide with other projects). The
command line loads them by path (`ml_collections.config_flags`); a variant
config reuses its base the same way:

  from vdm import config_files
  mnist5k = config_files.load_sibling(__file__, "mnist5k")

  def get_config():
    config = mnist5k.get_config()
    config.training.num_steps = 9000
    return config

This module imports nothing heavy: config files import it, and so does
every entry point before jax is configured.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import types


def _module_name(path: str) -> str:
  """A unique, stable module name for the file at `path` (absolute)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  stem = "".join(c if c.isalnum() else "_" for c in stem)
  digest = hashlib.sha1(path.encode()).hexdigest()[:10]
  return f"_vdm_config_{stem}_{digest}"


def load_module(path: str) -> types.ModuleType:
  """The Python module of the config file at `path` (executed once per
  process and file; later calls return the same module).

  Args:
    path: a `.py` file, absolute or relative to the working directory.
  Returns:
    The module (its `get_config()` builds the config).
  Raises:
    FileNotFoundError: there is no such file.
    ValueError: the file is not a `.py` file.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"config path must be a str or os.PathLike; got "
                    f"{type(path).__name__} {path!r}.")
  path = os.path.abspath(os.fspath(path))
  if not path.endswith(".py"):
    raise ValueError(f"config file {path!r} is not a .py file; pass a "
                     "configs/*.py file.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; pass the "
                            "path of a configs/*.py file.")
  name = _module_name(path)
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module      # lets dataclasses etc. find the module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def load_sibling(file: str, name: str) -> types.ModuleType:
  """The config module `name` in the directory of `file`.

  Args:
    file: `__file__` of the calling config.
    name: the sibling's file name without `.py`, e.g. 'mnist5k'.
  """
  if not isinstance(name, str) or not name or os.sep in name:
    raise ValueError(f"sibling config name must be a file name without "
                     f"'.py' (e.g. 'mnist5k'); got {name!r}.")
  directory = os.path.dirname(os.path.abspath(file))
  return load_module(os.path.join(directory, name + ".py"))


def get_config(path: str):
  """`get_config()` of the config file at `path`: an ml_collections
  ConfigDict (not locked; lock it where overrides must not add fields)."""
  module = load_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {os.path.abspath(path)!r} defines no "
                     "get_config(); every config file has one.")
  return module.get_config()
