"""What every benchmark here shares: sides measured interleaved (A B, then B A, ...) so that drift in the machine's
load hits all of them alike, repeated, and reported as median with min-max, with the load average before and after.

    from spread import Spread, interleaved, load_line, settle
    before = settle()                      # waits for a quiet machine; returns the load average
    runs = interleaved({"plain": measure_plain, "ray": measure_ray}, repeats=3)   # {"plain": [v, v, v], ...}
    print(Spread(runs["plain"]).fmt("{:.0f}"), load_line(before))

A figure is only quoted with its spread; two runs of a benchmark agree when each median lies inside the other's
min-max. That rule fails by chance too, more often with fewer repeats: `python benchmarks/spread.py` prints how often
two runs of n repeats from one unchanging machine disagree by it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python benchmarks/x.py`
QUIET_CPUS = 0.25  # a machine with fewer CPUs busy than this (over 2 s) counts as quiet
DRAWS = 100_000  # pairs of runs that agreement_chance samples where it cannot enumerate


def positive_int(text: str) -> int:
    """argparse type for counts (repeats, trials): a whole number >= 1, else argparse's one error line and exit 2."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; give a whole number >= 1")
    return value


def run_main(main: Callable[[], None]) -> None:
    """Runs a benchmark's main under oodray's exit policy (`oodray.cli.run`): bad input (an unknown dataset, a value
    the config refuses) is one line and exit 2, Ctrl-C or SIGTERM exit 130."""
    from oodray.cli import run

    run(lambda _argv: main())


@dataclass(frozen=True)
class Spread:
    values: tuple[float, ...]

    def __init__(self, values: Any) -> None:
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("a spread needs at least one value")
        object.__setattr__(self, "values", vals)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, spec: str = "{:.2f}", unit: str = "") -> str:
        """'median unit (min-max, n=k)'."""
        return (f"{spec.format(self.median)}{unit} ({spec.format(self.lo)}-{spec.format(self.hi)}, "
                f"n={len(self.values)})")

    def ratio(self, other: Spread) -> Spread:
        """Per-repeat ratios self/other (repeats paired, as measured side by side)."""
        return Spread(a / b for a, b in zip(self.values, other.values, strict=True))


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int, *, log: Callable[[str], None] = print,
                ) -> dict[str, list[Any]]:
    """Runs every side `repeats` times, in the order A B C, then C B A, then A B C...; returns each side's results.
    Before each side it waits (at most 60 s) for the CPUs to settle, so that one side's exiting processes (a Ray
    fit's workers) are not measured as the next side's load."""
    if repeats < 1:
        raise SystemExit(f"--repeats={repeats}: must be at least 1 (3 or more to report a spread)")
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            busy, waited = _wait_quiet(QUIET_CPUS, 60.0)
            out[n].append(sides[n]())
            log(f"  repeat {r + 1}/{repeats} {n}: {_short(out[n][-1])}   (load {load():.2f}; before it {busy:.2f} "
                f"CPUs busy after {waited:.0f} s of waiting)")
    return out


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def busy_cpus(window: float = 2.0) -> float:
    """CPUs in use, averaged over the next `window` seconds (Linux /proc/stat; every process on the machine)."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    (t0, i0), _, (t1, i1) = ticks(), time.sleep(window), ticks()
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(t1 - t0, 1))


def _wait_quiet(max_busy: float, timeout: float) -> tuple[float, float]:
    t0, busy = time.monotonic(), busy_cpus()
    while busy > max_busy and time.monotonic() - t0 < timeout:
        busy = busy_cpus()
    return busy, time.monotonic() - t0


def settle(max_busy: float = QUIET_CPUS, timeout: float = 300.0, log: Callable[[str], None] = print) -> float:
    """Waits until the machine is quiet (under `max_busy` CPUs in use over 2 s) or `timeout` seconds have passed, and
    returns the 1-minute load average then. Unlike the load average, which decays over minutes, this sees at once
    that an earlier run's processes (Ray's, a previous benchmark's) have exited. A machine that stays busy is named
    in the log, and the run goes on: its figures then carry that load (printed with them)."""
    busy, waited = _wait_quiet(max_busy, timeout)
    state = "quiet" if busy <= max_busy else f"STILL BUSY after {timeout:.0f} s, measuring anyway"
    log(f"machine {state}: {busy:.2f} of {os.cpu_count()} CPUs in use (waited {waited:.0f} s)")
    return load()


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (figures differ between CPU models: compare runs on
    the same one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    vec = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{name}{f' ({vec})' if vec else ''}"


def load_line(before: float) -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, 1-min load average {before:.2f} before, {load():.2f} "
            "after (a busy machine skews wall-clock figures; compare runs made at similar load, on the same CPU)")


def process_tree(root: int) -> list[int]:
    """Linux: `root` and every process below it, read from /proc (for peak-memory benchmarks that count a command's
    whole tree: its local Ray, task workers, DataLoader processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, tuple | list):
        return ", ".join(_short(x) for x in v)
    return str(v)


