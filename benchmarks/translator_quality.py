"""Quality bar of issue #3, measured: does a translator trained for a few minutes on digits lift C's accuracy
under PGD (Linf eps 0.2) for the oblivious attacker, keep clean accuracy within 1 point, and what does the
adaptive (end-to-end) attacker make of it?

    python benchmarks/translator_quality.py                                  # ungated and gated U-Net, seeds 0,1,2
    python benchmarks/translator_quality.py --set train.epochs=10 --variants gated --seeds 0

Trains each variant with Ray Train (oodray.train) once per training seed (`train.seed`; variants interleaved per
seed), then on the whole digits test split prints: clean accuracy of C and C(T), PGD-20 accuracy for the oblivious
attacker (crafted on C, fed to C(T)) and for the adaptive one (end to end through T, gate and C), and the gate's flag
rates; each as the median with min-max over the seeds. One run, numbers side by side.
"""

from __future__ import annotations

import argparse
import time

import torch
from spread import Spread, load, load_line, run_main, settle  # puts the repository on sys.path for what follows

from oodray.attacks import pgd
from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.data import load_dataset, stack
from oodray.models.defended import load_defended
from oodray.models.translator import load_translator_checkpoint
from oodray.runtime import init_ray
from oodray.train import fit_translator, prepare_run

VARIANTS = {
    "ungated": [],
    "gated": ["translator.gate=true"],
}


@torch.no_grad()
def acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--storage", default="/tmp/oodray-quality")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (train.seed), each a repeat")
    args = p.parse_args()
    before = settle()
    init_ray()
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    for i, seed in enumerate(seeds):
        for name in names if i % 2 == 0 else names[::-1]:
            rows.append(measure(name, seed, args))
            print(f"  seed {seed} {name}: {rows[-1]}   (load {load():.2f})", flush=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    summary = [{"variant": name, **{c: Spread(g[c].dropna()).fmt("{:.4f}") if g[c].notna().any() else "-"
                                    for c in df.columns if c not in ("variant", "seed")}}
               for name, g in df.groupby("variant", sort=False)]
    print(f"\ndigits test split, Linf eps {resolve_config('digits').attack.eps}, training seeds {seeds}, median "
          f"(min-max); extra overrides: {args.overrides}")
    print(pd.DataFrame(summary).T.to_string(header=False))
    print(load_line(before))


def measure(name: str, seed: int, args: argparse.Namespace) -> dict:
    cfg = resolve_config("digits", overrides=[*VARIANTS[name], f"train.seed={seed}", *args.overrides])
    t0 = time.time()
    result = fit_translator(cfg, prepare_run(cfg), storage=args.storage, name=f"quality-{name}-{time.time_ns()}")
    train_s = time.time() - t0
    classifier, _ = get_classifier(cfg)
    defended = load_defended(load_translator_checkpoint(result.checkpoint.path), classifier)
    x, y = stack(load_dataset(cfg.data).test)
    g = torch.Generator().manual_seed(0)
    x_obl = pgd(classifier, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, generator=g)
    g = torch.Generator().manual_seed(0)
    x_ada = pgd(defended, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, generator=g)
    return {"variant": name, "seed": seed, "train s": float(round(train_s)), "clean C": acc(classifier, x, y),
            "clean C(T)": acc(defended, x, y), "PGD-20 undefended": acc(classifier, x_obl, y),
            "PGD-20 oblivious C(T)": acc(defended, x_obl, y), "PGD-20 adaptive C(T)": acc(defended, x_ada, y),
            "gate flags clean": defended.flag_rate(x), "gate flags oblivious": defended.flag_rate(x_obl)}

if __name__ == "__main__":
    run_main(main)
