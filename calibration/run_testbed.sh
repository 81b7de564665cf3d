#!/usr/bin/env bash
# Fidelity testbed on one GPU: calibrate the testbed's model, then serve it for real.
#
#   OUT=/path/to/results bash calibration/run_testbed.sh a
#   OUT=/path/to/results bash calibration/run_testbed.sh h
#
# Each part is one device call of at most ~540 s: it first calibrates a cost table on this
# GPU (calibration/bench.py, isolated and idle_gap, the testbed's grid, CUDA graphs), then
# serves that model for real (calibration/testbed.py) in one series whose runs alternate
# policies and loads (so drift over the call is not read as an effect of load or policy).
# The series' first run is a relay run: its pilot sees all three phases. Runs are given in
# seconds of arrivals and shrink (never below MIN_REQUESTS requests) so the part ends by its
# deadline. What comes back under $OUT (flat, at most 8 files): log_<part>.txt,
# table_<part>.tar.gz (h100_graphs_<part>/), <run>.tar.gz per run. Unpack them all into one
# folder: each run's scenario.yaml names its table as ../h100_graphs_<part>.
#
#   a: relay 0.6 | full 0.3 | relay 0.6 with a 256 MiB cache (evicts) | full 0.8
#   b: relay 0.3 | full 0.6 | relay 0.85 | full 0.9
#   c: relay 0.6 | full 0.6, each ~215 s of arrivals (tags _long): how the P99 interval
#      narrows with run length
# Parts a-c made calibration/testbed_runs/graphs/ (testbed at commit c36ae9c: each pre-infer
# admission that evicted scanned all cached users). Parts d-g make the long runs of
# calibration/testbed_runs/long/ (O(1) eviction), sized for a measured-P99 interval of about
# +-5%, with a GPU clock/power log (gpu_<part>.csv, 1 s) beside each part's log, and each
# part's 10 s pilot kept as a run (pilot_<first run>: this machine's own short serving trace)
# (a dry run sets BUDGET_DG and SECONDS_DG):
#   d: relay 0.6 | full 0.6, 235 s each
#   e: full 0.8, 470 s
#   f: relay 0.8, 470 s
#   g: relay 0.3 (150 s) | full 0.3 (120 s) | relay 0.45 with a 256 MiB cache (200 s)
# Parts h-k serve a host-bound system on an H200 (issue 12): an EAGER model of 8x the
# per-request GEMM FLOPs (8 layers, d_model 1024, 8 heads, ffn 4096), table h200_eager_<part>. A part
# reuses the table when the machine still holds it (a warm machine: same GPU), else it
# calibrates again; each keeps its own 10 s pilot:
#   h: full 0.5 (140 s) | relay 0.5 (140 s) | full 0.7 (100 s)
#   i: relay 0.7 (110 s) | full 0.3 (100 s) | relay 0.3 (100 s) | relay 0.5, 1 GiB cache (evicts, 110 s)
#   j: full 0.5, 400 s        k: relay 0.5, 400 s
#
# Model: transformer, 4 layers, d_model 512, 8 heads, ffn 2048, bf16, 32 short-term tokens;
# L in {1024, 2048, 4096, 8192}, M = 128. Override with the variables below (a CPU dry run:
# DEVICE=cpu GRAPHS= MODEL="..." GRID="..." WORKLOAD="..." SECONDS_PER_RUN=...).
# The eager runs of the first session (calibration/testbed_runs/eager/) came from this
# script at commit 77f596b.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
part="${1:?part: a-k}"
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-535}"                 # this part must be done by T0 + BUDGET_S
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
GRAPHS="${GRAPHS---cuda-graphs}"
W="${WORK:-/tmp/testbed_work}"
MODEL="${MODEL:---arch transformer --layers 4 --d-model 512 --heads 8 --ffn 2048 --dtype bfloat16 --short-term 32}"
GRID="${GRID:---history-lens 1024,2048,4096,8192 --candidates 128}"
BENCH_EXTRA="${BENCH_EXTRA:---target-s 0.6 --max-samples 2000 --soft-deadline-s 90}"
WORKLOAD="${WORKLOAD:---history-lens 1024,2048,4096,8192 --length-weights 0.35,0.3,0.2,0.15 --candidates 128 --users 50000 --zipf 1.2 --lead-ms 20 --threshold 4096}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-100}"
MIN_REQUESTS="${MIN_REQUESTS:-10000}"
case "$part" in
  a) POLICIES=relay,full,relay,full; LOADS=0.6,0.3,0.6,0.8; CACHES=16384,16384,256,16384; TAGS=",,_small," ;;
  b) POLICIES=relay,full,relay,full; LOADS=0.3,0.6,0.85,0.9; CACHES=16384; TAGS="" ;;
  c) POLICIES=relay,full; LOADS=0.6,0.6; CACHES=16384; TAGS="_long,_long"; SECONDS_PER_RUN="${SECONDS_PER_RUN_C:-215}" ;;
  d) POLICIES=relay,full; LOADS=0.6,0.6; CACHES=16384; TAGS=""; SECONDS_PER_RUN=235,235 ;;
  e) POLICIES=full; LOADS=0.8; CACHES=16384; TAGS=""; SECONDS_PER_RUN=470 ;;
  f) POLICIES=relay; LOADS=0.8; CACHES=16384; TAGS=""; SECONDS_PER_RUN=470 ;;
  g) POLICIES=relay,full,relay; LOADS=0.3,0.3,0.45; CACHES=16384,16384,256; TAGS=",,_small"
     SECONDS_PER_RUN=150,120,200 ;;
  h) POLICIES=full,relay,full; LOADS=0.5,0.5,0.7; CACHES=16384; TAGS=""; SECONDS_PER_RUN=140,140,100 ;;
  i) POLICIES=relay,full,relay,relay; LOADS=0.7,0.3,0.3,0.5; CACHES=16384,16384,16384,1024; TAGS=",,,_small"
     SECONDS_PER_RUN=110,100,100,110 ;;
  j) POLICIES=full; LOADS=0.5; CACHES=16384; TAGS="_long"; SECONDS_PER_RUN=400 ;;
  k) POLICIES=relay; LOADS=0.5; CACHES=16384; TAGS="_long"; SECONDS_PER_RUN=400 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
