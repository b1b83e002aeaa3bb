#!/usr/bin/env bash
# The LM comparison: every mixer at one matched size, the same data, tokenizer and token budget,
# then validation bits per byte, the bundled lm-eval tasks and the loss curves on one plot, and
# OUT/summary.{md,csv,json}: mean ± spread over seeds per mixer (mixerzoo.evals.lm_summary).
#   usage: scripts/lm_compare.sh DATA TOKENIZER OUT [STEPS] [SIZE] [SEEDS]
#   e.g.   scripts/lm_compare.sh corpus/ tok/ results/lm_compare 2000 125m 2
# MIXERS (default: every registered mixer) picks the mixers; TRAIN_ARGS adds `mixerzoo train`
# options to every run (e.g. TRAIN_ARGS="--keep-checkpoints 1").
# Finished runs are kept: a rerun resumes each run from its last checkpoint (the same batches).
set -euo pipefail
DATA=$1; TOK=$2; OUT=$3; STEPS=${4:-2000}; SIZE=${5:-125m}; SEEDS=${6:-1}
MIXERS=${MIXERS:-$(python3 -c "import mixerzoo; print(' '.join(mixerzoo.list_mixers()))")}
COMMON=(--data "$DATA" --tokenizer "$TOK" --size "$SIZE" --seq-len 2048 --batch-size 16 --steps "$STEPS"
        --warmup-steps $((STEPS / 20 + 1)) --lr 1e-3 --val-fraction 0.02 --val-batches 4
        --val-every $((STEPS / 10 + 1)) --save-every $((STEPS / 4 + 1)) --data-cache "$OUT/cache" --no-progress)
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
mkdir -p "$OUT"
runs=()
for seed in $(seq 0 $((SEEDS - 1))); do
  for m in $MIXERS; do
    run="$OUT/${m}_s$seed"
    state=$(python3 - "$run" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
from mixerzoo.train.checkpoint import latest_checkpoint
run, steps = Path(sys.argv[1]), int(sys.argv[2])
if not run.is_dir() or latest_checkpoint(run) is None:
    print("new")
else:
    done = max(json.loads(l)["step"] for l in open(run / "metrics.jsonl") if l.strip())
    print("done" if done >= steps else "resume")
PY
)
    case $state in
      done) echo "== $m seed $seed: finished earlier"; runs+=("$m/s$seed=$run"); continue ;;
      resume) echo "== $m seed $seed: resuming"; python3 -m mixerzoo.cli train --resume "$run" ;;
      *) echo "== $m seed $seed"; python3 -m mixerzoo.cli train --mixer "$m" --seed "$seed" "${COMMON[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --out "$run" ;;
    esac
    python3 -m mixerzoo.cli eval --model "$run" --tasks mixerzoo_offline --batch_size 8 \
      --output_path "$OUT/eval_${m}_s$seed" || echo "lm-eval exited non-zero for $m (see above)"
    runs+=("$m/s$seed=$run")
  done
done
python3 -m mixerzoo.cli compare "${runs[@]}" --out "$OUT/compare" --title "LM comparison, $SIZE, $STEPS steps"
python3 -m mixerzoo.evals.lm_summary "$OUT"
