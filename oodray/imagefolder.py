"""Streaming ImageFolder input: the file index (built once per dataset version, cached on disk), the layout and
header checks that refuse bad input before any work starts, and `ImageFiles`, a Dataset that decodes one image per
item (memory O(batch), never O(dataset)).

Layout: `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG` with the same class folders, in torchvision
ImageFolder's order (classes sorted, files sorted, sub-folders of a class walked), so splits and evaluation subsets
are the ones torchvision's `ImageFolder` gives.

The index (paths relative to the root as one numpy bytes array, int32 labels) is written once to
`$OODRAY_CACHE/imagefolder-index/<digest of the root>.npz` (default `~/.cache/oodray`), together with the
modification time of every folder it read. Every later load (each cache task, each Train worker, each evaluation)
stats those folders (about 2,000 at ImageNet) and reads the index instead of walking the 1.33M files again; adding,
removing or renaming a file changes its folder's mtime, which rebuilds the index. The driver builds it before Ray
starts; a node whose cache directory is not shared builds its own copy once (without the header check, see
`_in_ray_worker`). benchmarks/index_scan.py measures the scan, the header check and the cached load. A numpy array
rather than a list of Python strings also keeps forked DataLoader workers from copying the index page by page
(reference counting writes to every object of a list).

Bad input is a one-line `DataError` naming the file or folder: a missing root or split, class folders that differ
between train/ and val/, an empty class folder, and a file whose header PIL cannot identify (empty, HTML saved as
.JPEG, cut before its image header). A file cut short after its header decodes with an error that names it when
it is first read (`ImageFiles.__getitem__`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from oodray.errors import DataError
from oodray.io import atomic_write_bytes

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val")
INDEX_FORMAT = "oodray-imagefolder-index-v1"
HEADER_THREADS = 8  # header checks are I/O bound (a shared file system answers slowly): threads overlap the waits


@dataclass(frozen=True)
class FolderIndex:
    """The files of one ImageFolder root: classes, and per split the relative paths (bytes) and labels."""

    root: Path
    classes: tuple[str, ...]
    paths: dict[str, np.ndarray]  # split -> array of b"train/<class>/<file>"
    labels: dict[str, np.ndarray]  # split -> int32 class index
    scan_seconds: float  # time taken to build it (0 when read from the cached index)


def index_path(root: Path) -> Path:
    cache = Path(os.environ.get("OODRAY_CACHE") or Path.home() / ".cache" / "oodray")
    return cache / "imagefolder-index" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.npz"


def load_index(root: str | Path, *, name: str = "imagefolder", check_headers: bool = True) -> FolderIndex:
    """The index of `root`: read from the cached file when no folder changed since it was written, else built (and
    every new file's header checked) and cached. Layout problems are one-line `DataError`s."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{name}: data directory '{root}' does not exist")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{name}: '{root / split}' is missing; expected ImageFolder layout "
                            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    cached = _read_cached(root)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    classes = _check_classes(root, name)
    paths, labels, dir_mtimes = {}, {}, {}
    for split in SPLITS:
        files, labs = [], []
        for label, cls in enumerate(classes):
            found = _walk_class(root, split, cls, dir_mtimes)
            if not found:
                raise DataError(f"{name}: class folder '{root / split / cls}' holds no image file "
                                f"({', '.join(IMG_EXTENSIONS)}); remove it from train/ and val/ or add images")
            files += found
            labs += [label] * len(found)
        paths[split] = np.array([f.encode() for f in files], dtype=bytes)
        labels[split] = np.asarray(labs, dtype=np.int32)
    for split in SPLITS:
        dir_mtimes[split] = os.stat(root / split).st_mtime_ns
    if check_headers and not _in_ray_worker():
        check_image_headers(root, [p for split in SPLITS for p in paths[split]], name)
    index = FolderIndex(root, tuple(classes), paths, labels, time.perf_counter() - t0)
    _write_cached(index, dir_mtimes)
    log.info("%s: indexed %d train and %d val images of %d classes under '%s' in %.1fs", name, len(labels["train"]),
             len(labels["val"]), len(classes), root, index.scan_seconds)
    return index


def _in_ray_worker() -> bool:
    """Every oodray CLI loads its dataset on the driver before Ray starts, so the headers were checked there; a Ray
    task or Train worker that builds its own index (another node, another cache dir) skips that check (minutes at
    ImageNet, and every task of a node would pay it at once): a bad file still fails, naming it, when decoded."""
    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except AttributeError:
        return False


def _check_classes(root: Path, name: str) -> list[str]:
    found = {split: sorted(e.name for e in os.scandir(root / split) if e.is_dir()) for split in SPLITS}
    if found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        parts = [f"only in {s}/: {', '.join(x[:5])}{' ...' if len(x) > 5 else ''} ({len(x)})"
                 for s, x in (("train", only_train), ("val", only_val)) if x]
        raise DataError(f"{name}: train/ and val/ of '{root}' must hold the same class folders; {'; '.join(parts)}")
    if not found["train"]:
        raise DataError(f"{name}: '{root / 'train'}' holds no class folder; expected {root}/train/<class>/*.JPEG")
    return found["train"]


def _walk_class(root: Path, split: str, cls: str, dir_mtimes: dict[str, int]) -> list[str]:
    """Relative paths of the class's image files, in ImageFolder's order; records every folder's mtime."""
    out = []
    for dirpath, _, filenames in sorted(os.walk(root / split / cls, followlinks=True)):
        rel_dir = os.path.relpath(dirpath, root)
        dir_mtimes[rel_dir] = os.stat(dirpath).st_mtime_ns
        out += [f"{rel_dir}/{f}" for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return out


def check_image_headers(root: Path, rel_paths: list[bytes], name: str = "imagefolder") -> None:
    """Opens each file with PIL, which reads its header only (format, size): a file it cannot identify is a one-line
    `DataError` naming it. Decoding every file would cost ~4 ms each (1.5 CPU-hours at ImageNet); this costs a few
    dozen microseconds per file and runs once per dataset version."""
    def check(rel: bytes) -> str | None:
        path = root / rel.decode()
        try:
            with Image.open(path) as im:
                if im.width < 1 or im.height < 1:
                    return f"'{path}' has an empty image ({im.width}x{im.height})"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return f"cannot read '{path}' as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return None

    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        for problem in pool.map(check, rel_paths, chunksize=256):
            if problem is not None:
                raise DataError(f"{name}: {problem}; replace or remove that file")


def _read_cached(root: Path) -> FolderIndex | None:
    path = index_path(root)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != INDEX_FORMAT or meta.get("root") != str(root):
                return None
            for rel, mtime in meta["dir_mtimes"].items():
                if os.stat(root / rel).st_mtime_ns != mtime:
                    return None
            return FolderIndex(root, tuple(meta["classes"]), {s: z[f"{s}_paths"] for s in SPLITS},
                               {s: z[f"{s}_labels"] for s in SPLITS}, 0.0)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # no index yet, a damaged one, or a folder gone: build it again


def _write_cached(index: FolderIndex, dir_mtimes: dict[str, int]) -> None:
    meta = {"format": INDEX_FORMAT, "root": str(index.root), "classes": list(index.classes), "dir_mtimes": dir_mtimes}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{f"{s}_paths": index.paths[s] for s in SPLITS}, **{f"{s}_labels": index.labels[s] for s in SPLITS})
    path = index_path(index.root)
    try:
        atomic_write_bytes(path, buf.getvalue())  # concurrent builders each write a whole file; the last one stays
    except OSError as e:  # a read-only cache: work on, slower (a full disk is a StorageFullError and stops the run)
        log.warning("could not cache the image index at '%s' (%s); it is rebuilt by each process", path, e)


class ImageFiles(Dataset):
    """One split of an ImageFolder root: items are ([0,1] float CHW resized and centre-cropped to `size`, label),
    decoded when asked for. A file that does not decode is a one-line `DataError` naming it."""

    streaming = True  # never materialised whole: `oodray.data.stack` refuses it without indices

    def __init__(self, root: Path, paths: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.root, self.paths, self.labels, self.size = root, paths, labels, size
        self._tf = None

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self):  # built lazily, so a pickled dataset (Ray, DataLoader workers) carries no transform objects
        if self._tf is None:
            from torchvision import transforms

            self._tf = transforms.Compose([transforms.Resize(int(round(self.size * 256 / 224))),
                                           transforms.CenterCrop(self.size), transforms.ToTensor()])
        return self._tf

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[i].decode()
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            "; replace or remove that file") from None
        return self.transform()(img), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tf": None}


def one_line(e: DataError) -> DataError:
    """A `DataError` re-raised by a DataLoader worker carries the worker's traceback in its message: keep the error's
    own last line, which names the file."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return DataError(last[len(prefix):] if last.startswith(prefix) else last)
