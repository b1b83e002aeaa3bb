#!/usr/bin/env bash
# The LM comparison at each mixer's best learning rate: every mixer at one matched size trained
# with seed 0 at each rate of LRS (default "3e-4 1e-3 3e-3"), then seeds 1..SEEDS-1 at the rate
# that gave it the lowest final validation loss; one plot of those runs and OUT/sweep.{md,csv,json}
# (mixerzoo.evals.lm_summary --sweep): the sweep table and mean ± spread at the best rates.
#   usage: scripts/lm_sweep.sh DATA TOKENIZER OUT [STEPS] [SIZE] [SEEDS]
#   e.g.   scripts/lm_sweep.sh corpus/ tok/ results/lm_sweep 400 125m 3
# Each rate is one scripts/lm_compare.sh folder, OUT/lr<rate>/, sharing one token cache; MIXERS,
# TRAIN_ARGS, EVAL_ARGS and EVAL (0: no lm-eval) pass through to it. Only the rates of LRS and the
# mixers of MIXERS are read back: a rate dropped from LRS stays on disk but out of the choice. A
# run whose loss diverged counts as the worst at its rate. Resumable like it: rerun with the same OUT and
# finished runs are kept, the others resumed, so the sweep can be spread over several sittings
# (copy OUT's run folders back in between). Exit status 1 when a run failed or a mixer's sweep
# is not complete (its seeds at the best rate then wait for a rerun).
set -uo pipefail
DATA=$1; TOK=$2; OUT=$3; STEPS=${4:-400}; SIZE=${5:-125m}; SEEDS=${6:-3}
LRS=${LRS:-"3e-4 1e-3 3e-3"}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
status=0
lane() {  # rate, seeds, [mixers]
  local lr=$1 seeds=$2
  MIXERS=${3:-${MIXERS:-}} SUMMARY=0 TRAIN_ARGS="--lr $lr --data-cache $OUT/cache ${TRAIN_ARGS:-}" \
    bash "$here/lm_compare.sh" "$DATA" "$TOK" "$OUT/lr$lr" "$STEPS" "$SIZE" "$seeds"
}
[ -n "${MIXERS:-}" ] || export MIXERS=$(python3 -c "import mixerzoo; print(' '.join(mixerzoo.list_mixers()))")
for lr in $LRS; do
  echo "=== learning rate $lr, seed 0"
  lane "$lr" 1 || status=1
done
best=$(python3 -m mixerzoo.evals.lm_summary "$OUT" --best-lrs --lrs "$LRS" --mixers "$MIXERS") \
  || { echo "could not read the sweep"; exit 1; }
ready=0
while read -r m lr; do
  [ -n "$m" ] || continue
  ready=$((ready + 1))
  echo "=== $m: best learning rate $lr, seeds 0..$((SEEDS - 1))"
  lane "$lr" "$SEEDS" "$m" < /dev/null || status=1
done <<< "$best"
[ "$ready" -eq "$(wc -w <<< "$MIXERS")" ] || status=1
runs=()
while read -r m lr; do
  for s in $(seq 0 $((SEEDS - 1))); do
    d="$OUT/lr$lr/${m}_s$s"
    [ -f "$d/metrics.jsonl" ] && runs+=("$m/s$s=$d")
  done
done <<< "$best"
if [ ${#runs[@]} -gt 0 ]; then
  python3 -m mixerzoo.cli compare "${runs[@]}" --out "$OUT/compare" --title "LM comparison at each mixer's best lr, $SIZE, $STEPS steps" || status=1
  python3 -m mixerzoo.evals.lm_summary "$OUT" --sweep --lrs "$LRS" --mixers "$MIXERS" || status=1
fi
exit $status
