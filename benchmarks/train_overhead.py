"""Ray Train's cost, measured side by side in one run on digits: the same translator training step in plain
PyTorch vs under a 1-worker TorchTrainer (throughput ratio), data-parallel scaling 1 -> 2 workers, and the fixed
start-up cost of a fit.

    python benchmarks/train_overhead.py [--epochs 3] [--set key=value ...]

Throughput counts only the training batches (`train_seconds` reported by the loop, epochs after the first),
so the proxy evaluation and checkpointing are excluded from both sides; fit overhead is wall time minus the
sum of reported epoch times.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from oodray.cache import ensure_oblivious_cache
from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.data import load_dataset
from oodray.losses import TranslatorObjective
from oodray.models.translator import build_translator
from oodray.runtime import init_ray
from oodray.train import PairedImages, fit_translator, prepare_run, train_step


def plain(cfg, epochs: int) -> float:
    """Images per second of the plain PyTorch loop (epochs after the first), on as many threads as one Train worker
    gets (Ray sets OMP_NUM_THREADS to the worker's CPUs), so both sides compute with the same cores."""
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    splits = load_dataset(cfg.data)
    classifier, cpath = get_classifier(cfg, splits)
    torch.manual_seed(cfg.train.seed)
    t = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    opt = torch.optim.Adam(t.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    objective = TranslatorObjective(cfg.loss, classifier)
    loader = DataLoader(PairedImages(splits.train, ensure_oblivious_cache(cfg, cpath)), batch_size=cfg.train.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        t0, n = time.time(), 0
        for x, xc, y in loader:
            train_step(cfg, t, classifier, None, objective, (opt, None), None, (x, xc, y), g, False)
            n += len(y)
        rates.append(n / (time.time() - t0))
    return sum(rates[1:]) / max(1, len(rates) - 1)


def under_ray(cfg, storage: str, name: str) -> tuple[float, float]:
    t0 = time.time()
    result = fit_translator(cfg, prepare_run(cfg), storage=storage, name=name)
    wall = time.time() - t0
    df = result.metrics_dataframe
    later = df[df["epoch"] > 1]
    rate = float((later["train_examples"] / later["train_seconds"]).mean())
    return rate, wall - float(df["epoch_seconds"].sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    init_ray()
    base = resolve_config("digits", overrides=[f"train.epochs={args.epochs}", *args.overrides])
    storage = tempfile.mkdtemp(prefix="oodray-bench-")
    plain_rate = plain(base, args.epochs)
    one, overhead1 = under_ray(base.replace(**{"train.workers": 1, "train.cpus_per_worker": 1.0}), storage, "w1")
    two, overhead2 = under_ray(base.replace(**{"train.workers": 2, "train.cpus_per_worker": 1.0}), storage, "w2")
    print(f"digits, {base.translator.arch} translator, batch {base.train.batch_size}/worker, {args.epochs} epochs, "
          f"{base.train.cpus_per_worker:g} CPU (torch threads) per worker and for plain PyTorch")
    print(f"plain PyTorch            {plain_rate:8.0f} img/s")
    print(f"TorchTrainer, 1 worker   {one:8.0f} img/s   ratio to plain {one / plain_rate:.2f}   "
          f"fit overhead {overhead1:.1f} s")
    print(f"TorchTrainer, 2 workers  {two:8.0f} img/s   scaling 1->2 {two / one:.2f}x   fit overhead {overhead2:.1f} s")


if __name__ == "__main__":
    main()
