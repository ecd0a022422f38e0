"""What `train.channels_last` buys on this machine, measured side by side in one run: the same work with the conv
nets in NCHW and in channels_last memory format, interleaved and repeated, on one thread (what a 1-CPU trial or task
gets):
- a translator training step (oodray's `train_step`: objective, backward, Adam) in the oblivious regime;
- PGD on C alone (what the oblivious cache's tasks run) and end to end on C(T(.)) (the proxy metric and the adaptive
  evaluation's kind of work).

    python benchmarks/layout.py [--dataset fashion-mnist] [--repeats 5] [--batch 128] [--steps 4] [--threads 1]
    python benchmarks/layout.py --dataset imagenet --size 224 --batch 4 --steps 1 --repeats 3   # no data needed
    python benchmarks/layout.py --dataset cifar10 --size 32 --batch 32                            # no data needed

Models are the dataset preset's C and translator with fixed random weights (speed does not depend on the weights);
inputs are random images of the dataset's shape. With --size (cifar10, imagenet) no data is read: the images are
3 x SIZE x SIZE (imagenet: ResNet-50 as C; cifar10: its ResNet-18). It also prints the share of pixels where the two
layouts' PGD results differ, to show that only rounding differs.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from spread import Spread, interleaved, load_line, positive_int, run_main, settle  # puts the repository on sys.path

from oodray.attacks import pgd
from oodray.config import resolve_config
from oodray.data import DatasetInfo, load_dataset
from oodray.losses import TranslatorObjective
from oodray.models.classifier import build_classifier, freeze
from oodray.models.defended import DefendedModel
from oodray.models.translator import build_translator
from oodray.runtime import fast_layout
from oodray.train import train_step

SYNTHETIC = {"cifar10": (10, 3), "imagenet": (1000, 3)}  # classes, channels of the presets timed on random images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="train steps (or PGD runs) per timed repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=None,
                   help="random RGB images of this size, no data read (cifar10, imagenet; imagenet needs it)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    before = settle()
    torch.set_num_threads(args.threads)
    cfg = resolve_config(args.dataset, overrides=["train.regime=oblivious", *args.overrides])
    if args.size is not None or args.dataset == "imagenet":  # the preset's models on random images: no data read
        if args.dataset not in SYNTHETIC:
            p.error(f"--size works with {', '.join(SYNTHETIC)}, not '{args.dataset}' (which is read from its data)")
        info = DatasetInfo(args.dataset, *SYNTHETIC[args.dataset], (args.size or 224,) * 2,
                           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # normalisation: no bearing on speed
    else:
        info = load_dataset(cfg.data).info
    torch.manual_seed(0)
    c0 = freeze(build_classifier(cfg.classifier.arch, info)).eval()
    t0 = build_translator(cfg.translator, info.channels, info.image_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, info.channels, *info.image_size, generator=g)
    x_ood = (x + cfg.attack.eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    y = torch.randint(0, info.num_classes, (args.batch,), generator=g)

    def models(layout: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        return fast_layout(copy.deepcopy(c0), layout), fast_layout(copy.deepcopy(t0), layout)

    def train_side(layout: bool) -> Callable[[], float]:
        c, t = models(layout)
        opt = torch.optim.Adam(t.parameters(), lr=1e-3)
        obj = TranslatorObjective(cfg.loss, c)
        gen = torch.Generator().manual_seed(1)

        def run() -> float:
            s = time.perf_counter()
            for _ in range(args.steps):
                train_step(cfg, t, c, None, obj, (opt, None), None, (x, x_ood, y), gen, False)
            return (time.perf_counter() - s) / args.steps
        return run

    def attack(layout: bool, end_to_end: bool) -> Callable[[], torch.Tensor]:  # the same attack from the same start
        c, t = models(layout)
        model = DefendedModel(c, t.eval(), None) if end_to_end else c
        return lambda: pgd(model, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=cfg.attack.steps,
                           generator=torch.Generator().manual_seed(2))

    def pgd_side(layout: bool, end_to_end: bool) -> Callable[[], float]:
        run_attack = attack(layout, end_to_end)

        def run() -> float:
            s = time.perf_counter()
            for _ in range(args.steps):
                run_attack()
            return (time.perf_counter() - s) / args.steps
        return run

    diffs = {name: ((attack(False, e2e)() - attack(True, e2e)()).abs() > 1e-4).float().mean().item()
             for name, e2e in (("C", False), ("C(T)", True))}
    print(f"{args.dataset}: C {cfg.classifier.arch}, translator {cfg.translator.arch} (width {cfg.translator.width}), "
          f"batch {args.batch}, {args.threads} thread(s), PGD-{cfg.attack.steps} {cfg.attack.norm} "
          f"eps {cfg.attack.eps:g}; median (min-max) of {args.repeats} interleaved repeats")
    for label, make in (("translator train step", train_side),
                        (f"PGD-{cfg.attack.steps} on C", lambda lay: pgd_side(lay, False)),
                        (f"PGD-{cfg.attack.steps} on C(T)", lambda lay: pgd_side(lay, True))):
        runs = interleaved({"nchw": make(False), "channels_last": make(True)}, args.repeats)
        nchw, cl = Spread(runs["nchw"]), Spread(runs["channels_last"])
        ms = {k: Spread(v * 1e3 for v in s.values).fmt("{:.1f}", " ms") for k, s in (("nchw", nchw), ("cl", cl))}
        print(f"{label}: NCHW {ms['nchw']}, channels_last {ms['cl']}: {nchw.ratio(cl).fmt('{:.2f}', 'x')} faster")
    print("share of pixels whose PGD result differs by more than 1e-4 between layouts (rounding, amplified by the "
          "sign step): " + ", ".join(f"{k} {v:.4f}" for k, v in diffs.items()))
    print(load_line(before))


if __name__ == "__main__":
    run_main(main)
