#!/usr/bin/env bash
# One prepared GPU check: cuda tests, speed benchmark (eager and compiled), data-path benchmark and one
# full-length VTAB-1k-sized run, in that order, stopping at the first failure. Results (Markdown + JSON) go to
# the folder given as first argument, after every step. Runs on the lent GPU machine as it is (its own
# torch/timm/peft, no network, no install): the package is used from this tree through PYTHONPATH.
#
#   bash scripts/gpu_check.sh docs/results/gpu_check_h100        # on the GPU machine (~10 minutes, budgeted)
#   bash scripts/gpu_check.sh /tmp/gpu_dry --dry-run             # every step at tiny sizes, on CPU (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
