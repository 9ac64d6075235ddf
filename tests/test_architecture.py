"""The layering of docs/architecture.md, checked on the source.

Each module of `vdm/` belongs to one layer; it may import `vdm` modules of its
own layer and of the layers above it (lower numbers), never below. The math
layer is pure: no Flax training code, no optimizer, checkpointing, dataset,
TensorBoard or plotting library and no runtime settings, so its formulas can
be read, tested and reused without the training system.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "vdm"

# Layer of every module (docs/architecture.md). A new module must be added
# here, so that its place is a decision, not an accident.
LAYERS = {
    # 0: math, pure functions of arrays.
    "vdm.checks": 0, "vdm.process": 0, "vdm.schedules": 0,
    "vdm.weighting": 0,
    "vdm.elbo": 0, "vdm.decoder": 0, "vdm.adaptive": 0,
    "vdm.learned_schedules": 0, "vdm.likelihood": 0,
    # 1: networks, model, samplers (Flax modules and closures).
    "vdm.nets": 1, "vdm.model": 1, "vdm.model_options": 1, "vdm.sampling": 1,
    # 2: data.
    "vdm.input_pipeline": 2, "vdm.datasets_local": 2,
    "vdm.datasets_tfds": 2,
    # 3: the system: devices, runtime settings, training, evaluation, outputs.
    "vdm.parallel": 3, "vdm.runtime": 3, "vdm.config_lib": 3,
    "vdm.checkpointing": 3, "vdm.train": 3, "vdm.evaluate": 3,
    "vdm.reporting": 3, "vdm.generation": 3, "vdm.frechet": 3,
    "vdm.official": 3, "vdm.runs": 3, "vdm.config_files": 3,
    "vdm.stored_config": 3, "vdm.checksums": 3, "vdm.workdir_lock": 3,
    "vdm.preemption": 3, "vdm.training_loop": 3,
    # 4: entry points.
    "vdm.cli": 4, "vdm.main": 4,
}

# Third-party packages a layer must not import (the layers below may).
FORBIDDEN = {
    0: ("flax.training", "optax", "orbax", "tensorflow", "tensorflow_datasets",
        "tensorboardX", "matplotlib", "absl", "ml_collections", "etils"),
    1: ("flax.training", "optax", "orbax", "tensorflow", "tensorflow_datasets",
        "tensorboardX", "matplotlib", "ml_collections", "etils"),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _layer(module: str) -> int:
  for name, layer in LAYERS.items():
    if module == name or module.startswith(name + "."):
      return layer
  raise KeyError(module)


def _imports(path: pathlib.Path) -> list[str]:
  """Absolute names of everything a module imports (also inside functions)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  return names


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
  missing = []
  for path in MODULES:
    name = _module_name(path)
    if name == "vdm":
      continue
    try:
      _layer(name)
    except KeyError:
      missing.append(name)
  assert not missing, (f"modules without a layer: {missing}; add them to "
                       "LAYERS here and to docs/architecture.md")


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_imports_follow_the_layers(path):
  name = _module_name(path)
  if name == "vdm":
    return
  layer = _layer(name)
  bad = []
  for imported in _imports(path):
    if imported.startswith("vdm."):
      target = imported
      # `from vdm import train` names the module vdm.train.
      if _layer_or_none(target) is None:
        target = imported.rsplit(".", 1)[0]
      target_layer = _layer_or_none(target)
      if target_layer is not None and target_layer > layer:
        bad.append(f"{imported} (layer {target_layer})")
    for prefix in FORBIDDEN.get(layer, ()):
      if imported == prefix or imported.startswith(prefix + "."):
        bad.append(imported)
  assert not bad, f"{name} (layer {layer}) imports {bad}"


def _layer_or_none(module: str):
  try:
    return _layer(module)
  except KeyError:
    return None


def test_math_modules_import_no_training_io_or_runtime():
  # The loaded modules, not just the source: catches imports made through
  # another module (e.g. elbo -> x -> optax).
  code = ("import sys, vdm.process, vdm.elbo, vdm.schedules, vdm.weighting, "
          "vdm.adaptive; print(sorted(m for m in ('optax', 'orbax', "
          "'tensorflow', 'tensorboardX', 'matplotlib', 'flax.training', "
          "'vdm.runtime', 'vdm.train', 'vdm.parallel', 'vdm.checkpointing', "
          "'vdm.input_pipeline') if m in sys.modules))")
  out = subprocess.check_output([sys.executable, "-c", code], text=True)
  assert out.strip() == "[]"


def test_the_layer_check_catches_a_violation(tmp_path):
  # The checker itself must fail on a bad import.
  path = tmp_path / "bad.py"
  path.write_text("from vdm import train\nimport optax\n")
  imported = _imports(path)
  assert "vdm.train" in imported and "optax" in imported
  assert _layer("vdm.train") > _layer("vdm.elbo")
