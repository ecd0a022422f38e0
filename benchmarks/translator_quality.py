"""Quality bar of issue #3, measured: does a translator trained for a few minutes on digits lift C's accuracy
under PGD (Linf eps 0.2) for the oblivious attacker, keep clean accuracy within 1 point, and what does the
adaptive (end-to-end) attacker make of it?

    python benchmarks/translator_quality.py                                  # ungated and gated U-Net
    python benchmarks/translator_quality.py --set train.epochs=10 --variants gated

Trains each variant with Ray Train (oodray.train), then on the whole digits test split prints: clean accuracy
of C and C(T), PGD-20 accuracy for the oblivious attacker (crafted on C, fed to C(T)) and for the adaptive one
(end to end through T, gate and C), and the gate's flag rates. One run, numbers side by side.
"""

from __future__ import annotations

import argparse
import time

import torch

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
    args = p.parse_args()
    init_ray()
    rows = []
    for name in args.variants.split(","):
        cfg = resolve_config("digits", overrides=[*VARIANTS[name], *args.overrides])
        t0 = time.time()
        result = fit_translator(cfg, prepare_run(cfg), storage=args.storage, name=f"quality-{name}-{time.time():.0f}")
        train_s = time.time() - t0
        classifier, _ = get_classifier(cfg)
        defended = load_defended(load_translator_checkpoint(result.checkpoint.path), classifier)
        x, y = stack(load_dataset(cfg.data).test)
        g = torch.Generator().manual_seed(0)
        x_obl = pgd(classifier, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, generator=g)
        g = torch.Generator().manual_seed(0)
        x_ada = pgd(defended, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, generator=g)
        rows.append({
            "variant": name, "train s": round(train_s), "clean C": acc(classifier, x, y),
            "clean C(T)": acc(defended, x, y), "PGD-20 undefended": acc(classifier, x_obl, y),
            "PGD-20 oblivious C(T)": acc(defended, x_obl, y), "PGD-20 adaptive C(T)": acc(defended, x_ada, y),
            "gate flags clean": defended.flag_rate(x), "gate flags oblivious": defended.flag_rate(x_obl),
        })
    import pandas as pd

    print(f"digits test split ({len(y)} images), Linf eps {cfg.attack.eps}; extra overrides: {args.overrides}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
