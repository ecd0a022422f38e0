"""Images/s of oodray's training input on 224 px JPEGs, against a plain torchvision DataLoader with the same decode
processes, and against Ray Data (`read_images` + `map_batches` + `iter_torch_batches`), measured side by side in
one run: the evidence for feeding Train workers with torch DataLoader workers over a DistributedSampler.

    python benchmarks/input_pipeline.py [--images 600] [--source-size 320] [--workers 1 2] [--repeats 3]

A toy ImageFolder of `--images` real JPEG files of `--source-size` px (oodray.toydata) is written to a temporary
directory; each pipeline decodes, resizes to 256 and centre-crops to 224 every training image once, into float
[0,1] NCHW batches of 64 on the consuming process:
- torchvision: `ImageFolder` + `DataLoader(num_workers=W, shuffle=True)`, the plain baseline;
- oodray: `load_dataset(imagefolder)` (cached index) -> `train.PairedImages` -> `DistributedSampler` ->
  `train.training_loader` with data.loader_workers=W, exactly what a Train worker iterates;
- ray-data: `ray.data.read_images` (decode in read tasks), `map_batches` (resize + crop, uint8 through the object
  store), `iter_torch_batches` (float on the consumer), on a local Ray with W CPUs.
Each round runs every pipeline once, in the same order (A B C A B C ...); start-up (decode processes, Ray Data's
planning) is inside the timing, as a training epoch pays it; one untimed warm-up round comes first (imports, the
page cache). Ratios are oodray / torchvision and ray-data /
torchvision per round; the summary is median [min-max]. The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spread import positive_int, run_main  # noqa: E402  (the benchmarks' shared helpers)

from oodray.config import resolve_config  # noqa: E402
from oodray.data import is_streamed, load_dataset  # noqa: E402
from oodray.toydata import make_toy_imagefolder  # noqa: E402
from oodray.train import PairedImages, training_loader  # noqa: E402

BATCH = 64
SIZE = 224


def torchvision_pipeline(root: Path, workers: int) -> int:
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(SIZE), transforms.ToTensor()])
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers)
    return sum(len(y) for _, y in loader)


def oodray_pipeline(root: Path, workers: int) -> int:
    cfg = resolve_config("imagefolder", overrides=[f"data.data_dir={root}", f"data.image_size={SIZE}",
                                                   f"data.loader_workers={workers}", f"train.batch_size={BATCH}",
                                                   "data.persistent_workers=false"])
    splits = load_dataset(cfg.data)
    data = PairedImages(splits.train, None)
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = training_loader(cfg, data, sampler, torch.device("cpu"), streamed=is_streamed(splits.train))
    return sum(len(y) for _, _, y in loader)


def ray_data_pipeline(root: Path, workers: int) -> int:
    import numpy as np
    import ray
    from PIL import Image

    classes = sorted(p.name for p in (root / "train").iterdir())

    def crop(batch: dict) -> dict:
        out = []
        for img in batch["image"]:
            im = Image.fromarray(img)
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
            left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
            out.append(np.asarray(im.crop((left, top, left + SIZE, top + SIZE))))
        labels = [classes.index(Path(p).parent.name) for p in batch["path"]]
        return {"image": np.stack(out), "label": np.asarray(labels)}

    ds = ray.data.read_images(str(root / "train"), mode="RGB", include_paths=True).map_batches(crop, batch_size=BATCH)
    n = 0
    for b in ds.iter_torch_batches(batch_size=BATCH):
        x = b["image"].permute(0, 3, 1, 2).float() / 255
        n += len(x)
    return n


PIPELINES = {"torchvision": torchvision_pipeline, "oodray": oodray_pipeline, "ray-data": ray_data_pipeline}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=600, help="training images (10 classes)")
    p.add_argument("--source-size", type=int, default=320, help="side of the generated JPEG files")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode processes (CPU cores) compared")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="oodray-input-bench-"))
    os.environ["OODRAY_CACHE"] = str(tmp / "cache")  # the index is written here, not in the user's cache
    try:
        t0 = time.time()
        root = make_toy_imagefolder(tmp / "toy", classes=10, per_class=args.images // 10, val_per_class=2,
                                    size=args.source_size)
        print(f"{args.images} training JPEGs of {args.source_size} px written in {time.time() - t0:.1f}s; batches of "
              f"{BATCH} at {SIZE} px; torch threads {torch.get_num_threads()}, os.cpu_count {os.cpu_count()}")
        load_dataset(resolve_config("imagefolder", overrides=[f"data.data_dir={root}"]).data)  # index, untimed
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for w in args.workers:
            if "ray-data" in args.pipelines:
                import ray

                ray.init(num_cpus=w, include_dashboard=False, configure_logging=False, log_to_driver=False)
                ray.data.DataContext.get_current().enable_progress_bars = False
            for name in args.pipelines:  # warm-up, untimed: first imports, Ray Data's first plan, the page cache
                PIPELINES[name](root, w)
            rates: dict[str, list[float]] = {k: [] for k in args.pipelines}
            for r in range(args.repeats):
                for name in args.pipelines:
                    t = time.perf_counter()
                    n = PIPELINES[name](root, w)
                    rates[name].append(n / (time.perf_counter() - t))
                print(f"  workers={w} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()))
            if "ray-data" in args.pipelines:
                ray.shutdown()
            print(f"workers={w}: images/s per decode core, median [min-max] of {args.repeats}:")
            for name, v in rates.items():
                per = [x / w for x in v]
                print(f"  {name:12s} {statistics.median(per):7.1f} [{min(per):.1f}-{max(per):.1f}]")
            if "torchvision" in rates:
                for name in [k for k in rates if k != "torchvision"]:
                    ratio = [a / b for a, b in zip(rates[name], rates["torchvision"])]
                    print(f"  {name} / torchvision: {statistics.median(ratio):.2f}x "
                          f"[{min(ratio):.2f}-{max(ratio):.2f}] (per round)")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
