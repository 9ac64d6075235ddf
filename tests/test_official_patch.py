"""experiments/official/official.patch against the shared patched copy.

The shared copy of the official code (../shared/peers, offline) marks each
line it changed with `# peer-compat` and documents the original in its
PATCHES.md. Undoing those changes gives the official files at the pinned
commit; the project's patch must apply to them with `git apply` (what
experiments/peer_env.sh does to a fresh clone) and give the shared copy's
code, markers aside.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "google-research-vdm"
PATCH = REPO / "experiments" / "official" / "official.patch"
MARK = "  # peer-compat"
PATCHED = ("experiment.py", "experiment_vdm.py", "train_state.py", "utils.py")
# Lines that used jax.tree_multimap (PATCHES.md, item 4).
MULTIMAP = {("utils.py", 130), ("utils.py", 146), ("train_state.py", 88)}


def _official_line(name, lineno, line):
  """The official line behind a `# peer-compat` line, or None (added)."""
  body = line[:-len(MARK)]
  if body.strip() == "import flax":
    return None
  if (name, lineno) in MULTIMAP:
    return body.replace("jax.tree_util.tree_map(", "jax.tree_multimap(")
  if "flax.core.freeze(model.init(" in body:
    return body.replace("flax.core.freeze(model.init(", "model.init(")[:-1]
  return (body.replace(".reshape(())", "")
          .replace("jax.tree_util.tree_map(", "jax.tree_map(")
          .replace("jax.tree_util.tree_leaves(", "jax.tree_leaves("))


@pytest.mark.skipif(not (PEER / "PATCHES.md").exists(),
                    reason="no shared copy of the official code")
@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_patch_turns_the_official_files_into_the_shared_patched_copy(
    tmp_path):
  expected = {}
  for name in PATCHED:
    official, patched = [], []
    for i, line in enumerate((PEER / name).read_text().split("\n"), 1):
      if line.endswith(MARK):
        original = _official_line(name, i, line)
        if original is not None:
          official.append(original)
        patched.append(line[:-len(MARK)])
      else:
        official.append(line)
        patched.append(line)
    (tmp_path / name).write_text("\n".join(official))
    expected[name] = "\n".join(patched)
  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
  subprocess.run(["git", "apply", "--whitespace=nowarn", str(PATCH)],
                 cwd=tmp_path, check=True)
  for name in PATCHED:
    assert (tmp_path / name).read_text() == expected[name], name
  changed = [l for l in PATCH.read_text().splitlines()
             if l[:1] in ("+", "-") and l[:3] not in ("+++", "---")]
  # 18 lines replaced and `import flax` added: the 19 lines of PATCHES.md.
  assert (sum(l[0] == "-" for l in changed),
          sum(l[0] == "+" for l in changed)) == (18, 19)


def test_peer_env_reads_the_pinned_commit_and_requirements():
  text = (REPO / "experiments" / "peer_env.sh").read_text()
  assert "official/PINNED" in text and "official/requirements.txt" in text
  pinned = (REPO / "experiments" / "official" / "PINNED").read_text().split()
  assert pinned[0] == "dc27b98"
