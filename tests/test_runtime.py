"""Tests for vdm/runtime.py: XLA:CPU compile options, allocator preloading.

The compile-option test reads the YNNPACK fusions in the compiled HLO text:
what the options are for is where XLA:CPU sends each op.
"""
import ast
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import runtime
import multiprocess_util

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ynn_fused_opcodes(hlo_text):
  """Opcodes inside the computations that YNNPACK fusions call."""
  called = set(re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", hlo_text))
  opcodes, inside = set(), False
  for line in hlo_text.splitlines():
    head = re.match(r"^%([\w.\-]+) .*\{$", line)
    if head:
      inside = head.group(1) in called
    elif inside:
      op = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", line)
      if op:
        opcodes.add(op.group(1))
  return opcodes


def test_cpu_compiler_options_move_convolutions_and_keep_the_numbers(
    monkeypatch):
  # The steps' XLA:CPU options route convolutions away from YNNPACK, also
  # where a dot shares the convolution's consumer (a ResNet block's shortcut
  # + conv, which a YNNPACK dot fusion would take whole): no YNNPACK fusion
  # holds a convolution, the dots still go to YNNPACK, and the forward and
  # all gradients agree with XLA's default lowering.
  assert jax.default_backend() == "cpu"
  options = runtime.compiler_options()
  assert options == runtime.CPU_COMPILER_OPTIONS
  dn = ("NHWC", "HWIO", "NHWC")
  def loss(x, w, w_short):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=dn) + x @ w_short
    return jnp.sum(jnp.tanh(y) ** 2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 32, 32, 64)).astype(np.float32)
  w = 0.05 * rng.standard_normal((3, 3, 64, 32)).astype(np.float32)
  w_short = 0.1 * rng.standard_normal((64, 32)).astype(np.float32)
  fn = jax.value_and_grad(loss, (0, 1, 2))
  tuned = runtime.jit(fn).lower(x, w, w_short).compile()
  default = jax.jit(fn).lower(x, w, w_short).compile()
  assert "convolution" in _ynn_fused_opcodes(default.as_text())
  assert _ynn_fused_opcodes(tuned.as_text()) & {"dot", "convolution"} == {
      "dot"}
  args = (x, w, w_short)
  for a, b in zip(jax.tree.leaves(tuned(*args)),
                  jax.tree.leaves(default(*args))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  monkeypatch.setenv("VDM_XLA_CPU_DEFAULTS", "0")
  assert runtime.compiler_options() is None


_ALLOCATOR_PROBE = """
import resource
from vdm import runtime
runtime.reexec_with_allocator()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x + 1.0)
x = jnp.zeros((8, 1024, 1024), jnp.float32)          # 32 MB per output
for _ in range(15):
  y = f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  y = f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(runtime.loaded_allocator(), faults, float(y[0, 0, 0]))
"""


def _probe_allocator(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "VDM_MALLOC", "VDM_ALLOCATOR",
                      "VDM_ALLOCATOR_TRIED", "MIMALLOC_PURGE_DELAY")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=multiprocess_util.REPO_ROOT, **extra)
  out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env,
                       capture_output=True, text=True, timeout=120,
                       check=True).stdout.split()
  return out[0], int(out[1]), float(out[2])


@pytest.mark.skipif(runtime.find_allocator("mimalloc") is None,
                    reason="cmeel-mimalloc not installed (a dependency on "
                    "Linux x86_64/aarch64: pip install -e .)")
def test_reexec_with_allocator_reuses_xla_buffers():
  # With glibc's malloc each 32 MB output is a fresh mmap, faulted in page
  # by page (8192 4-KiB pages per call); the process restarted with mimalloc
  # (the default, from the package index) reuses the freed pages.
  # VDM_MALLOC=0 keeps glibc.
  name, faults, value = _probe_allocator()
  assert (name, value) == ("mimalloc", 1.0) and faults < 8192
  name, faults, value = _probe_allocator(VDM_MALLOC="0")
  assert (name, value) == ("system", 1.0) and faults >= 10 * 8192


@pytest.mark.skipif(runtime.find_allocator("tcmalloc") is None,
                    reason="tcmalloc not installed")
def test_reexec_with_tcmalloc_when_asked():
  # tcmalloc may grow its page heap once during the ten calls (seen: exactly
  # 8192 faults, one 32 MB output's pages); glibc faults in all ten.
  name, faults, value = _probe_allocator(VDM_ALLOCATOR="tcmalloc")
  assert (name, value) == ("tcmalloc", 1.0) and faults < 2 * 8192


def test_allocator_environment(monkeypatch):
  installed = {"mimalloc": "/site/libmimalloc.so", "tcmalloc": "libtcm.so.4"}
  monkeypatch.setattr(runtime, "find_allocator", installed.get)
  env = runtime.allocator_environment({"LD_PRELOAD": "libother.so", "A": "1"})
  assert env == {"LD_PRELOAD": "/site/libmimalloc.so libother.so", "A": "1",
                 "MIMALLOC_PURGE_DELAY": "-1"}
  assert runtime.allocator_environment(env) == env      # not twice
  kept = {"MIMALLOC_PURGE_DELAY": "100"}                  # the user's setting
  assert runtime.allocator_environment(kept)["MIMALLOC_PURGE_DELAY"] == "100"
  assert runtime.allocator_environment({"VDM_ALLOCATOR": "tcmalloc"}) == {
      "VDM_ALLOCATOR": "tcmalloc", "LD_PRELOAD": "libtcm.so.4"}
  for off in ({"VDM_MALLOC": "0"}, {"VDM_ALLOCATOR": "system"}):
    assert runtime.allocator_environment(off) == off
  del installed["mimalloc"]                               # the fallback
  assert runtime.choose_allocator({}) == "tcmalloc"
  installed.clear()
  assert runtime.allocator_environment({}) == {}
  assert runtime.choose_allocator({"VDM_ALLOCATOR": "mimalloc"}) == "system"
  with pytest.raises(ValueError, match="VDM_ALLOCATOR='jemalloc'"):
    runtime.choose_allocator({"VDM_ALLOCATOR": "jemalloc"})


def test_find_allocator_refuses_unknown_names():
  with pytest.raises(ValueError, match="unknown allocator 'jemalloc'"):
    runtime.find_allocator("jemalloc")


def test_jit_refuses_its_own_argument():
  with pytest.raises(TypeError, match="sets compiler_options itself"):
    runtime.jit(lambda x: x, compiler_options={})


def test_cpu_xla_flags():
  assert runtime.cpu_xla_flags() == [
      f"--{k}={v}" for k, v in runtime.CPU_COMPILER_OPTIONS.items()]


def test_compile_options_are_applied_only_by_runtime():
  # One place applies the options (runtime.jit): no other module of vdm/ or
  # experiments/ passes compiler_options= or calls compiler_options().
  offenders = []
  paths = sorted((REPO / "vdm").rglob("*.py")) + sorted(
      (REPO / "experiments").glob("*.py"))
  for path in paths:
    if path == REPO / "vdm" / "runtime.py":
      continue
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.keyword) and node.arg == "compiler_options":
        offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
      if (isinstance(node, ast.Attribute) and node.attr == "compiler_options"
          and isinstance(node.ctx, ast.Load)):
        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
  assert not offenders, ("compile options applied outside vdm/runtime.py; "
                         f"use runtime.jit: {offenders}")
