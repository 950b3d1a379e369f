#!/usr/bin/env bash
# One-shot GPU check (at most ~8 minutes on one H100): CUDA, NCCL through Ray Train, GPU log-mel
# against CPU, bf16 + channels_last + torch.compile pre-training with the loss falling,
# gpu_bench.py (encoder samples/s fp32 / bf16 / channels_last / compile), the HEAR API on CUDA,
# `cola-ray embed --use-gpu`; one table at the end. Every step has its own time limit, so a hang
# costs that step only. Runs from a checkout with the image's torch / torchaudio / timm (no
# network, no install: PYTHONPATH is the checkout; steps whose packages are missing, e.g. Ray,
# say so). Without a GPU every step is skipped, and GPU_CHECK_DEVICE=cpu runs the log-mel,
# pre-training and HEAR steps on the CPU (what CI checks).
#     bash benchmarks/gpu_check.sh            # on the GPU machine, from the repo root
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=$(mktemp)
run() {  # run STEP LIMIT_S [args...]
  local step=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$PY" benchmarks/gpu_check.py "$step" "$@" > >(tee -a "$OUT") 2> "$OUT.$step.err"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "RESULT $step | FAIL | timed out after ${limit}s" | tee -a "$OUT"
  elif ! grep -q "^RESULT $step " "$OUT"; then echo "RESULT $step | FAIL | exit $rc: $(tail -c 300 "$OUT.$step.err" | tr '\n' ' ')" | tee -a "$OUT"; fi
  echo "  ($step: $((SECONDS - t0)) s)" >&2
}
run cuda 60
run nccl 120
run logmel 60
run pretrain 180 --steps "${PRETRAIN_STEPS:-300}"
run hear 60
run embed 120
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  t0=$SECONDS
  if timeout -k 10 150 "$PY" benchmarks/gpu_bench.py --quick > "$OUT.bench" 2>&1; then status=ok; else status=FAIL; fi
  echo "RESULT gpu_bench | $status | $((SECONDS - t0)) s, tables below" | tee -a "$OUT"
else
  echo "RESULT gpu_bench | skip | no CUDA GPU" | tee -a "$OUT"
fi
echo
echo "| step | status | figures |"
echo "|---|---|---|"
grep "^RESULT " "$OUT" | sed -e 's/^RESULT /| /' -e 's/$/ |/'
[ -f "$OUT.bench" ] && { echo; cat "$OUT.bench"; }
! grep -q "^RESULT .* | FAIL | " "$OUT"
