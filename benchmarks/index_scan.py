"""What building the ImageFolder index costs, and what the cached index saves, measured side by side in one run:
torchvision's `ImageFolder` scan (what every `load_dataset` paid before, per process and per cache task), oodray's
first build without and with the header check of every file, and a later load that reads the cached index.

    python benchmarks/index_scan.py [--classes 100] [--per-class 400] [--repeats 9]

The folder holds classes x per-class training files and a quarter as many validation files: real JPEG bytes (eight
small distinct images written round-robin, so creating 50k files takes seconds). The page cache is warm after the
first round (dropping it would disturb the machine's other users): on a cold or network file system the scan and
the header reads cost more, the cached load hardly more (one stat per folder, one index file). Per-file costs and
their projection to ImageNet-1k's 1,331,167 files (train + val) are printed; rounds are interleaved (A B C D A B C D
...), summary median [min-max]; load average before and after. 9 repeats by default: a run takes about 80 s (Intel
Xeon, 50k files), and two runs of an unchanged benchmark then agree both ways (each median within the other's range)
in 0.94 of pairs by chance alone, against 0.40 with 3 (`python benchmarks/spread.py`).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spread import positive_int, run_main  # noqa: E402  (the benchmarks' shared helpers)

from oodray.imagefolder import index_path, load_index  # noqa: E402

IMAGENET_FILES = 1_281_167 + 50_000


def write_folder(root: Path, classes: int, per_class: int) -> int:
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(buf.getvalue())
    n = 0
    for split, k in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(k):
                (d / f"n{c:08d}_{i}.JPEG").write_bytes(blobs[(c + i) % 8])
                n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--repeats", type=positive_int, default=9)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oodray-index-bench-"))
    try:
        t0 = time.time()
        n = write_folder(tmp / "data", args.classes, args.per_class)
        root = tmp / "data"
        print(f"{n} files in {2 * args.classes} class folders written in {time.time() - t0:.1f}s")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        def torchvision_scan() -> None:
            import torchvision

            for split in ("train", "val"):
                torchvision.datasets.ImageFolder(str(root / split))

        def fresh_build(check: bool) -> None:
            os.environ["OODRAY_CACHE"] = str(tmp / "cache")
            index_path(root.resolve()).unlink(missing_ok=True)
            assert load_index(root, check_headers=check).scan_seconds > 0

        def cached_load() -> None:
            assert load_index(root).scan_seconds == 0.0

        steps = {"torchvision ImageFolder scan": torchvision_scan,
                 "oodray build, no header check": lambda: fresh_build(False),
                 "oodray build + header check": lambda: fresh_build(True),
                 "oodray cached index load": cached_load}
        times: dict[str, list[float]] = {k: [] for k in steps}
        torchvision_scan()  # warm-up: imports and the page cache
        for _ in range(args.repeats):
            for name, fn in steps.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        base = statistics.median(times["torchvision ImageFolder scan"])
        print(f"median [min-max] of {args.repeats}; per file; projected to ImageNet-1k ({IMAGENET_FILES:,} files); "
              "ratio to torchvision's scan:")
        for name, v in times.items():
            med = statistics.median(v)
            print(f"  {name:31s} {med:8.3f} s [{min(v):.3f}-{max(v):.3f}]  {1e6 * med / n:7.1f} us/file  "
                  f"~{med / n * IMAGENET_FILES:7.1f} s at ImageNet  {med / base:6.3f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
