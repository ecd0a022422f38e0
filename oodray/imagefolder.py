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

An object store works as a root too: `--data-dir s3://bucket/imagenet` (or gs://, or file:// for a local path read
the same way), through pyarrow's filesystems, with pyarrow's URI options (`?region=...`, `?endpoint_override=...`)
and credentials from the usual environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS). The index is then built from two
recursive listings (one per split: about 1,330 list requests at ImageNet) and every item is one GET of its object.
An object store has no folder modification times, so a URI root's cached index is trusted as long as its class
prefixes are unchanged: treat such a root as one immutable dataset version (a new version gets a new prefix), or
delete the cached index file (its path is logged when written) after changing files in place. Headers are checked
as for a local root, with more threads (each check is a ranged GET of the file's first 64 KiB).

Bad input is a one-line `DataError` naming the file or folder: a missing root or split, class folders that differ
between train/ and val/, an empty class folder, and a file whose header PIL cannot identify (empty, HTML saved as
.JPEG, cut before its image header). A file cut short after its header decodes with an error that names it when
it is first read (`ImageFiles.__getitem__`).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
URI_HEADER_THREADS = 64  # an object store answers each GET in tens of milliseconds: overlap more of them
HEADER_BYTES = 64 * 1024  # what a URI header check reads first (the whole file when PIL needs more)


@dataclass(frozen=True)
class FolderIndex:
    """The files of one ImageFolder root: classes, and per split the relative paths (bytes) and labels."""

    root: Path | str  # a local folder, or a URI (str) read through pyarrow's filesystems
    classes: tuple[str, ...]
    paths: dict[str, np.ndarray]  # split -> array of b"train/<class>/<file>"
    labels: dict[str, np.ndarray]  # split -> int32 class index
    scan_seconds: float  # time taken to build it (0 when read from the cached index)


def is_uri(root: str | Path) -> bool:
    return "://" in str(root)


def _public(uri: str) -> str:
    """A URI without its query (options such as endpoint_override, and possibly keys): what is logged and cached."""
    return uri.split("?", 1)[0].rstrip("/")


def index_path(root: Path | str) -> Path:
    cache = Path(os.environ.get("OODRAY_CACHE") or Path.home() / ".cache" / "oodray")
    key = _public(root) if is_uri(root) else str(root)
    return cache / "imagefolder-index" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def open_uri(uri: str, name: str = "imagefolder"):
    """(pyarrow filesystem, base path) of a URI root; a scheme pyarrow does not know is a one-line `DataError`."""
    import pyarrow
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, ValueError, OSError) as e:
        raise DataError(f"{name}: cannot open data root '{_public(uri)}' ({str(e).splitlines()[0]}); expected a "
                        "local folder or an s3://, gs:// or file:// URI") from None
    return fs, base.rstrip("/")


def load_index(root: str | Path, *, name: str = "imagefolder", check_headers: bool = True) -> FolderIndex:
    """The index of `root`: read from the cached file when no folder changed since it was written, else built (and
    every new file's header checked) and cached. Layout problems are one-line `DataError`s."""
    if is_uri(root):
        return _load_uri_index(str(root), name, check_headers)
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


