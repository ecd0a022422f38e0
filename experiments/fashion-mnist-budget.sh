#!/usr/bin/env bash
# Robust accuracy vs training compute on Fashion-MNIST (Linf 0.1): the best searched translator configuration, refit
# from scratch, against PGD-AT and TRADES, at matched training compute, each evaluated with AutoAttack standard on the
# same 1,000 test images (adaptive, oblivious, transfer, clean, natural shifts). Starts with the search of
# experiments/fashion-mnist.sh (SEARCH below; run or resumed here when it has no results yet). Every step is skipped
# when its output exists and resumes when it was interrupted, so the script can be stopped and run again:
#   bash experiments/fashion-mnist-budget.sh [OUT_DIR]         (default: runs/fashion-mnist-budget)
#   BUDGETS="2 4 8" SEARCH=runs/fashion-mnist-experiment/search DATASET=fashion-mnist EPS=0.1 N=1000
# Budget B = PGD-AT's B epochs of PGD-7 (8 passes per example); TRADES (7 inner steps: 9 passes per example) trains for
# the whole epochs nearest that compute; the translator is refit at exactly PGD-AT's compute (`oodray.refit --match`),
# counting its classifier's training and its oblivious cache too. A budget below what C and the cache alone cost
# (Fashion-MNIST: C's 8 plain epochs = PGD-AT's 1 epoch) gives the translator no point; that refusal (any refusal of
# the refit, exit 2) is logged with its error line in timings.log, not an error of the script.
set -euo pipefail
OUT=${1:-runs/fashion-mnist-budget}
PY=${PY:-python}
DATASET=${DATASET:-fashion-mnist}
EPS=${EPS:-0.1}
N=${N:-1000}
BUDGETS=${BUDGETS:-"2 4 8"}
SEARCH=${SEARCH:-runs/fashion-mnist-experiment/search}
RESULTS=${RESULTS:-experiments/results/$DATASET-budget}
if [ ! -f "$SEARCH/results.csv" ]; then  # the search of experiments/$DATASET.sh, its step 1 (same command: shared)
  [ -f "experiments/$DATASET.yaml" ] || { echo "error: no search at '$SEARCH' and no experiments/$DATASET.yaml to run one" >&2; exit 2; }
  resume=(); [ -d "$SEARCH" ] && resume=(--resume)
  $PY -m oodray.tune --config "experiments/$DATASET.yaml" --storage "$(dirname "$SEARCH")" --name "$(basename "$SEARCH")" "${resume[@]}"
fi
EVAL=(--dataset "$DATASET" --n-examples "$N")
mkdir -p "$OUT"
date +"%F %T start" >> "$OUT/timings.log"
step() {  # step NAME COMMAND...: runs, logs its wall time (resumed steps log again), returns its exit code
  local name=$1 t0=$SECONDS code=0; shift
  "$@" || code=$?
  echo "$(date +'%F %T') $name $((SECONDS - t0)) s$([ $code -eq 0 ] || echo " (exit $code)")" >> "$OUT/timings.log"
  return $code
}
[ -f "$OUT/undefended/summary.json" ] || step undefended $PY -m oodray.evaluate --translator identity "${EVAL[@]}" \
    --threat-models adaptive,transfer --out "$OUT/undefended" --label undefended
for B in $BUDGETS; do
  T=$(( (B * 8 + 4) / 9 )); [ "$T" -ge 1 ] || T=1
  AT=(--set classifier.adversarial=pgd --set classifier.adv_eps="$EPS" --set classifier.epochs="$B")
  TR=(--set classifier.adversarial=trades --set classifier.adv_eps="$EPS" --set classifier.epochs="$T")
  step "pgd-at-b$B train" $PY -m oodray.classifier --dataset "$DATASET" --adversarial pgd --eps "$EPS" --epochs "$B"
  [ -f "$OUT/pgd-at-b$B/summary.json" ] || step "pgd-at-b$B eval" $PY -m oodray.evaluate --translator identity \
      "${AT[@]}" "${EVAL[@]}" --threat-models adaptive,transfer --out "$OUT/pgd-at-b$B" --label "pgd-at-b$B"
  step "trades-b$B train" $PY -m oodray.classifier --dataset "$DATASET" --adversarial trades --eps "$EPS" --epochs "$T"
  [ -f "$OUT/trades-b$B/summary.json" ] || step "trades-b$B eval" $PY -m oodray.evaluate --translator identity \
      "${TR[@]}" "${EVAL[@]}" --threat-models adaptive,transfer --out "$OUT/trades-b$B" --label "trades-b$B"
  rc=0
  step "translator-b$B refit+eval" $PY -m oodray.refit "$SEARCH" --match "$OUT/pgd-at-b$B" --suffix="-b$B" \
      --n-examples "$N" 2> >(tee "$OUT/translator-b$B.stderr" >&2) || rc=$?
  wait $! 2>/dev/null || true  # the tee above has written everything
  if [ "$rc" -eq 2 ]; then  # refused before training: why (e.g. a budget below C's and the cache's) goes in the log
    echo "$(date +'%F %T') translator-b$B: refused: $(grep '^error:' "$OUT/translator-b$B.stderr" | tail -1)" >> "$OUT/timings.log"
  elif [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
date +"%F %T end" >> "$OUT/timings.log"
$PY experiments/budget_curves.py "$OUT" "$SEARCH" "$RESULTS" > "$RESULTS.md.new"
mv "$RESULTS.md.new" "$RESULTS.md"
{ echo; echo "Wall time of each step on this machine (\`$OUT/timings.log\`):"; echo; echo '```'; cat "$OUT/timings.log"; echo '```'; } >> "$RESULTS.md"
