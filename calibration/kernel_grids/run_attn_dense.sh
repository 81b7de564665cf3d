#!/usr/bin/env bash
# Issue 18 on one H200, one device call: causal attention (both architectures) on a dense L
# grid, every 512 tokens from 1,024 to 16,384 and every 4,096 to 32,768, at every d_model and
# head layout of the wide grid. HSTU's causal attention runs in query blocks whose number
# steps with L^2 (gr_models.HSTUBlock.QUERY_CHUNK_ELEMS), so its time between the wide grid's
# L points is not a smooth curve; these rows are merged into h200_kernel_grid by
# calibration/kernel_grids/merge_rows.py.
#
#   OUT=/path/to/results bash calibration/kernel_grids/run_attn_dense.sh
#
# Back under $OUT: attn_dense.tar.gz (h200_attn_dense/ with log.txt), log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
W="${WORK:-/tmp/attn_dense_work}"
. calibration/device_env.sh
mkdir -p "$W"
LENS=$(seq -s, 1024 512 16384),20480,24576,28672,32768
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/log.txt"
rc=0
timeout "${GRID_TIMEOUT:-520}" "$PY" -m calibration.kernel_grid --device cuda --out "$W/h200_attn_dense" \
  --kinds attn_causal --history-lens "$LENS" --candidates 64 --soft-deadline-s 300 --deadline-s 450 \
  2>&1 | tee -a "$OUT/log.txt" || rc=1
cp "$OUT/log.txt" "$W/h200_attn_dense/log.txt" 2>/dev/null
tar -C "$W" -czf "$OUT/attn_dense.tar.gz" h200_attn_dense || rc=1
echo "run_attn_dense exit status $rc" | tee -a "$OUT/log.txt"
exit $rc
