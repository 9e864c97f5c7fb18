#!/usr/bin/env bash
# The GPU check (experiments/gpu_check.py): run this when a GPU is lent. Under 8 minutes:
# the CUDA tests, bf16 training steps with MFU, 2-GPU nccl DDP (if two GPUs), cached vs
# uncached sampling at 1024-px token counts, then one summary table.
#
#   bash experiments/gpu_check.sh                               # on the GPU machine
#   bash experiments/gpu_check.sh --json "$OUT/gpu_check.json"  # also keep the numbers
#   bash experiments/gpu_check.sh --device cpu --quick          # tiny sizes, to check it without a GPU
#
# Each stage has its own time limit inside the Python driver, so a stage that hangs or fails
# is one row of the table; the outer `timeout` is only a backstop in case the driver itself
# hangs (it is longer than the driver's 470 s budget, so it never cuts a healthy run short).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=5 480 "${PYTHON:-python}" -m experiments.gpu_check "$@"
