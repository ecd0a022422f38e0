"""What the shared oblivious cache saves, measured side by side in one run: the same oblivious-regime trial without
the cache (its attacks on C crafted first, as a trial on its own would) and with it (a later trial that finds the
cache complete), repeated and interleaved, and what that means for a search of N trials; plus where a cached trial's
time still goes.

    python benchmarks/oblivious_cache.py [--dataset digits] [--trials 8] [--repeats 3] [--set key=value ...]

Every run uses a fresh temporary cache directory (the fixed classifier is copied there from the user's cache, so
both sides use the same C and nothing in the user's cache is touched): the side without the cache starts from an
empty one each time, the side with it reads one built before the timing. Times are wall seconds of the driver-side
preparation (`prepare_run`: classifier load + cache build or load) and of the Ray Train fit; figures are medians with
min-max over the repeats, and the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from spread import (  # puts the repository on sys.path
    Spread,
    fit_split,
    interleaved,
    load_line,
    positive_int,
    run_main,
    settle,
)

from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.runtime import init_ray
from oodray.train import fit_translator, prepare_run


def timed_trial(cfg, storage: str) -> dict[str, float]:
    t0 = time.time()
    loop = prepare_run(cfg)
    t1 = time.time()
    result = fit_translator(cfg, loop, storage=storage, name=f"trial-{time.time_ns()}")
    t2 = time.time()
    return {"prep": t1 - t0, "fit": t2 - t1, "total": t2 - t0, **fit_split(result, t1, t2)}


def with_classifier(cpath: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="oodray-cache-bench-"))
    shutil.copytree(cpath.parent, tmp / "classifiers" / cpath.parent.name)
    return tmp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--trials", type=positive_int, default=8, help="search size the saving is projected to")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    before = settle()
    init_ray()
    base = resolve_config(args.dataset, overrides=["train.regime=oblivious", *args.overrides])
    _, cpath = get_classifier(base)  # trained into the user's cache if missing; outside the timing
    warm_dir = with_classifier(cpath)
    warm_cfg = base.replace(cache_dir=str(warm_dir))
    prepare_run(warm_cfg)  # builds the cache the side "with it" reads; outside the timing
    cold_dirs: list[Path] = []

    def cold() -> dict[str, float]:
        cold_dirs.append(with_classifier(cpath))
        return timed_trial(base.replace(cache_dir=str(cold_dirs[-1])), str(cold_dirs[-1] / "runs"))

    runs = interleaved({"without cache": cold, "with cache": lambda: timed_trial(warm_cfg, str(warm_dir / "runs"))},
                       args.repeats, log=lambda s: print(s[:160], flush=True))
    c, w = ({k: Spread(r[k] for r in runs[side]) for k in runs[side][0]} for side in ("without cache", "with cache"))
    n = args.trials
    print(f"\n{args.dataset}: {base.attack.norm} eps {list(base.attack.eps_values())}, {'+'.join(base.attack.attacks)} "
          f"{base.attack.steps} steps on the training split; {base.train.epochs} epochs of a {base.translator.arch} "
          f"translator; {base.train.workers} Train worker(s); median (min-max) of {args.repeats} interleaved repeats")
    print(f"trial without the cache: {c['total'].fmt('{:.1f}', ' s')}  (cache build + C load "
          f"{c['prep'].fmt('{:.1f}', ' s')}, fit {c['fit'].fmt('{:.1f}', ' s')})")
    print(f"trial with the cache:    {w['total'].fmt('{:.1f}', ' s')}  (cache load + C load "
          f"{w['prep'].fmt('{:.1f}', ' s')}, fit {w['fit'].fmt('{:.1f}', ' s')})")
    speed = c["total"].ratio(w["total"])
    search = Spread(n * a / (a + (n - 1) * b) for a, b in zip(c["total"].values, w["total"].values, strict=True))
    print(f"one trial: {speed.fmt('{:.2f}', 'x')} faster with the cache; a search of {n} trials (the first builds "
          f"the cache): {search.fmt('{:.2f}', 'x')}")
    parts = ("prep", "start", "setup", "train", "proxy", "checkpoints", "between", "end")
    print("where a cached trial's time goes (median s): " + ", ".join(f"{k} {w[k].median:.1f}" for k in parts))
    print(load_line(before))
    for d in [warm_dir, *cold_dirs]:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
