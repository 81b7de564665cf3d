#!/usr/bin/env bash
# Issue 18 on one H200, one device call: (1) calibration/kernel_grids/profile_phases.py (real
# rank_cached calls profiled beside the grid's timings of their operators), then (2) the
# kernel grid (calibration/kernel_grid.py defaults: L 1024-32768 in 7 steps, M 64-1024 in 5,
# isolated, CUDA-graph and host-issue timings, soft deadline 230 s, no new shape after 330 s).
# The committed grid and profile came from the second such call (2026-12-01); the first
# (before kv_store, head_copy, attn_concat, the strided kv_concat and host rows) gave the
# profile of the five rank_cached cases.
#
#   OUT=/path/to/results bash calibration/kernel_grids/run_grid_profile.sh
#
# Back under $OUT: profile.tar.gz (prof/), grid.tar.gz (h200_kernel_grid/ with log.txt),
# log_profile.txt, log_grid.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
W="${WORK:-/tmp/grid_profile_work}"
. calibration/device_env.sh
mkdir -p "$W/prof"
rc=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/log_profile.txt"
timeout "${PROFILE_TIMEOUT:-120}" "$PY" calibration/kernel_grids/profile_phases.py --out "$W/prof" ${PROFILE_ARGS:-} 2>&1 \
  | grep -v USDT | tee -a "$OUT/log_profile.txt" || rc=1
tar -C "$W" -czf "$OUT/profile.tar.gz" prof || rc=1
timeout "${GRID_TIMEOUT:-400}" "$PY" -m calibration.kernel_grid --device cuda --out "$W/h200_kernel_grid" \
  ${GRID_ARGS:-} 2>&1 | tee "$OUT/log_grid.txt" || rc=1
cp "$OUT/log_grid.txt" "$W/h200_kernel_grid/log.txt" 2>/dev/null
tar -C "$W" -czf "$OUT/grid.tar.gz" h200_kernel_grid || rc=1
echo "run_grid_profile exit status $rc" | tee -a "$OUT/log_grid.txt"
exit $rc
