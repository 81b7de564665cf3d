#!/usr/bin/env bash
# Issue 18 on one H200, one device call: the wide kernel grid (calibration/kernel_grid.py,
# d 256-4096, heads 4-32, L up to 32k, M up to 1024) and phase tables of two more
# transformer shapes (isolated, no kernels) for the leave-one-model-out validation:
#   h200_t8x512:   8 layers, d_model 512, 8 heads x 64, ffn 2048
#   h200_t12x2048: 12 layers, d_model 2048, 16 heads x 128, ffn 8192
# with h200_gr_transformer (24 x 1024, 4 x 256) and h200_eager_h (8 x 1024, 8 x 128) that
# makes four shapes: three widths, three depths, three head layouts.
#
#   OUT=/path/to/results bash calibration/run_kernel_shapes.sh
#
# What is committed came from two calls on 2026-12-01: the grid part (defaults, 190 s), and
# the two shape tables with these settings (45 s together).
# Back under $OUT: kernel_shapes.tar.gz (h200_kernel_grid/, h200_t8x512/, h200_t12x2048/)
# and log_kernel_shapes.txt. A CPU dry run: DEVICE=cpu GRID_ARGS="..." SHAPE_ARGS="...".
set -uo pipefail
cd "$(dirname "$0")/.."
W="${WORK:-/tmp/kernel_shapes_work}"
. calibration/device_env.sh
mkdir -p "$W"
DEVICE="${DEVICE:-cuda}"
LOG="$OUT/log_kernel_shapes.txt"
rc=0
"$PY" -m calibration.kernel_grid --device "$DEVICE" --out "$W/h200_kernel_grid" \
  --soft-deadline-s "${GRID_SOFT:-100}" --deadline-s "${GRID_DEADLINE:-150}" ${GRID_ARGS:-} 2>&1 | tee "$LOG" || rc=1
for shape in "h200_t8x512 --layers 8 --d-model 512 --heads 8 --ffn 2048" \
             "h200_t12x2048 --layers 12 --d-model 2048 --heads 16 --ffn 8192"; do
  set -- $shape
  name=$1; shift
  "$PY" -m calibration.bench --device "$DEVICE" --arch transformer "$@" --short-term 32 \
    --history-lens "${LENS:-1024,4096,8192,16384}" --candidates "${CANDS:-64,256}" \
    --conditions isolated --no-kernels --target-s 0.15 --min-samples 8 --max-samples 100 --warmup 5 \
    --soft-deadline-s "${SHAPE_DEADLINE:-40}" --name "$name" --out "$W/$name" ${SHAPE_ARGS:-} 2>&1 | tee -a "$LOG" || rc=1
done
tar -C "$W" -czf "$OUT/kernel_shapes.tar.gz" . 2>/dev/null || true
echo "run_kernel_shapes exit status $rc" | tee -a "$LOG"
exit $rc
