#!/usr/bin/env bash
# Launch vdm.main on every worker of a TPU VM pod slice (one process per
# host; jax.distributed.initialize() finds the coordinator on TPU VMs by
# itself, so no address is passed).
#
#   ZONE=us-central2-b NAME=vdm-pod BUCKET=gs://my-bucket \
#     CONFIG=configs/cifar10.py RUN=c10 bash experiments/tpu/launch.sh \
#     [--config.training.batch_size=512 ...]
#
# The workdir is on GCS: Orbax checkpoints are written by all hosts
# together. Rerunning the same command resumes from the newest checkpoint
# (also after a preemption: SIGTERM makes every host save first).
# Datasets: tfds data_dir on GCS via --config.data.data_dir=gs://.../tfds.
set -euo pipefail
: "${ZONE:?set ZONE}"; : "${NAME:=vdm-pod}"; : "${BUCKET:?set BUCKET=gs://...}"
: "${CONFIG:=configs/cifar10.py}"; : "${RUN:=run}"; : "${MODE:=train}"
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
  cd ~/vdm && nohup .venv/bin/python -m vdm.main --config=$CONFIG \
    --workdir=$BUCKET/$RUN --mode=$MODE $EXTRA > ~/vdm_$RUN.log 2>&1 &
  echo started on \$(hostname)
"
echo "logs: gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/vdm_$RUN.log'"
echo "TensorBoard: tensorboard --logdir=$BUCKET/$RUN"
