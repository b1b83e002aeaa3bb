#!/usr/bin/env bash
# Model-level speed and memory on one GPU: the GPU tests of the fused ops, then
# `mixerzoo bench models` at 350m with the fused ops ("after") and without them ("before"),
# and a profile of loglinear_adaptive at 16K for each.
#   usage: scripts/gpu_bench_models.sh OUT [STAGES] [PRECISION]
#   STAGES: any of tests,after,profile,before (default all four); PRECISION: bf16-true (default) or bf16
# fla (anchors) and mamba-ssm (the mamba2 SSD) are optional; without them those rows are skipped.
set -u
OUT=$1; STAGES=${2:-tests,after,profile,before}; PREC=${3:-bf16-true}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
mkdir -p "$OUT"
BENCH=(-m mixerzoo.cli bench models --size 350m --seq-lens 2048,8192,16384 --precision "$PREC" --steps 6 --warmup 2)
has() { [[ ",$STAGES," == *",$1,"* ]]; }
if has tests; then
  echo "== GPU tests of the fused ops and the kernel"
  timeout 150 "$py" -m pytest -q -m gpu -p no:warnings tests/test_fused_model.py \
    "tests/test_ops_triton.py::test_triton_gpu_matches_torch" -k "bf16 or fused" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
fi
if has after; then
  echo "== after: fused ops, every mixer and the fla anchors"
  timeout 280 "$py" "${BENCH[@]}" --mixers all --out "$OUT/after" 2>&1 | grep -v "^\[\|Warning\|warn" | tail -30
fi
if has profile; then
  echo "== profile: loglinear_adaptive at 16K, fused"
  timeout 60 "$py" "${BENCH[@]}" --mixers loglinear_adaptive --seq-lens 16384 --anchors none --steps 2 --profile \
    --out "$OUT/profile_after" 2>&1 | tail -32
fi
if has before; then
  echo "== before: the plain torch ops (--no-fused)"
  timeout 300 "$py" "${BENCH[@]}" --mixers all --anchors none --no-fused --out "$OUT/before" 2>&1 | tail -12
  timeout 60 "$py" "${BENCH[@]}" --mixers loglinear_adaptive --seq-lens 16384 --anchors none --steps 2 --profile \
    --no-fused --out "$OUT/profile_before" 2>&1 | tail -32
fi
