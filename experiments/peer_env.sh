#!/usr/bin/env bash
# Sets up the official VDM code (google-research/vdm) for the comparisons
# (experiments/benchmark_train.py, benchmark_eval.py, benchmark_nets.py):
#
#   1. the code: ../shared/peers/google-research-vdm where it exists (a copy
#      already patched, offline), else a clone of the official repository at
#      the commit in experiments/official/PINNED into experiments/.peer-src,
#      with this project's experiments/official/official.patch applied;
#   2. experiments/.peer-venv, a separate virtualenv with
#      experiments/official/requirements.txt. Separate because the official
#      code registers itself as the Python package `vdm`, which would shadow
#      this library in the same process.
#
#   bash experiments/peer_env.sh            # set up (no-op if ready)
#   bash experiments/peer_env.sh --force    # recreate the venv (and clone)
#   PEER_DIR=/path/to/patched/code bash experiments/peer_env.sh
#
# Needs: python3 (3.11 tested), git and network access to GitHub and PyPI
# (none when the shared copy and the venv exist), ~2 GB of disk
# (tensorflow-cpu is imported by the official code).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OFFICIAL="$HERE/official"
SHARED="$HERE/../../shared/peers/google-research-vdm"
CLONE="$HERE/.peer-src"
VENV="$HERE/.peer-venv"
PYTHON="${PYTHON:-python3}"
REPO_URL="${PEER_REPO_URL:-https://github.com/google-research/vdm.git}"
COMMIT="${PEER_COMMIT:-$(awk 'NR == 1 {print $1}' "$OFFICIAL/PINNED")}"

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$VENV" "$CLONE"
fi

if [[ -n "${PEER_DIR:-}" ]]; then
  CODE="$PEER_DIR"
elif [[ -f "$SHARED/experiment_vdm.py" ]]; then
  CODE="$(cd "$SHARED" && pwd)"
else
  CODE="$CLONE"
  if [[ ! -f "$CLONE/.vdm-patched" ]]; then
    rm -rf "$CLONE"
    echo "cloning $REPO_URL at $COMMIT into $CLONE"
    git clone --quiet "$REPO_URL" "$CLONE"
    git -C "$CLONE" checkout --quiet "$COMMIT"
    git -C "$CLONE" apply --whitespace=nowarn "$OFFICIAL/official.patch"
    touch "$CLONE/.vdm-patched"
  fi
fi
if [[ ! -f "$CODE/experiment_vdm.py" ]]; then
  echo "peer_env.sh: $CODE holds no experiment_vdm.py; set PEER_DIR to the" \
       "official code with experiments/official/official.patch applied" >&2
  exit 1
fi
echo "official code: $CODE"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import flax, chex, clu" \
    2>/dev/null; then
  echo "peer venv ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r "$OFFICIAL/requirements.txt"
"$VENV/bin/python" -c "import jax, flax; print('peer venv ready:', '$VENV', \
'jax', jax.__version__, 'flax', flax.__version__)"
