#!/usr/bin/env bash
# Fidelity testbed on one GPU: calibrate the testbed's model, then serve it for real.
#
#   OUT=/path/to/results bash calibration/run_testbed_h100.sh a   # table + full runs + relay eviction run
#   OUT=/path/to/results bash calibration/run_testbed_h100.sh b   # table + a full run at 0.8 + relay runs
#
# Each part is one device call of at most ~540 s: it first calibrates a cost table on this
# GPU (calibration/bench.py: isolated and idle_gap conditions on the testbed's grid), then
# runs calibration/testbed.py against it. Runs shrink (never below MIN_REQUESTS) so the
# part ends by its deadline. What comes back under $OUT (flat, at most 8 files):
#   log_<part>.txt, table_<part>.tar.gz (h100_testbed_<part>/), <run>.tar.gz per run.
# Unpack them all into one folder (calibration/testbed_runs/): each run's scenario.yaml
# names its table as ../h100_testbed_<part>.
#
# Model: transformer, 4 layers, d_model 512, 8 heads, ffn 2048, bf16, 32 short-term tokens;
# L in {1024, 2048, 4096, 8192}, M = 128. Override with the variables below (a CPU dry run:
# DEVICE=cpu MODEL="..." GRID="..." WORKLOAD="..." REQ_FULL=... REQ_RELAY=... REQ_SMALL=...).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
part="${1:?part a or b}"
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-530}"                 # this part must be done by T0 + BUDGET_S
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
W="${WORK:-/tmp/testbed_work}"
MODEL="${MODEL:---arch transformer --layers 4 --d-model 512 --heads 8 --ffn 2048 --dtype bfloat16 --short-term 32}"
GRID="${GRID:---history-lens 1024,2048,4096,8192 --candidates 128}"
BENCH_EXTRA="${BENCH_EXTRA:---target-s 0.4 --soft-deadline-s 75}"
WORKLOAD="${WORKLOAD:---history-lens 1024,2048,4096,8192 --length-weights 0.35,0.3,0.2,0.15 --candidates 128 --users 50000 --zipf 1.2 --lead-ms 20 --threshold 4096}"
LOADS="${LOADS:-0.3,0.6,0.9}"
REQ_FULL="${REQ_FULL:-20000,30000,50000}"
REQ_RELAY="${REQ_RELAY:-15000,20000,28000}"
LOADS_RELAY="${LOADS_RELAY:-0.3,0.6,0.82}"
FULL_B_LOAD="${FULL_B_LOAD:-0.8}"
REQ_FULL_B="${REQ_FULL_B:-20000}"
FULL_B_UNTIL_S="${FULL_B_UNTIL_S:-160}"     # part b: the full run must end by T0 + this
REQ_SMALL="${REQ_SMALL:-30000}"
SMALL_MIB="${SMALL_MIB:-256}"
BIG_MIB="${BIG_MIB:-16384}"
MIN_REQUESTS="${MIN_REQUESTS:-12000}"
SMALL_RESERVE_S="${SMALL_RESERVE_S:-120}"  # part a: seconds kept for the eviction run
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
table="h100_testbed_$part"
log="$OUT/log_$part.txt"
left() { echo $(( T0 + BUDGET_S - $(date +%s) )); }

{
  echo "== $(date -u +%FT%TZ) part $part on $(hostname); budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
  "$PY" -c "import torch, numpy, pandas, pyarrow, yaml; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

  echo "== calibrate $table ($(left)s left)"
  timeout 160 "$PY" -m calibration.bench --device "$DEVICE" --out "$W/$table" --name "$table" $MODEL $GRID \
      --conditions isolated,idle_gap --no-kernels $BENCH_EXTRA
  rc=$?
  echo "== bench exit $rc after $(( $(date +%s) - T0 ))s"
  tar czf "$OUT/table_$part.tar.gz" -C "$W" "$table"
  [ $rc -eq 0 ] || { echo "calibration failed: no testbed runs"; exit 1; }

  tb() {   # tb DEADLINE_FROM_T0 args...: one testbed series, hard-stopped just after its deadline
    local until=$(( T0 + $1 )); shift
    echo "== testbed $* ($(left)s left)"
    local hard=$(( until - $(date +%s) + 15 )); [ $hard -gt 30 ] || hard=30
    timeout $hard "$PY" -m calibration.testbed --table "$W/$table" --out "$W" \
        --device "$DEVICE" --deadline "$until" --min-requests "$MIN_REQUESTS" --pack-to "$OUT" $WORKLOAD "$@"
    echo "== testbed exit $? after $(( $(date +%s) - T0 ))s"
  }
  case "$part" in
    a)
      tb $(( BUDGET_S - SMALL_RESERVE_S )) --policy full --loads "$LOADS" --requests "$REQ_FULL"
      tb "$BUDGET_S" --policy relay --loads 0.6 --requests "$REQ_SMALL" --cache-mib "$SMALL_MIB" --tags _small
      ;;
    b)
      # a full run below saturation first (part a's 0.9 target ran at 0.965), then the relay runs
      tb "$FULL_B_UNTIL_S" --policy full --loads "$FULL_B_LOAD" --requests "$REQ_FULL_B"
      tb "$BUDGET_S" --policy relay --loads "$LOADS_RELAY" --requests "$REQ_RELAY" --cache-mib "$BIG_MIB"
      ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "== $(date -u +%FT%TZ) done after $(( $(date +%s) - T0 ))s"
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv 2>/dev/null || true
  ls -la "$OUT"
} 2>&1 | tee "$log"
