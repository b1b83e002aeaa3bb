#!/usr/bin/env bash
# Language modelling end to end on one GPU: train 125m models on English text, evaluate each
# with the bundled lm-eval tasks, and check that FSDP2 in one process gives the loss of the
# plain single-process run.
#   usage: scripts/gpu_lm.sh DATA TOKENIZER OUT [STEPS] [MIXERS] [PARITY_STEPS]
set -euo pipefail
DATA=$1; TOK=$2; OUT=$3; STEPS=${4:-300}; MIXERS=${5:-"loglinear_adaptive softmax"}; PARITY=${6:-30}
export PYTHONUNBUFFERED=1
COMMON=(--data "$DATA" --tokenizer "$TOK" --size 125m --seq-len 2048 --batch-size 16
        --val-fraction 0.02 --val-batches 1 --log-every 10 --data-cache "$OUT/cache" --no-progress)
mkdir -p "$OUT"
for m in $MIXERS; do
  echo "== train $m, $STEPS steps"
  python3 -m mixerzoo.cli train --mixer "$m" "${COMMON[@]}" --steps "$STEPS" --warmup-steps 30 \
    --lr 1e-3 --val-every 50 --save-every "$STEPS" --out "$OUT/$m"
  echo "== eval $m"
  python3 -m mixerzoo.cli eval --model "$OUT/$m" --tasks mixerzoo_offline --batch_size 8 \
    --output_path "$OUT/eval_$m" || echo "lm-eval exited non-zero (see above)"
done
if [ "$PARITY" -gt 0 ]; then
  for mode in plain fsdp; do
    flag=(); [ "$mode" = fsdp ] && flag=(--fsdp)
    echo "== parity: loglinear_adaptive $mode, $PARITY steps"
    python3 -m mixerzoo.cli train --mixer loglinear_adaptive "${COMMON[@]}" --steps "$PARITY" --warmup-steps 10 \
      --lr 1e-3 --log-every 1 --val-every "$PARITY" --save-every "$PARITY" "${flag[@]}" --out "$OUT/parity_$mode"
  done
  python3 - "$OUT" <<'PY'
import json, sys
def losses(p):
    return [r["loss"] for r in map(json.loads, open(f"{p}/metrics.jsonl")) if "loss" in r]
a, b = losses(f"{sys.argv[1]}/parity_plain"), losses(f"{sys.argv[1]}/parity_fsdp")
rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"FSDP2 (world 1) vs plain: {len(a)} steps, max relative loss difference {rel:.2e}")
print("plain:", " ".join(f"{x:.4f}" for x in a))
print("fsdp: ", " ".join(f"{x:.4f}" for x in b))
PY
fi
