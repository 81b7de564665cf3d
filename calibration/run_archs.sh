#!/usr/bin/env bash
# Cost tables of the three target-attention architectures (issue 16) on one H200, in ONE device
# call of at most TOTAL_S (default 470) seconds:
#
#   OUT=/path/to/results bash calibration/run_archs.sh              # vista, laser, stca
#   OUT=/path/to/results ARCHS="stca" bash calibration/run_archs.sh
#
# The model (calibration/arch_models.py): STCA's production shape from arXiv 2511.06077 for all
# three: 4 layers, d_model 1024, 16 heads x 64, SwiGLU ffn 2048; VISTA k = 128 summary tokens;
# LASER segments of 128 tokens (4 segments at L = 512, 256 at L = 32768). bf16, eager PyTorch.
# Grid: L in {512, 2048, 8192, 32768}, M in {64, 256, 1024}; conditions isolated and idle_gap,
# every phase of the arch's registry entry under both. The archs run cheapest first; each gets
# the time left (less what the later ones need) as its timeout and that less a margin as its
# --soft-deadline-s (after it every further grid point gets --min-samples calls). STCA's
# stca_per_target (no RLB: every target re-encodes the history) is the slow phase: ~4 s a call
# at L = 32768, M = 1024, so it runs at few samples (--min-samples 6 for stca).
# Back under $OUT: h200_<arch>.tar.gz (the table folder), log_<arch>.txt, nvidia_smi.txt.
#
# CPU dry run (tiny shapes, end to end):
#   OUT=/tmp/archs DEVICE=cpu LAYERS=1 DMODEL=32 HEADS=2 FFN=64 LENS=32,64 CANDS=4,8 KTOK=8 \
#     SEGLEN=16 EXTRA="--threads 1" bash calibration/run_archs.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
PY="${PYTHON:-python3}"
ARCHS="${ARCHS:-vista laser stca}"
TOTAL_S="${TOTAL_S:-470}"
PREFIX="${PREFIX:-h200}"
W="${WORK:-/tmp/archs_work}"
mkdir -p "$W" "$OUT"
t0=$(date +%s)
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true

# seconds each arch is expected to need at least, to reserve for the ones after it
need() { case "$1" in stca) echo 200 ;; vista) echo 60 ;; laser) echo 70 ;; *) echo 60 ;; esac; }

final=0
set -- $ARCHS
while [ $# -gt 0 ]; do
  arch="$1"; shift
  case "$arch" in stca|vista|laser) ;; *) echo "unknown arch $arch"; final=2; continue ;; esac
  reserve=0
  for later in "$@"; do reserve=$((reserve + $(need "$later"))); done
  left=$((TOTAL_S - ($(date +%s) - t0) - 10))
  limit=$((left - reserve))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "skipping $arch: only ${limit}s left" | tee "$OUT/log_$arch.txt"; final=3; continue
  fi
  # margin after the soft deadline: stca's slowest phases (per_target under idle_gap, full) run on
  case "$arch" in stca) margin=150; mins="${MIN_SAMPLES_STCA:-6}"; warm=2 ;; *) margin=35; mins="${MIN_SAMPLES:-20}"; warm=3 ;; esac
  deadline=$((limit - margin)); [ "$deadline" -lt 10 ] && deadline=10
  name="${PREFIX}_$arch"
  echo "== $arch: timeout ${limit}s, soft deadline ${deadline}s (reserved ${reserve}s for: $*)"
  PYTHONUNBUFFERED=1 timeout "$limit" "$PY" -m calibration.bench --device "${DEVICE:-cuda}" \
    --arch "$arch" --layers "${LAYERS:-4}" --d-model "${DMODEL:-1024}" --heads "${HEADS:-16}" \
    --ffn "${FFN:-2048}" --dtype "${DTYPE:-bfloat16}" --summary-tokens "${KTOK:-128}" \
    --segment-len "${SEGLEN:-128}" --history-lens "${LENS:-512,2048,8192,32768}" \
    --candidates "${CANDS:-64,256,1024}" --conditions isolated,idle_gap \
    --warmup "$warm" --target-s "${TARGET_S:-0.15}" --min-samples "$mins" --max-samples 200 \
    --soft-deadline-s "$deadline" --name "$name" --out "$W/$name" ${EXTRA:-} 2>&1 | tee "$OUT/log_$arch.txt"
  rc=${PIPESTATUS[0]}
  tar -C "$W" -czf "$OUT/$name.tar.gz" "$name" 2>/dev/null || true
  echo "bench $arch exit status $rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/log_$arch.txt"
  [ "$rc" -ne 0 ] && final=$rc
done
echo "run_archs done in $(( $(date +%s) - t0 ))s, status $final"
exit "$final"