def fit_split(result: Any, t_fit: float, t_done: float) -> dict[str, float]:
    """Where a Ray Train fit's wall time went, from oodray's per-epoch metrics: Ray's start (fit() to the worker
    loop's first line), the worker's set-up, training batches, proxy evaluation, checkpoint writes, time between
    epochs (reports, checkpoint upload) and Ray's shutdown (the last report to fit()'s return)."""
    last = result.metrics  # the last report: its *_seconds_total cover every epoch (a run keeps only its last
    wall = t_done - t_fit  # two checkpoints, so result.metrics_dataframe holds only their two rows)
    out = {"wall": wall, "start": float(last["worker_started_at"]) - t_fit, "setup": float(last["setup_seconds"]),
           "train": float(last["train_seconds_total"]), "proxy": float(last["proxy_seconds_total"]),
           "checkpoints": float(last["checkpoint_write_seconds_total"]), "end": t_done - float(last["reported_at"])}
    out["between"] = wall - sum(out[k] for k in ("start", "setup", "train", "proxy", "checkpoints", "end"))
    return out


def agreement_is_exact(n: int) -> bool:
    """Whether `agreement_chance(n)` enumerates (odd n, up to a million splits) rather than samples."""
    return n % 2 == 1 and math.comb(2 * n, n) <= 1_000_000


def agreement_chance(n: int, draws: int = DRAWS, seed: int = 0) -> tuple[float, float]:
    """How often two runs of `n` repeats each, drawn from one unchanging distribution, pass the agreement rule, as
    (the second run's median inside the first's min-max, each run's median inside the other's). When exact (odd n),
    it is the same for every continuous distribution: only the ranks of the 2n values matter, and every split of them
    into two runs is enumerated. Otherwise (even n, whose median averages two values, or very large n) it is estimated
    from `draws` pairs of runs of normal values."""
    if n < 1:
        raise ValueError(f"n={n}: a run has at least 1 repeat")

    def passes(a: list[float], b: list[float]) -> tuple[bool, bool]:
        one = min(a) <= statistics.median(b) <= max(a)
        return one, one and min(b) <= statistics.median(a) <= max(b)

    if agreement_is_exact(n):
        ranks = range(2 * n)
        outcomes = [passes(list(a), [r for r in ranks if r not in a]) for a in combinations(ranks, n)]
    else:
        rng = random.Random(seed)
        outcomes = [passes([rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)])
                    for _ in range(draws)]
    return (sum(o for o, _ in outcomes) / len(outcomes), sum(b for _, b in outcomes) / len(outcomes))


def main() -> None:
    p = argparse.ArgumentParser(description="How often two runs of an unchanged benchmark fail the agreement rule "
                                "(each median inside the other run's min-max) by chance alone, per number of repeats.")
    p.add_argument("--repeats", type=int, nargs="+", default=[2, 3, 4, 5, 7, 9])  # checked below, with its own line
    args = p.parse_args()
    if bad := [n for n in args.repeats if n < 1]:
        p.error(f"--repeats {bad[0]}: a run has at least 1 repeat")
    print("repeats   2nd median in 1st's range   both medians in each other's range   (nothing changed between runs)")
    for n in args.repeats:
        one, both = agreement_chance(n)
        how = "exact" if agreement_is_exact(n) else f"normal values, {DRAWS:,} draws"
        print(f"{n:>7}   {one:>26.2f}   {both:>34.2f}   ({how})")


if __name__ == "__main__":
    run_main(main)