def _load_uri_index(uri: str, name: str, check_headers: bool) -> FolderIndex:
    """`load_index` for an object-store root: two recursive listings, in torchvision ImageFolder's order."""
    import pyarrow.fs

    fs, base = open_uri(uri, name)
    shown = _public(uri)
    try:
        kinds = {split: fs.get_file_info(f"{base}/{split}").type for split in SPLITS}
        if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound and all(
                k == pyarrow.fs.FileType.NotFound for k in kinds.values()):
            raise DataError(f"{name}: data root '{shown}' does not exist (or cannot be listed with these credentials)")
        for split in SPLITS:
            if kinds[split] != pyarrow.fs.FileType.Directory:
                raise DataError(f"{name}: '{shown}/{split}' is missing; expected ImageFolder layout "
                                f"{shown}/train/<class>/*.JPEG and {shown}/val/<class>/*.JPEG")
        found = {split: sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/{split}"))
                               if i.type == pyarrow.fs.FileType.Directory) for split in SPLITS}
        classes = _same_classes(found, shown, name)
        cached = _read_cached(shown, classes)
        if cached is not None:
            return dataclasses.replace(cached, root=uri)  # the full URI: its options reach the store
        t0 = time.perf_counter()
        paths, labels = {}, {}
        for split in SPLITS:
            by_class: dict[str, list[tuple[str, str]]] = {c: [] for c in classes}
            for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/{split}", recursive=True)):
                if info.type != pyarrow.fs.FileType.File or not info.base_name.lower().endswith(IMG_EXTENSIONS):
                    continue
                rel = info.path[len(base) + 1:]  # split/class/.../file
                parts = rel.split("/")
                if len(parts) >= 3 and parts[1] in by_class:
                    by_class[parts[1]].append((rel.rsplit("/", 1)[0], parts[-1]))
            files, labs = [], []
            for label, cls in enumerate(classes):
                if not by_class[cls]:
                    raise DataError(f"{name}: class folder '{shown}/{split}/{cls}' holds no image file "
                                    f"({', '.join(IMG_EXTENSIONS)}); remove it from train/ and val/ or add images")
                files += [f"{d}/{f}" for d, f in sorted(by_class[cls])]  # sorted(os.walk(...))'s order
                labs += [label] * len(by_class[cls])
            paths[split] = np.array([f.encode() for f in files], dtype=bytes)
            labels[split] = np.asarray(labs, dtype=np.int32)
        if check_headers and not _in_ray_worker():
            check_image_headers(uri, [p for split in SPLITS for p in paths[split]], name)
    except OSError as e:  # the store refused or could not be reached
        raise DataError(f"{name}: cannot list data root '{shown}' ({str(e).splitlines()[0]})") from None
    index = FolderIndex(uri, tuple(classes), paths, labels, time.perf_counter() - t0)
    _write_cached(index, {})
    log.info("%s: indexed %d train and %d val images of %d classes under '%s' in %.1fs (index cached at %s; a URI "
             "root is read as one immutable version: delete that file after changing its files in place)", name,
             len(labels["train"]), len(labels["val"]), len(classes), shown, index.scan_seconds, index_path(uri))
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
    return _same_classes({split: sorted(e.name for e in os.scandir(root / split) if e.is_dir()) for split in SPLITS},
                         root, name)


def _same_classes(found: dict[str, list[str]], root: Path | str, name: str) -> list[str]:
    if found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))
        only_val = sorted(set(found["val"]) - set(found["train"]))
        parts = [f"only in {s}/: {', '.join(x[:5])}{' ...' if len(x) > 5 else ''} ({len(x)})"
                 for s, x in (("train", only_train), ("val", only_val)) if x]
        raise DataError(f"{name}: train/ and val/ of '{root}' must hold the same class folders; {'; '.join(parts)}")
    if not found["train"]:
        raise DataError(f"{name}: '{root}/train' holds no class folder; expected {root}/train/<class>/*.JPEG")
    return found["train"]


