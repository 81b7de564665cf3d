#!/usr/bin/env bash
# Production-size GR cost tables on one H200 (issue 15), one device call per architecture:
#
#   OUT=/path/to/results bash calibration/run_production.sh transformer
#   OUT=/path/to/results bash calibration/run_production.sh hstu
#
# The model: 24 layers (the depth of the largest HSTU configurations, arXiv 2402.17152),
# d_model 1024 with 4 heads x 256 (NVIDIA's HSTU inference benchmark), ffn 4096 (transformer),
# bf16, eager PyTorch (as a production serving stack without graph capture runs it), 32
# short-term tokens. Sized so that a full ranking at L = 8k-16k overruns a 30 ms budget on an
# idle device while rank_cached stays at a few ms. Conditions: isolated, idle_gap,
# cache_pressure; batched rank_cached and full_forward at B = 2, 4, 8 (isolated). Each call
# must end inside the device's 600 s limit: the soft deadline cuts later points to
# --min-samples. Back under $OUT: h200_gr_<arch>.tar.gz, log_<arch>.txt, nvidia_smi_<arch>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
arch="${1:?arch: transformer or hstu}"
PY="${PYTHON:-python3}"
case "$arch" in
  transformer) LENS="${LENS:-1024,2048,4096,8192,12288,16384,24576,32768}"; DEADLINE="${DEADLINE:-300}" ;;
  hstu) LENS="${LENS:-1024,2048,4096,8192,12288,16384}"; DEADLINE="${DEADLINE:-280}" ;;
  *) echo "unknown arch $arch"; exit 2 ;;
esac
name="h200_gr_$arch"
W="${WORK:-/tmp/production_work}"
mkdir -p "$W"
nvidia-smi > "$OUT/nvidia_smi_$arch.txt" 2>&1 || true
PYTHONUNBUFFERED=1 timeout "${LIMIT_S:-560}" "$PY" -m calibration.bench --device "${DEVICE:-cuda}" \
  --arch "$arch" --layers "${LAYERS:-24}" --d-model 1024 --heads 4 --ffn 4096 --dtype bfloat16 \
  --short-term 32 --history-lens "$LENS" --candidates "${CANDS:-64,128,256,512}" \
  --conditions isolated,idle_gap,cache_pressure --batch-sizes 2,4,8 --batch-max-tokens 32768 \
  --target-s 0.4 --min-samples 20 --max-samples 400 --kernel-target-s 0.05 --kernel-max-samples 100 \
  --soft-deadline-s "$DEADLINE" --name "$name" --out "$W/$name" ${EXTRA:-} 2>&1 | tee "$OUT/log_$arch.txt"
rc=${PIPESTATUS[0]}
tar -C "$W" -czf "$OUT/$name.tar.gz" "$name" 2>/dev/null || true
echo "bench exit status $rc" | tee -a "$OUT/log_$arch.txt"
exit "$rc"