table="h100_graphs_$part"
case "$part" in h|i|j|k)      # the H200 eager system: one table per machine, reused while warm
  table=h200_eager_$part; GRAPHS=""; MIN_REQUESTS="${MIN_REQUESTS_HK:-4000}"
  MODEL="${MODEL_HK:---arch transformer --layers 8 --d-model 1024 --heads 8 --ffn 4096 --dtype bfloat16 --short-term 32}"
  BENCH_EXTRA="${BENCH_EXTRA_HK:---target-s 0.5 --max-samples 1000 --soft-deadline-s 80}" ;;
esac
PILOT=()
case "$part" in d|e|f|g|h|i|j|k) BUDGET_S="${BUDGET_DG:-565}"; SECONDS_PER_RUN="${SECONDS_DG:-$SECONDS_PER_RUN}"
                         PILOT=(--pilot-s 10 --keep-pilot) ;; esac
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
log="$OUT/log_$part.txt"
left() { echo $(( T0 + BUDGET_S - $(date +%s) )); }

{
  echo "== $(date -u +%FT%TZ) part $part on $(hostname); budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
  "$PY" -c "import torch, numpy, pandas, pyarrow, yaml; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

  earlier=$(ls -d "$W"/h200_eager_*/manifest.json 2>/dev/null | head -1)
  if [ -n "$earlier" ] && [ "${table#h200_eager}" != "$table" ]; then
    table=$(basename "$(dirname "$earlier")")
    echo "== reusing $table, calibrated on this machine in an earlier part"; rc=0
  else
    echo "== calibrate $table ($(left)s left)"
    timeout 170 "$PY" -m calibration.bench --device "$DEVICE" --out "$W/$table" --name "$table" $MODEL $GRID \
        --conditions isolated,idle_gap --no-kernels $GRAPHS $BENCH_EXTRA
    rc=$?
  fi
  echo "== bench exit $rc after $(( $(date +%s) - T0 ))s"
  tar czf "$OUT/table_$part.tar.gz" -C "$W" "$table"
  [ $rc -eq 0 ] || { echo "calibration failed: no testbed runs"; exit 1; }

  gpu_log=""
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then   # clocks and power, 1 s
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv,nounits -l 1 > "$OUT/gpu_$part.csv" 2>/dev/null &
    gpu_log=$!
  fi
  echo "== testbed $POLICIES at $LOADS ($(left)s left)"
  until=$(( T0 + BUDGET_S ))
  tags=(); [ -n "$TAGS" ] && tags=(--tags "$TAGS")
  timeout $(( until - $(date +%s) + 15 )) "$PY" -m calibration.testbed --table "$W/$table" --out "$W" \
      --device "$DEVICE" --deadline "$until" --min-requests "$MIN_REQUESTS" --pack-to "$OUT" $WORKLOAD \
      --policy "$POLICIES" --loads "$LOADS" --cache-mib "$CACHES" --seconds "$SECONDS_PER_RUN" "${tags[@]}" "${PILOT[@]}"
  echo "== testbed exit $? after $(( $(date +%s) - T0 ))s"
  [ -n "$gpu_log" ] && kill "$gpu_log" 2>/dev/null
  echo "== $(date -u +%FT%TZ) done after $(( $(date +%s) - T0 ))s"
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv 2>/dev/null || true
  ls -la "$OUT"
} 2>&1 | tee "$log"
