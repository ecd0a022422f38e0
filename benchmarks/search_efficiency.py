"""Search efficiency of the trial schedulers, measured over several seeds: the same seeded search (same Optuna sampler
seed, same trial count and budget) with every trial at its full budget (FIFO) and with each scheduler tried. For each
seed and scheduler it counts the trial-epochs spent, and how many were spent before some trial reached the best value
of the search objective (`tune.objective`, what both searches maximise and rank by: proxy robust accuracy, penalised
for lost clean accuracy) that the full-budget search found; then prints, per scheduler, the median and min-max over
seeds of both, as shares of FIFO's trial-epochs (the target for "reached FIFO's best" is <= 1/3).

Beside it, labelled as such, the same count for reaching within one standard error of FIFO's best: the proxy is
measured on a few hundred images (`proxy_examples`, e.g. 144 on digits, where one image is 0.007), so two
configurations whose figures differ by a few images are not told apart by it; the exact criterion asks a search to
match the maximum of FIFO's noisy figures, which grows with FIFO's number of trial-epochs.

For an ASHA search it also prints the floor where it reached FIFO's best: the fewest trial-epochs any one-at-a-time
ASHA spends until that trial (k-th proposed) reports that epoch (`asha_floor`: the first trial runs its whole budget,
every later one at least its grace period). What an ASHA search spends above the floor is the cost of its stopping
decisions; the floor is set by the order the searcher proposed configurations in, which no ASHA setting changes.
When FIFO's best comes from one of TPE's seeded random first proposals, the floor for reaching it in that same trial is
printed beside FIFO's figures.

    python benchmarks/search_efficiency.py                                   # digits, 6 trials x 4 epochs, 3 seeds
    python benchmarks/search_efficiency.py --seeds 0,1,2,3 --schedulers fifo,asha:2,asha:3,hyperband:3
    python benchmarks/search_efficiency.py --epochs 8 --schedulers fifo,asha:2,asha:3   # 8 epochs a trial

A scheduler is `name:reduction_factor[:grace_period]` (asha, hyperband). Searches run one trial at a time
(`--max-concurrent 1`) in fresh experiments, the schedulers of a seed in alternating order. Trial-epochs do not depend
on the machine's load (each trial's epochs and the scheduler's decisions do not), so this benchmark needs no quiet
machine; its wall time is printed for planning.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spread import Spread, load, load_line, run_main  # puts the repository on sys.path for what follows

from oodray.config import resolve_config
from oodray.config.schema import TuneConfig
from oodray.results import load_trials
from oodray.tune import TPE_STARTUP_TRIALS

DEFAULT_GRACE = TuneConfig.grace_period


def scheduler_settings(scheduler: str) -> dict[str, str]:
    """The config settings a `name:reduction_factor[:grace_period]` scheduler stands for (those it gives)."""
    keys = ("tune.scheduler", "tune.reduction_factor", "tune.grace_period")
    return dict(zip(keys, scheduler.split(":"), strict=False))


def grace_of(scheduler: str) -> int:
    """The grace period of a scheduler (the config's default if it gives none)."""
    return int(scheduler_settings(scheduler).get("tune.grace_period", DEFAULT_GRACE))


def run_search(storage: Path, name: str, args: argparse.Namespace, scheduler: str, seed: int) -> list[dict]:
    sets = [*(f"{k}={v}" for k, v in scheduler_settings(scheduler).items()), f"train.seed={seed}",
            "tune.space={train.regime: [oblivious]}"]
    cmd = [sys.executable, "-m", "oodray.tune", "--dataset", args.dataset, "--num-samples", str(args.num_samples),
           "--epochs", str(args.epochs), "--final-top-k", "0", "--max-concurrent", "1", "--storage", str(storage),
           "--name", name, "-q", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return load_trials(storage / name)


def epoch_rows(trials: list[dict]) -> list[dict]:
    """Every reported epoch of every trial, in the order they were reported (trials may be paused and resumed)."""
    rows = [r for t in trials for r in t["history"] if not r.get("replayed")]
    return sorted(rows, key=lambda r: (r.get("reported_at") or r.get("timestamp") or 0.0))


KEY = "objective"  # what the searches maximise (ASHA's metric, TPE's value, the final ranking): see oodray.metrics


def first_reaching(trials: list[dict], target: float, key: str = KEY) -> tuple[int, dict] | None:
    """The trial-epochs spent (in reporting order) until some epoch reports >= target, and that epoch; None if none
    does."""
    for spent, row in enumerate(epoch_rows(trials), start=1):
        if row.get(key, -math.inf) >= target - 1e-12:
            return spent, row
    return None


def epochs_to_reach(trials: list[dict], target: float, key: str = KEY) -> int | None:
    """Trial-epochs spent (in reporting order) until some epoch reports >= target; None if none does."""
    hit = first_reaching(trials, target, key)
    return None if hit is None else hit[0]


def best_row(trials: list[dict], key: str = KEY) -> dict:
    return max(epoch_rows(trials), key=lambda r: r.get(key, -math.inf))


def best(trials: list[dict], key: str = KEY) -> float:
    return best_row(trials, key)[key]


def trial_order(trials: list[dict]) -> list[str]:
    """Trial ids in the order the trials first reported (one at a time: the order TPE proposed them)."""
    return list(dict.fromkeys(r["trial_id"] for r in epoch_rows(trials)))


def position(trials: list[dict], row: dict) -> str:
    """Where a reported epoch came from: 'trial k of n, epoch e' (k in the order the trials first reported)."""
    k, epoch = trial_and_epoch(trials, row)
    return f"trial {k} of {len(trial_order(trials))}, epoch {epoch}"


def asha_floor(k: int, epoch: int, budget: int, grace: int) -> int:
    """The fewest trial-epochs a one-at-a-time ASHA search can spend until its k-th trial reports epoch `epoch`: Ray's
    ASHA lets the first trial run its whole budget (every rung is empty when it reports), and stops no later trial
    before its grace period. What is above this floor is the cost of ASHA's decisions; the floor itself is set by the
    order the searcher proposed the configurations in."""
    if k < 1 or epoch < 1:
        raise ValueError(f"trial {k}, epoch {epoch}: both count from 1")
    return epoch if k == 1 else budget + min(grace, budget) * (k - 2) + epoch


def trial_and_epoch(trials: list[dict], row: dict) -> tuple[int, int]:
    """(k, e): the reported epoch `row` is epoch e of the k-th trial to report."""
    return trial_order(trials).index(row["trial_id"]) + 1, int(row["epoch"])


def standard_error(row: dict) -> float:
    """The binomial standard error of a proxy robust accuracy measured on `proxy_examples` images."""
    n, p = row.get("proxy_examples"), row["robust_accuracy"]
    if not n:
        raise SystemExit("the trials report no proxy_examples (a run of oodray before 2026-12-02?): re-run the search")
    return math.sqrt(p * (1.0 - p) / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--schedulers", default="fifo,asha:2,asha:3,asha:4,hyperband:3",
                   help="comma-separated; fifo is the reference and always runs")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    others = [s for s in args.schedulers.split(",") if s != "fifo"]
    for scheduler in others:  # each one's settings refused now (one line, exit 2), not after the first FIFO search
        resolve_config(args.dataset, None, [f"{k}={v}" for k, v in scheduler_settings(scheduler).items()])
    before, t_start = load(), time.time()
    storage = Path(tempfile.mkdtemp(prefix="oodray-search-"))
    spent: dict[str, list[float]] = {s: [] for s in others}
    reach: dict[str, list[float]] = {s: [] for s in others}
    near: dict[str, list[float]] = {s: [] for s in others}  # within one standard error of FIFO's best
    floor: dict[str, list[float]] = {s: [] for s in others}  # asha_floor where each ASHA search reached FIFO's best
    for i, seed in enumerate(seeds):
        order = ["fifo", *others] if i % 2 == 0 else [*others[::-1], "fifo"]
        runs = {}
        for sched in order:
            t0 = time.time()
            runs[sched] = run_search(storage, f"{sched.replace(':', '-')}-s{seed}", args, sched, seed)
            print(f"  seed {seed} {sched}: {sum(len(epoch_rows([t])) for t in runs[sched])} trial-epochs, best {KEY} "
                  f"{best(runs[sched]):.4f} ({time.time() - t0:.0f} s, load {load():.2f})", flush=True)
        total_fifo = len(epoch_rows(runs["fifo"]))
        top = best_row(runs["fifo"])
        target, se = top[KEY], standard_error(top)
        k_top, e_top = trial_and_epoch(runs["fifo"], top)
        print(f"seed {seed}: FIFO {total_fifo} trial-epochs, best {KEY} {target:.4f} (robust accuracy "
              f"{top['robust_accuracy']:.4f} on {top['proxy_examples']} images, standard error {se:.4f}; "
              f"{position(runs['fifo'], top)})", end="")
        if k_top <= TPE_STARTUP_TRIALS:  # a seeded random draw: every search of this seed proposes it k-th too
            f = asha_floor(k_top, e_top, args.epochs, DEFAULT_GRACE)
            print(f"; a one-at-a-time ASHA (grace {DEFAULT_GRACE}) spends at least {f} ({f / total_fifo:.2f} of FIFO) "
                  "to reach it in the same trial", end="")
        print(flush=True)
        for sched in others:
            hit, n_near = first_reaching(runs[sched], target), epochs_to_reach(runs[sched], target - se)
            n = None if hit is None else hit[0]
            spent[sched].append(len(epoch_rows(runs[sched])) / total_fifo)
            reach[sched].append(float("inf") if n is None else n / total_fifo)
            near[sched].append(float("inf") if n_near is None else n_near / total_fifo)
            how = "never"
            if hit is not None:
                how = f"{n} ({reach[sched][-1]:.2f} of FIFO), in its {position(runs[sched], hit[1])}"
                if sched.startswith("asha"):  # the least any ASHA could spend to get to that trial and epoch
                    f = asha_floor(*trial_and_epoch(runs[sched], hit[1]), args.epochs, grace_of(sched))
                    floor[sched].append(f / total_fifo)
                    how += f" (the floor for that trial and epoch: {f}, {floor[sched][-1]:.2f} of FIFO)"
            print(f"seed {seed} {sched}: spent {spent[sched][-1]:.2f} of FIFO, best {best(runs[sched]):.4f} "
                  f"({position(runs[sched], best_row(runs[sched]))}), reached FIFO's best after {how}, "
                  "within one standard error of it after "
                  + ("never" if n_near is None else f"{n_near} ({near[sched][-1]:.2f} of FIFO)"), flush=True)
    print(f"\n{args.dataset}: {args.num_samples} trials x up to {args.epochs} epochs, one at a time, seeds {seeds}; "
          f"shares of FIFO's trial-epochs, median (min-max) over seeds ('inf': never reached FIFO's best {KEY}); "
          "'within 1 SE': reached FIFO's best less one binomial standard error of its proxy (not the target)")
    for sched in others:
        print(f"{sched:14s} spent {Spread(spent[sched]).fmt()}   reached FIFO's best after "
              f"{Spread(reach[sched]).fmt()}   (target <= 0.33)   within 1 SE after {Spread(near[sched]).fmt()}"
              + (f"   floor where reached {Spread(floor[sched]).fmt()}" if floor[sched] else ""))
    print(f"wall time {time.time() - t_start:.0f} s; {load_line(before)}")
    shutil.rmtree(storage, ignore_errors=True)  # the searches' trials: every figure is printed above


if __name__ == "__main__":
    run_main(main)
