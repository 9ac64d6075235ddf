#!/usr/bin/env bash
# Multi-GPU: one process drives all GPUs of a host (jit over a 'data' mesh),
# so a single host needs nothing special:
#
#   python -m vdm.main --config=configs/cifar10.py --workdir=runs/c10
#
# Several GPU hosts: one process per host, with an explicit coordinator.
# Run this on every host with its own PROCESS_ID (0 .. NUM_HOSTS-1):
#
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 PROCESS_ID=0 \
#     CONFIG=configs/cifar10.py WORKDIR=/shared/runs/c10 \
#     bash experiments/launch_multigpu.sh [--config.x.y=...]
#
# WORKDIR must be a filesystem every host sees (NFS, GCS, ...): Orbax saves
# from all processes together.
set -euo pipefail
: "${CONFIG:=configs/cifar10.py}"; : "${WORKDIR:?set WORKDIR}"
PY=${PYTHON:-.venv/bin/python}
if [[ -n "${COORDINATOR:-}" ]]; then
  exec "$PY" -m vdm.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="$COORDINATOR" --num_processes="${NUM_HOSTS:?}" \
    --process_id="${PROCESS_ID:?}" "$@"
fi
exec "$PY" -m vdm.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
