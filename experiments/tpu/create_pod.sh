#!/usr/bin/env bash
# Create a TPU VM pod slice and install vdm on every worker.
#
#   ZONE=us-central2-b TYPE=v4-32 NAME=vdm-pod BUCKET=gs://my-bucket \
#     bash experiments/tpu/create_pod.sh
#
# Needs the gcloud CLI, a project with TPU quota, and a GCS bucket for the
# workdir (checkpoints must be on storage every worker can reach).
set -euo pipefail
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${TYPE:?set TYPE, e.g. v4-32 (a pod slice) or v4-8 (one host)}"
: "${NAME:=vdm-pod}"
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO_URL:=$(git -C "$(dirname "$0")/../.." remote get-url origin 2>/dev/null || echo '')}"
: "${REF:=$(git -C "$(dirname "$0")/../.." rev-parse HEAD)}"
[[ -n "$REPO_URL" ]] || { echo "set REPO_URL to a git URL the workers can clone" >&2; exit 2; }

gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
  --accelerator-type="$TYPE" --version="$RUNTIME"

# Same code and environment on every worker: clone at one commit, install
# jax[tpu] (libtpu) and the package.
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
  set -e
  rm -rf ~/vdm && git clone -q '$REPO_URL' ~/vdm && cd ~/vdm && git checkout -q '$REF'
  python3 -m venv ~/vdm/.venv
  ~/vdm/.venv/bin/pip install -q --upgrade pip
  ~/vdm/.venv/bin/pip install -q -e '.[tfds,tpu]'
"
echo "created $NAME ($TYPE in $ZONE); launch with experiments/tpu/launch.sh"
