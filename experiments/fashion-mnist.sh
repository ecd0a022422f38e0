#!/usr/bin/env bash
# Every row of experiments/results/fashion-mnist.md, reproduced on one CPU machine. On 2 cores the search and its
# final AutoAttack took 84 min; the baselines come on top (PGD-AT's many robust points make AutoAttack slow):
#   bash experiments/fashion-mnist.sh [OUT_DIR]          (default: runs/fashion-mnist-experiment)
# Each step is skipped or resumed when its output exists, so an interrupted run continues where it stopped.
set -euo pipefail
OUT=${1:-runs/fashion-mnist-experiment}
PY=${PY:-python}
EVAL=(--dataset fashion-mnist --n-examples 1000)
mkdir -p "$OUT"
# 1. The translator search + final AutoAttack of the best trial and the undefended classifier.
if [ -f "$OUT/search/results.csv" ]; then :
elif [ -d "$OUT/search" ]; then $PY -m oodray.tune --config experiments/fashion-mnist.yaml --storage "$OUT" --name search --resume
else $PY -m oodray.tune --config experiments/fashion-mnist.yaml --storage "$OUT" --name search; fi
# 2. Baseline: bit-depth reduction (3 bits), non-differentiable, attacked with BPDA (identity backward).
$PY -m oodray.evaluate --translator bitdepth --set translator.depth=3 "${EVAL[@]}" \
    --threat-models oblivious,adaptive,transfer --out "$OUT/eval/bitdepth" --label bitdepth
# 3. Baseline: PGD adversarial training of the classifier (Madry et al.), eps 0.1, 7 steps, 3 epochs. With no
#    translator the oblivious attacker is the adaptive one, so it is computed once (summarize.py says so).
$PY -m oodray.classifier --dataset fashion-mnist --adversarial pgd --eps 0.1 --epochs 3
$PY -m oodray.evaluate --translator identity --set classifier.adversarial=pgd --set classifier.adv_eps=0.1 \
    --set classifier.epochs=3 "${EVAL[@]}" --threat-models adaptive,transfer --out "$OUT/eval/pgd-at" --label pgd-at
# 4. Baseline: a MagNet-style denoising auto-encoder trained on natural corruptions only (no attacks, no C).
$PY -m oodray.train --dataset fashion-mnist --name dae --storage "$OUT" --set translator.arch=dae \
    --set loss.consistency=0 --set loss.identity=0 --set loss.clean_consistency=0 --set loss.pixel=1 \
    --set attack.shift_fraction=1.0 --epochs 4
$PY -m oodray.evaluate --checkpoint "$(ls -d "$OUT"/dae/checkpoint_2*/ | tail -1)" "${EVAL[@]}" \
    --threat-models oblivious,adaptive,transfer --out "$OUT/eval/dae" --label dae
$PY experiments/summarize.py "$OUT" > experiments/results/fashion-mnist.md.new
mv experiments/results/fashion-mnist.md.new experiments/results/fashion-mnist.md
cp "$OUT/search/pareto.png" experiments/results/fashion-mnist-pareto.png
