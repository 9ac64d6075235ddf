#!/usr/bin/env bash
# Delete the TPU VM (checkpoints stay in the bucket).
#   ZONE=us-central2-b NAME=vdm-pod bash experiments/tpu/delete_pod.sh
set -euo pipefail
: "${ZONE:?set ZONE}"; : "${NAME:=vdm-pod}"
gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
