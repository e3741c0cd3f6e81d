#!/usr/bin/env bash
# The one command to run when a GPU is lent: every stage on full Games, timed, with peak device
# memory and the device name, in one JSON file ($OUT/gpu_check.json, else runs/gpu_check.json).
# Budget: 8 minutes on one GPU. Without a GPU (nvidia-smi missing or failing) it runs a tiny
# version of itself on synthetic data (about a minute), which tests/test_gpu_check.py runs.
#   bash bench/gpu_check.sh [--data DIR] [--out FILE] [--tiny | --full]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m jaxrec.cli doctor || true   # what each side will run on, in the log
fi
exec "$PY" bench/gpu_check.py "$@"
