#!/usr/bin/env bash
# Everything a kernel or mixer change must pass on a GPU, in one go: the GPU tests, the kernel
# benchmark against the anchors, a short MQAR run of every mixer through its GPU path, and the
# Triton-vs-torch training parity of loglinear_adaptive. About 20 minutes on an H200, most of
# it compiling kernels for the tests and autotuning the anchors.
#   scripts/gpu_checks.sh [OUT_DIR]        (default results/gpu)
# fla and mamba-ssm are optional: without them their anchors and GPU paths are skipped.
set -u
out=${1:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}

echo "== GPU tests"
timeout 900 "$py" -m pytest -q -m gpu -p no:warnings tests/ 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
echo "== kernel benchmark"
timeout 600 "$py" -m mixerzoo.cli bench kernels --out "$out/bench" 2>&1 | grep -v "^T=" | tail -22
echo "== MQAR, every mixer, GPU paths"
timeout 400 "$py" -m mixerzoo.cli synth mqar --preset demo --device cuda --out "$out/mqar" 2>&1 | grep -v "^synth" | tail -14
echo "== backend parity, loglinear_adaptive 125m"
timeout 300 "$py" scripts/backend_parity.py --steps 300 --batch 8 --out "$out/parity" 2>&1 | tail -12
