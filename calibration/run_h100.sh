#!/usr/bin/env bash
# Measure the default GR model on this machine's GPU and write the h100_gr_base cost table.
#
#   OUT=/path/to/results bash calibration/run_h100.sh [extra calibration.bench arguments]
#
# Run from anywhere; writes $OUT/h100_gr_base/{table.parquet,kernels.parquet,manifest.json,log.txt}.
# Default model: transformer, 8 layers, d_model 512, 8 heads, ffn 2048, bf16, 32 short-term tokens.
# Takes about 5-7 minutes on an H100 (after --soft-deadline-s every point gets 30 samples).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives h100_gr_base/}"
dest="$OUT/h100_gr_base"
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
  "$PY" -m calibration.bench --device cuda --out "$dest" --name h100_gr_base \
    --arch transformer --layers 8 --d-model 512 --heads 8 --ffn 2048 --dtype bfloat16 --short-term 32 \
    --history-lens 256,512,1024,2048,4096,8192,16384 --candidates 32,64,128,256,512,1024 \
    --soft-deadline-s 420 "$@"
  echo "== $(date -u +%FT%TZ) done"
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
} 2>&1 | tee "$dest/log.txt"
