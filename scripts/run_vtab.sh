#!/usr/bin/env bash
# Thin wrapper around `capaboost-vtab sweep`: all 19 VTAB-1k tasks, CapaBoost-LoRA vs LoRA, 3 seeds.
# Usage: scripts/run_vtab.sh DATA_PATH [OUTPUT] [GPUS]   e.g. scripts/run_vtab.sh /data/vtab-1k runs 0,1,2,3
set -euo pipefail
data=${1:?usage: scripts/run_vtab.sh DATA_PATH [OUTPUT] [GPUS]}
out=${2:-runs}
gpus=${3:-0}
capaboost-vtab check --data-path "$data"
capaboost-vtab sweep --tasks all --methods capaboost_lora lora --seeds 0 1 2 --gpus "$gpus" \
    --model vit_base --data-path "$data" --output "$out"
capaboost-vtab report "$out"
