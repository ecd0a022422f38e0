#!/usr/bin/env bash
# Every row of experiments/results/digits.md, reproduced on one CPU machine (~10-15 min on 2 cores):
#   bash experiments/digits.sh [OUT_DIR]          (default: runs/digits-experiment)
set -euo pipefail
OUT=${1:-runs/digits-experiment}
PY=${PY:-python}
EVAL=(--dataset digits --n-examples 200 --threat-models oblivious,adaptive,transfer)
mkdir -p "$OUT"
# 1. The translator search + final AutoAttack of the best trial and the undefended classifier.
[ -f "$OUT/search/results.csv" ] || $PY -m oodray.tune --config experiments/digits.yaml --storage "$OUT" --name search
# 2. Baseline: bit-depth reduction (3 bits), non-differentiable, attacked with BPDA (identity backward).
$PY -m oodray.evaluate --translator bitdepth --set translator.depth=3 "${EVAL[@]}" --out "$OUT/eval/bitdepth" --label bitdepth
# 3. Baseline: PGD adversarial training of the classifier (Madry et al.), eps 0.2, 7 steps.
$PY -m oodray.classifier --dataset digits --adversarial pgd --eps 0.2
$PY -m oodray.evaluate --translator identity --set classifier.adversarial=pgd --set classifier.adv_eps=0.2 \
    "${EVAL[@]}" --out "$OUT/eval/pgd-at" --label pgd-at
# 4. Baseline: TRADES (Zhang et al., beta 6): clean CE + beta * KL(f(x) || f(x_adv)), same eps and steps.
$PY -m oodray.classifier --dataset digits --adversarial trades --eps 0.2
$PY -m oodray.evaluate --translator identity --set classifier.adversarial=trades --set classifier.adv_eps=0.2 \
    "${EVAL[@]}" --out "$OUT/eval/trades" --label trades
# 5. Baseline: a MagNet-style denoising auto-encoder trained on natural corruptions only (no attacks).
$PY -m oodray.train --dataset digits --name dae --storage "$OUT" --set translator.arch=dae \
    --set loss.consistency=0 --set loss.identity=0 --set loss.clean_consistency=0 --set loss.pixel=1 --set attack.shift_fraction=1.0 --epochs 6
$PY -m oodray.evaluate --checkpoint "$(ls -d "$OUT"/dae/checkpoint_2*/ | tail -1)" "${EVAL[@]}" \
    --out "$OUT/eval/dae" --label dae
$PY experiments/summarize.py "$OUT" > experiments/results/digits.md.new
mv experiments/results/digits.md.new experiments/results/digits.md
cp "$OUT/search/pareto.png" experiments/results/digits-pareto.png
