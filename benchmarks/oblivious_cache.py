"""What the shared oblivious cache saves, measured side by side in one run: the same oblivious-regime trial
without the cache (its attacks on C crafted first, as a trial on its own would) and with it (a later trial that
finds the cache complete), and what that means for a search of N trials.

    python benchmarks/oblivious_cache.py [--dataset digits] [--trials 8] [--set key=value ...]

The cache lives in a fresh temporary directory (the fixed classifier is copied there from the user's cache, so
both sides use the same C and nothing in the user's cache is touched). Times are wall seconds of the driver-side
preparation (`prepare_run`: classifier load + cache build or load) and of the Ray Train fit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.runtime import init_ray
from oodray.train import fit_translator, prepare_run


def timed_trial(cfg, storage: str, name: str) -> tuple[float, float]:
    t0 = time.time()
    loop = prepare_run(cfg)
    prep = time.time() - t0
    fit_translator(cfg, loop, storage=storage, name=name)
    return prep, time.time() - t0 - prep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--trials", type=int, default=8, help="search size the saving is projected to")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    init_ray()
    base = resolve_config(args.dataset, overrides=["train.regime=oblivious", *args.overrides])
    _, cpath = get_classifier(base)  # trained into the user's cache if missing; outside the timing
    tmp = Path(tempfile.mkdtemp(prefix="oodray-cache-bench-"))
    shutil.copytree(cpath.parent, tmp / "classifiers" / cpath.parent.name)
    cfg = base.replace(cache_dir=str(tmp))
    storage = str(tmp / "runs")
    cold_prep, cold_fit = timed_trial(cfg, storage, "without-cache")
    warm_prep, warm_fit = timed_trial(cfg.replace(**{"train.lr": cfg.train.lr / 2}), storage, "with-cache")
    cold, warm, n = cold_prep + cold_fit, warm_prep + warm_fit, args.trials
    print(f"{args.dataset}: {cfg.attack.norm} eps {list(cfg.attack.eps_values())}, {'+'.join(cfg.attack.attacks)} "
          f"{cfg.attack.steps} steps on the training split; {cfg.train.epochs} epochs of a {cfg.translator.arch} "
          f"translator; {cfg.train.workers} Train worker(s)")
    print(f"trial without the cache: {cold:7.1f} s  (cache build + C load {cold_prep:.1f} s, fit {cold_fit:.1f} s)")
    print(f"trial with the cache:    {warm:7.1f} s  (cache load + C load {warm_prep:.1f} s, fit {warm_fit:.1f} s)")
    print(f"one trial: {cold / warm:.2f}x faster with the cache; a search of {n} trials: {n * cold:.0f} s without, "
          f"{cold + (n - 1) * warm:.0f} s with ({n * cold / (cold + (n - 1) * warm):.2f}x)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
