#!/usr/bin/env bash
# The LM comparison: every mixer at one matched size, the same data, tokenizer and token budget,
# then validation bits per byte, the bundled lm-eval tasks and the loss curves on one plot, and
# OUT/summary.{md,csv,json}: mean ± spread over seeds per mixer (mixerzoo.evals.lm_summary).
#   usage: scripts/lm_compare.sh DATA TOKENIZER OUT [STEPS] [SIZE] [SEEDS]
#   e.g.   scripts/lm_compare.sh corpus/ tok/ results/lm_compare 2000 125m 2
# MIXERS (default: every registered mixer) picks the mixers; TRAIN_ARGS adds `mixerzoo train`
# options to every new run (e.g. TRAIN_ARGS="--keep-checkpoints 1"; a resumed run keeps its saved
# options), EVAL_ARGS `mixerzoo eval` options (e.g. EVAL_ARGS="--limit 50" for a quick look:
# lm-eval results once written are kept, so delete OUT/eval_* before the full evaluation);
# SUMMARY=0 skips the closing plot and table (for several copies writing into one OUT); EVAL=0
# skips lm-eval.
# Finished runs are kept: a rerun skips runs whose metrics reached STEPS, resumes the others from
# their last checkpoint (the same batches), evaluates those without lm-eval results, and goes on
# past a failed run (listed at the end, exit status 1).
set -euo pipefail
DATA=$1; TOK=$2; OUT=$3; STEPS=${4:-2000}; SIZE=${5:-125m}; SEEDS=${6:-1}
MIXERS=${MIXERS:-$(python3 -c "import mixerzoo; print(' '.join(mixerzoo.list_mixers()))")}
COMMON=(--data "$DATA" --tokenizer "$TOK" --size "$SIZE" --seq-len 2048 --batch-size 16 --steps "$STEPS"
        --warmup-steps $((STEPS / 20 + 1)) --lr 1e-3 --val-fraction 0.02 --val-batches 4
        --val-every $((STEPS / 10 + 1)) --save-every $((STEPS / 4 + 1)) --data-cache "$OUT/cache" --no-progress)
read -r -a EXTRA <<< "${TRAIN_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
mkdir -p "$OUT"
runs=(); failed=()
for seed in $(seq 0 $((SEEDS - 1))); do
  for m in $MIXERS; do
    run="$OUT/${m}_s$seed"
    # done: its metrics reached STEPS and its final checkpoint exists, or only its metrics were
    # kept (no checkpoints folder); resume: a checkpoint short of that; new: nothing usable yet
    state=$(python3 - "$run" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
run, steps = Path(sys.argv[1]), int(sys.argv[2])
try:
    from mixerzoo.train.checkpoint import latest_checkpoint
    steps_logged = [0]
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                steps_logged.append(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill
    ckpts = run / "checkpoints"
    final = not ckpts.is_dir() or (ckpts / f"step_{steps:08d}").is_dir()
    if max(steps_logged) >= steps and final:
        print("done")
    elif run.is_dir() and latest_checkpoint(run) is not None:
        print("resume")
    else:
        print("new")
except Exception as e:
    print(f"error: {type(e).__name__}: {e}")
PY
) || state="error: the state check could not run: $state"
    case $state in
      error*) echo "== $m seed $seed: $state"; false ;;
      done) echo "== $m seed $seed: finished earlier" ;;
      resume) echo "== $m seed $seed: resuming"; python3 -m mixerzoo.cli train --resume "$run" ;;
      *) echo "== $m seed $seed"; python3 -m mixerzoo.cli train --mixer "$m" --seed "$seed" "${COMMON[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --out "$run" ;;
    esac || { echo "== $m seed $seed: training failed (see above); going on"; failed+=("$m/s$seed"); continue; }
    if [ "${EVAL:-1}" != 0 ] && [ -z "$(find "$OUT/eval_${m}_s$seed" -name 'results_*.json' -print -quit 2>/dev/null)" ]; then
      python3 -m mixerzoo.cli eval --model "$run" --tasks mixerzoo_offline --batch_size 8 \
        --output_path "$OUT/eval_${m}_s$seed" ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"} || echo "lm-eval exited non-zero for $m (see above)"
    fi
    runs+=("$m/s$seed=$run")
  done
done
if [ ${#runs[@]} -gt 0 ] && [ "${SUMMARY:-1}" != 0 ]; then
  python3 -m mixerzoo.cli compare "${runs[@]}" --out "$OUT/compare" --title "LM comparison, $SIZE, $STEPS steps"
  python3 -m mixerzoo.evals.lm_summary "$OUT"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed runs: ${failed[*]}"; exit 1; fi
