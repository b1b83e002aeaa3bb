#!/usr/bin/env bash
# The whole comparison on one GPU at once: the four synthetic presets at the reduced budget of
# RESULTS.md (12 small runs sharing the GPU) and the LM comparison in two lanes (125m, 200
# steps, 2 seeds). Resumable: rerun with the same OUT and finished runs are kept (synthetic
# runs by the hash of their settings, LM runs by their metrics), so it can be continued across
# machines by copying OUT's results.json / metrics.jsonl / eval_* files back.
#   usage: scripts/compare_gpu.sh DATA TOKENIZER OUT
# Logs: OUT/<part>.log; results: OUT/<preset>/ (results.json, CSVs, plots), OUT/lm/summary.md.
# Exit status 1 when any part failed (the others still run to the end).
set -uo pipefail
DATA=$1; TOK=$2; OUT=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
# mamba-ssm's kernels autotune every shape in every process (up to 210 s in a worker's first step
# on a shared GPU); Triton's on-disk autotune cache lets later workers reuse the choice
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
part() {  # name, command...: run one part into its log, report its exit status
  local name=$1; shift
  echo "$name: started $(date -u +%FT%TZ)"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc at $(date -u +%FT%TZ)"
  return $rc
}
pids=()
synth() { local name=$1; shift; part "$name" python3 -m mixerzoo.cli synth "$@" --device cuda --out "$OUT/$name"; }
synth mqar-width --preset mqar-width --set steps=3000 vocab_size=256 "lr=[2.1544e-3]" --time-limit 240 --workers 3 & pids+=($!)
synth mqar --preset mqar --set "d_model=[64, 128]" seeds=2 steps=1000 vocab_size=256 "lr=[2.1544e-3]" --time-limit 240 --workers 5 & pids+=($!)
synth selective-copy --preset selective-copy --set "seq_len=[256, 1024]" "lr=[3.0e-3]" steps=2000 --time-limit 240 --workers 2 & pids+=($!)
synth length-generalisation --preset length-generalisation --set steps=3000 vocab_size=256 "lr=[3.0e-3]" --time-limit 240 --workers 2 & pids+=($!)
lm() { MIXERS="$1" SUMMARY=0 TRAIN_ARGS="--keep-checkpoints 1" bash "$here/lm_compare.sh" "$DATA" "$TOK" "$OUT/lm" 200 125m 2; }
part lm_a lm "loglinear_adaptive loglinear softmax" & pids+=($!)
# linear after the others' second seeds (seed-major order would train its seed 0 first)
lane_b() { local rc=0; lm "mamba2 loglinear_fixed" || rc=1; lm linear || rc=1; return $rc; }
part lm_b lane_b & pids+=($!)
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
# one plot and one table over both lanes' runs
runs=()
for d in "$OUT"/lm/*_s*/; do
  [ -f "$d/metrics.jsonl" ] && runs+=("$(basename "$d")=$d")
done
if [ ${#runs[@]} -gt 0 ]; then
  python3 -m mixerzoo.cli compare "${runs[@]}" --out "$OUT/lm/compare" --title "LM comparison, 125m, 200 steps"
  python3 -m mixerzoo.evals.lm_summary "$OUT/lm"
fi
if [ $failed != 0 ]; then echo "some parts failed: see the 'exit' lines above and OUT/<part>.log"; exit 1; fi