def _walk_class(root: Path, split: str, cls: str, dir_mtimes: dict[str, int]) -> list[str]:
    """Relative paths of the class's image files, in ImageFolder's order; records every folder's mtime."""
    out = []
    for dirpath, _, filenames in sorted(os.walk(root / split / cls, followlinks=True)):
        rel_dir = os.path.relpath(dirpath, root)
        dir_mtimes[rel_dir] = os.stat(dirpath).st_mtime_ns
        out += [f"{rel_dir}/{f}" for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return out


def check_image_headers(root: Path | str, rel_paths: list[bytes], name: str = "imagefolder") -> None:
    """Opens each file with PIL, which reads its header only (format, size): a file it cannot identify is a one-line
    `DataError` naming it. Decoding every file would cost ~4 ms each (1.5 CPU-hours at ImageNet); this costs a few
    dozen microseconds per file (a ranged GET of an object) and runs once per dataset version."""
    files = Files(root)

    def identify(opened, path) -> tuple[str | None, bool]:
        """(the problem or None, whether PIL failed to read it: a header cut at 64 KiB can look like that)"""
        try:
            with opened as f, Image.open(f) as im:
                if im.width < 1 or im.height < 1:
                    return f"'{path}' has an empty image ({im.width}x{im.height})", False
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return (f"cannot read '{path}' as an image ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"), True
        return None, False

    def check(rel: bytes) -> str | None:
        path = files.name(rel)
        problem, unreadable = identify(files.header(rel), path)
        if unreadable and files.uri and files.longer_than_header(rel):  # a header past 64 KiB: read the whole object
            problem, _ = identify(contextlib.nullcontext(io.BytesIO(files.read(rel))), path)
        return problem

    with ThreadPoolExecutor(URI_HEADER_THREADS if files.uri else HEADER_THREADS) as pool:
        for problem in pool.map(check, rel_paths, chunksize=256):
            if problem is not None:
                raise DataError(f"{name}: {problem}; replace or remove that file")


def _read_cached(root: Path | str, classes: list[str] | None = None) -> FolderIndex | None:
    """The cached index of a local root whose folders kept their mtimes, or of a URI root (given without its query)
    whose class prefixes are `classes`."""
    path = index_path(root)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != INDEX_FORMAT or meta.get("root") != str(root):
                return None
            if classes is not None and meta["classes"] != classes:
                return None
            for rel, mtime in meta["dir_mtimes"].items():
                if os.stat(Path(root) / rel).st_mtime_ns != mtime:
                    return None
            return FolderIndex(root, tuple(meta["classes"]), {s: z[f"{s}_paths"] for s in SPLITS},
                               {s: z[f"{s}_labels"] for s in SPLITS}, 0.0)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # no index yet, a damaged one, or a folder gone: build it again


def _write_cached(index: FolderIndex, dir_mtimes: dict[str, int]) -> None:
    root = _public(index.root) if is_uri(index.root) else str(index.root)
    meta = {"format": INDEX_FORMAT, "root": root, "classes": list(index.classes), "dir_mtimes": dir_mtimes}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{f"{s}_paths": index.paths[s] for s in SPLITS}, **{f"{s}_labels": index.labels[s] for s in SPLITS})
    path = index_path(index.root)
    try:
        atomic_write_bytes(path, buf.getvalue())  # concurrent builders each write a whole file; the last one stays
    except OSError as e:  # a read-only cache: work on, slower (a full disk is a StorageFullError and stops the run)
        log.warning("could not cache the image index at '%s' (%s); it is rebuilt by each process", path, e)


class Files:
    """Reads the files of a root by relative path: a local folder directly, a URI through its pyarrow filesystem
    (opened lazily, once per process; not pickled)."""

    def __init__(self, root: Path | str) -> None:
        self.root, self.uri = root, is_uri(root)
        self._fs = None

    def _store(self):
        if self._fs is None:
            self._fs = open_uri(str(self.root))
        return self._fs

    def name(self, rel: bytes) -> str | Path:
        return f"{_public(str(self.root))}/{rel.decode()}" if self.uri else Path(self.root) / rel.decode()

    def read(self, rel: bytes) -> bytes:
        if not self.uri:
            return (Path(self.root) / rel.decode()).read_bytes()
        fs, base = self._store()
        with fs.open_input_stream(f"{base}/{rel.decode()}") as f:
            return f.read()

    @contextlib.contextmanager
    def header(self, rel: bytes):
        """A file object holding at least the file's header: the file itself, or an object's first 64 KiB."""
        if not self.uri:
            with open(Path(self.root) / rel.decode(), "rb") as f:
                yield f
            return
        fs, base = self._store()
        with fs.open_input_file(f"{base}/{rel.decode()}") as f:
            data = f.read(HEADER_BYTES)
        yield io.BytesIO(data)

    def longer_than_header(self, rel: bytes) -> bool:
        fs, base = self._store()
        return fs.get_file_info(f"{base}/{rel.decode()}").size > HEADER_BYTES

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}


class ImageFiles(Dataset):
    """One split of an ImageFolder root: items are ([0,1] float CHW resized and centre-cropped to `size`, label),
    decoded when asked for. A file that does not decode is a one-line `DataError` naming it."""

    streaming = True  # never materialised whole: `oodray.data.stack` refuses it without indices

    def __init__(self, root: Path | str, paths: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.root, self.paths, self.labels, self.size = root, paths, labels, size
        self.files = Files(root)
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
        rel = self.paths[i]
        path = self.files.name(rel)
        try:
            with Image.open(io.BytesIO(self.files.read(rel)) if self.files.uri else path) as im:
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
