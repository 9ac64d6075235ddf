#!/usr/bin/env bash
# The prepared GPU check of issue 20: MFU of the paper's CIFAR-10 train step
# at batch 128, 256 and the largest that fits, fused GroupNorm off and on,
# plus the official step when its code is set up. Under 8 minutes on one
# H100 (a hard timeout at 470 s keeps it so).
#
#   experiments/gpu_mfu.sh                    # baseline XLA flags
#   experiments/gpu_mfu.sh --flag_sets all    # + the XLA:GPU flag variants
#   PYTHON=/path/to/python experiments/gpu_mfu.sh
#
# Needs a Python with this package and a CUDA jax: pip install -e . "jax[cuda12]".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if [ "$backend" != "gpu" ]; then
  echo "error: $PYTHON's jax runs on '$backend', not a GPU; install a CUDA jax" \
       "(pip install \"jax[cuda12]\") or run: $PYTHON experiments/gpu_mfu.py --smoke" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 "$PYTHON" experiments/gpu_mfu.py "$@"
