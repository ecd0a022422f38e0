"""Peak memory of the trainer, the oblivious-cache build and the evaluation driver at N and 4N training images of a
toy ImageFolder, measured side by side in one run: with streamed input, memory should not grow with the dataset
(target: 4N/N <= 1.1).

    python benchmarks/memory_flatness.py [--n 300] [--source-size 96] [--image-size 64] [--repeats 3] [--steps ...]

Two toy ImageFolders (oodray.toydata; N and 4N training images, N/4 and N validation images, 10 classes) are
written to a temporary directory, each with its own OODRAY_CACHE (the index, the fixed classifier C, trained once
per dataset outside the measurements, and the oblivious cache). Each round runs, for N then 4N, as a user would:
- trainer: `python -m oodray.train` (adaptive regime, 1 Train worker, 1 epoch over every training image);
- cache build: `oodray.cache.build_oblivious_cache` on a fresh local Ray (the shards of the previous round deleted
  first, so every round builds the whole cache), with `cache.cpus_per_task` = all CPUs so one task runs at both sizes:
  otherwise N's single shard runs 1 task and 4N's three shards run 2 at once, and the tree's peak measures that
  concurrency (set by the cluster's CPUs, not by N), one more worker process, rather than memory per image; and
  with `cache.batch_size=64` at both sizes: by default a task attacks as many images at once as fit memory, up to a
  512-image shard, so N=300's one partial shard would be attacked in a smaller batch than 4N's full ones;
- evaluation driver: `python -m oodray.evaluate --translator identity` (oblivious + adaptive AutoAttack on a fixed
  32-image subset, and the natural shifts).
Memory is sampled every 0.2 s over the command's whole process tree (the driver, the local Ray it starts: GCS,
raylet, Train and task workers, DataLoader decode processes): the peak of the summed PSS (each shared page counted
once, split between its users) and of the driver process's own RSS. Ratios are 4N/N per round; the summary is the
median [min-max]. The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spread import positive_int, process_tree, run_main  # noqa: E402

from oodray.toydata import make_toy_imagefolder  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Runs cmd; returns (peak tree PSS GiB, peak driver RSS GiB, seconds). A failing command stops the benchmark."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree": 0, "driver": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["tree"] = max(peak["tree"], sum(_pss(p) for p in process_tree(proc.pid)))
            peak["driver"] = max(peak["driver"], _rss(proc.pid))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd[:4])} ...: {out.strip().splitlines()[-1:]}")
    return peak["tree"] / 2**30, peak["driver"] / 2**30, time.time() - t0


CACHE_BUILD = """
import sys
from oodray.cache import build_oblivious_cache
from oodray.config import resolve_config
from oodray.fixed_classifier import get_classifier
from oodray.runtime import init_ray
cfg = resolve_config("imagefolder", overrides=sys.argv[1:])
_, cpath = get_classifier(cfg, train=False)
init_ray()
print(build_oblivious_cache(cfg, cpath))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=300, help="training images of the small dataset (the large one: 4x)")
    p.add_argument("--source-size", type=int, default=96)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--steps", default="trainer,cache build,eval driver",
                   help="comma-separated subset of: trainer, cache build, eval driver")
    args = p.parse_args()
    steps = tuple(x.strip() for x in args.steps.split(","))
    if not set(steps) <= {"trainer", "cache build", "eval driver"}:
        raise SystemExit(f"error: --steps {args.steps!r}: each must be trainer, cache build or eval driver")
    py = sys.executable
    sets = [f"data.image_size={args.image_size}", "classifier.arch=small_cnn", "classifier.epochs=1",
            "attack.eps=0.25", "attack.steps=2", "train.batch_size=32", "train.proxy_examples=16",
            "train.proxy_steps=2", "eval.batch_size=32"]
    flags = [x for s in sets for x in ("--set", s)]
    tmp = Path(tempfile.mkdtemp(prefix="oodray-memory-bench-"))
    sizes = {"N": args.n, "4N": 4 * args.n}
    try:
        roots, envs = {}, {}
        for label, n in sizes.items():
            roots[label] = make_toy_imagefolder(tmp / label / "data", classes=10, per_class=n // 10,
                                                val_per_class=max(1, n // 40), size=args.source_size)
            envs[label] = {**os.environ, "OODRAY_CACHE": str(tmp / label / "cache"), "PYTHONPATH": str(ROOT),
                           "RAY_DEDUP_LOGS": "1"}
            subprocess.run([py, "-m", "oodray.classifier", "--dataset", "imagefolder", "--data-dir",
                            str(roots[label]), *flags], env=envs[label], cwd=ROOT, check=True, capture_output=True)
        print(f"toy ImageFolders: N={args.n} and 4N={4 * args.n} training JPEGs of {args.source_size} px at "
              f"data.image_size={args.image_size}; {os.cpu_count()} CPUs")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for r in range(args.repeats):
            for label in sizes:
                data = ["--dataset", "imagefolder", "--data-dir", str(roots[label])]
                cmds = {
                    "trainer": [py, "-m", "oodray.train", *data, *flags, "--set", "train.regime=adaptive", "--set",
                                "translator.arch=tiny", "--workers", "1", "--epochs", "1", "--storage",
                                str(tmp / label / "runs"),
                                "--name", f"round{r}"],
                    "cache build": [py, "-c", CACHE_BUILD, f"data.data_dir={roots[label]}", *sets,
                                    f"cache.cpus_per_task={os.cpu_count()}", "cache.batch_size=64"],
                    "eval driver": [py, "-m", "oodray.evaluate", *data, *flags, "--translator", "identity",
                                    "--n-examples", "32", "--threat-models", "oblivious,adaptive",
                                    "--out", str(tmp / label / f"eval{r}")],
                }
                shutil.rmtree(tmp / label / "cache" / "oblivious", ignore_errors=True)
                for step in steps:
                    try:
                        m = measure(cmds[step], envs[label])
                    except RuntimeError as e:  # e.g. Ray's raylet missing heartbeats on an overloaded machine
                        print(f"  round {r + 1} {label} {step}: {e}; running it again", flush=True)
                        m = measure(cmds[step], envs[label])
                    res.setdefault((step, label), []).append(m)
                    print(f"  round {r + 1} {label:2s} {step:11s}: tree PSS {m[0]:.2f} GiB, driver RSS {m[1]:.2f} GiB,"
                          f" {m[2]:.0f} s", flush=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"peak memory, median [min-max] of {args.repeats} rounds (GiB); ratio = 4N / N per round:")
        for step in steps:
            for k, what in ((0, "tree PSS"), (1, "driver RSS")):
                a = [m[k] for m in res[(step, "N")]]
                b = [m[k] for m in res[(step, "4N")]]
                ratio = [y / x for x, y in zip(a, b)]
                print(f"  {step:11s} {what:10s}: N {statistics.median(a):.2f} [{min(a):.2f}-{max(a):.2f}], "
                      f"4N {statistics.median(b):.2f} [{min(b):.2f}-{max(b):.2f}], ratio "
                      f"{statistics.median(ratio):.3f} [{min(ratio):.3f}-{max(ratio):.3f}]")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
