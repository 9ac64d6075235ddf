#!/usr/bin/env bash
# Creates experiments/.peer-venv: a separate virtualenv for the official VDM
# code (google-research/vdm), used by experiments/benchmark_nets.py and
# experiments/benchmark_train.py to time the official network in a separate
# process. Separate because the official code registers itself as the Python
# package `vdm`, which would shadow this library in the same process.
#
#   bash experiments/peer_env.sh            # create (no-op if it exists)
#   bash experiments/peer_env.sh --force    # recreate
#   PEER_DIR=/path/to/google-research-vdm bash experiments/peer_env.sh
#
# Needs: python3 (3.11 tested), network access to PyPI, ~2 GB of disk
# (tensorflow-cpu is imported by the official code).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER_DIR="${PEER_DIR:-$HERE/../../shared/peers/google-research-vdm}"
VENV="$HERE/.peer-venv"
PYTHON="${PYTHON:-python3}"
REQS="$PEER_DIR/requirements-peer.txt"

if [[ ! -f "$REQS" ]]; then
  echo "peer_env.sh: $REQS not found; set PEER_DIR to a checkout of the" \
       "official code with requirements-peer.txt" >&2
  exit 1
fi
if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$VENV"
fi
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import flax, chex" \
    2>/dev/null; then
  echo "peer venv ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r "$REQS"
"$VENV/bin/python" -c "import jax, flax; print('peer venv ready:', '$VENV', \
'jax', jax.__version__, 'flax', flax.__version__)"
