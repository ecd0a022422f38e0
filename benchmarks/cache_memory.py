"""Memory flatness of the oblivious cache: peak RSS of a cache build and of a trainer's input loop reading the cache,
at N and 4N training images, side by side in one run (median of interleaved repeats, min-max).

    python benchmarks/cache_memory.py [--n 6000] [--repeats 9]

Data: Fashion-MNIST (Debian's `dataset-fashion-mnist`), its first N and 4N training images, against a fixed
classifier with random weights (`classifier.epochs=0`: the memory of an attack does not depend on C's accuracy) and
FGSM (one step: the benchmark measures memory, not attack time). Each measurement is a fresh process:
- build: a local Ray (2 CPUs) building the cache; the peak of the summed RSS of the driver and every process under it
  (Ray's GCS, raylet, workers; shared pages are counted once per process), sampled every 20 ms, and the peak of the
  largest single Ray worker;
- read: one epoch of a shuffled DataLoader over `PairedImages(train, ObliviousCache(dir))`, as the Train loop reads
  it; the process's peak RSS from opening the cache to the end of the epoch (VmHWM, reset first), and
  its growth over the RSS before;
- read-whole, for comparison: the same epoch over the cache held as one float16 tensor, as format 1 held it in every
  Train worker (and 2x on the driver during `torch.cat`, +1 in the object store).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from spread import (  # the benchmarks' shared helpers (puts the repository on sys.path)
    positive_int,
    process_tree,
    run_main,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(cache_dir: str, seed: int):
    from oodray.config import resolve_config

    return resolve_config("fashion-mnist", overrides=[
        "classifier.epochs=0", "attack.attacks=[fgsm]", f"cache_dir={cache_dir}", f"train.seed={seed}",
        "cache.batch_size=64", "cache.shards_per_task=4"])


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak measured next is the one of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_build(n: int, cache_dir: str, seed: int) -> dict[str, float]:
    import ray
    from torch.utils.data import Subset

    from oodray.cache import build_oblivious_cache
    from oodray.data import load_dataset
    from oodray.fixed_classifier import get_classifier

    cfg = _cfg(cache_dir, seed)
    splits = load_dataset(cfg.data)
    _, cpath = get_classifier(cfg, splits)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    peak = {"tree": 0, "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not stop.is_set():
            pids = process_tree(me)
            sizes = {p: _rss_kb(p) for p in pids}
            peak["tree"] = max(peak["tree"], sum(sizes.values()))
            peak["worker"] = max(peak["worker"], max((v for p, v in sizes.items() if p != me), default=0))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.time()
    d, generated = build_oblivious_cache(cfg, cpath, Subset(splits.train, range(n)))
    seconds = time.time() - t0
    stop.set()
    t.join()
    ray.shutdown()
    return {"tree_mb": peak["tree"] / 1024, "worker_mb": peak["worker"] / 1024, "seconds": seconds,
            "shards": generated, "dir": str(d)}


def child_read(n: int, cache_dir: str, seed: int, directory: str, whole: bool) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler, Subset

    from oodray.cache import ObliviousCache
    from oodray.data import load_dataset
    from oodray.train import PairedImages

    cfg = _cfg(cache_dir, seed)
    train = Subset(load_dataset(cfg.data).train, range(n))
    before = _rss_kb(os.getpid())
    _reset_peak()
    reader = ObliviousCache(directory)
    if whole:  # what format 1 did: every shard concatenated into one float16 tensor in the trainer's memory
        reader = torch.cat([torch.stack([reader[i] for i in range(s, min(n, s + 512))]).half()
                            for s in range(0, n, 512)])
    data = PairedImages(train, reader)
    loader = DataLoader(data, batch_size=128, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(0)))
    seen, dtypes = 0, set()
    for x, x_ood, _ in loader:
        seen += len(x)
        dtypes.add(x_ood.dtype)
    assert seen == n and dtypes == {torch.float32}
    peak = _rss_kb(os.getpid(), "VmHWM")
    return {"peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024}


def _run_child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=6000, help="N; 4N must fit Fashion-MNIST's 54,000 training images")
    p.add_argument("--repeats", type=positive_int, default=9,  # about 6 min at --n 8000 on the Intel Xeon
                   help="interleaved repeats (9: two runs of an unchanged benchmark agree both ways in 0.94 of "
                        "pairs by chance, 3: in 0.40; benchmarks/spread.py)")
    p.add_argument("--child", choices=["build", "read", "read-whole"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        print(json.dumps(child_build(args.n, args.cache_dir, args.seed)))
        return
    if args.child in ("read", "read-whole"):
        print(json.dumps(child_read(args.n, args.cache_dir, args.seed, args.dir, args.child == "read-whole")))
        return
    sizes = (args.n, 4 * args.n)
    load_before = os.getloadavg()
    rows: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}
    with tempfile.TemporaryDirectory(prefix="oodray-cache-memory-") as tmp:
        for r in range(args.repeats):  # interleaved: N, 4N, N, 4N, ...
            for k, n in enumerate(sizes):
                seed = 10 * r + k  # a cache of its own (train.seed is in the cache key, not in the classifier's)
                b = _run_child("--child", "build", "--n", str(n), "--cache-dir", tmp, "--seed", str(seed))
                d = b.pop("dir")
                got = {f"build_{k2}": v2 for k2, v2 in b.items()}
                for mode in ("read", "read-whole"):
                    rd = _run_child("--child", mode, "--n", str(n), "--cache-dir", tmp, "--seed", str(seed), "--dir", d)
                    got.update({f"{mode}_{k2}": v2 for k2, v2 in rd.items()})
                for key, v in got.items():
                    rows[n].setdefault(key, []).append(float(v))
                print(f"repeat {r + 1}/{args.repeats} N={n}: " + ", ".join(f"{k2} {v2:.1f}" for k2, v2 in got.items()),
                      flush=True)
    load_after = os.getloadavg()
    print(f"\nFashion-MNIST 1x28x28, FGSM, cache.batch_size=64, shards of 512; median (min-max) of {args.repeats} "
          f"interleaved repeats; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'':34}{'N=' + str(sizes[0]):>24}{'4N=' + str(sizes[1]):>24}{'ratio 4N/N':>12}")
    for key, label in (("build_tree_mb", "build: peak RSS, all processes MB"), ("build_worker_mb",
                       "build: peak RSS, largest task MB"), ("build_seconds", "build: seconds"),
                       ("read_peak_mb", "trainer input: peak RSS MB"), ("read_growth_mb",
                       "trainer input: growth MB"), ("read-whole_peak_mb", "format 1 (one tensor): peak RSS MB"),
                       ("read-whole_growth_mb", "format 1 (one tensor): growth MB")):
        a, b = rows[sizes[0]][key], rows[sizes[1]][key]
        ratio = statistics.median(b) / statistics.median(a) if statistics.median(a) else float("nan")
        print(f"{label:34}{_fmt(a):>24}{_fmt(b):>24}{ratio:12.2f}")
    for n in sizes:
        print(f"format 1 held the cache of N={n} in RAM as one float16 tensor: {n * 28 * 28 * 2 / 2**20:.1f} MiB per "
              "process holding it (driver 2x during torch.cat, +1 copy per Train worker); format 2 on disk: "
              f"{n * 28 * 28 / 2**20:.1f} MiB")


if __name__ == "__main__":
    run_main(main)
