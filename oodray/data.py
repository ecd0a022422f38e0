"""Datasets by name, every one yielding float NCHW tensors in [0,1], with fixed seeded splits and eval subsets.

- `digits`: scikit-learn's 1,797 real 8x8 digits (the embedded default; always offline).
- `fashion-mnist`: IDX files from `data.data_dir`, else `/usr/share/datasets/fashion-mnist` (Debian's
  `dataset-fashion-mnist`), else torchvision's download when `data.download` is true.
- `mnist`, `cifar10`: torchvision datasets read from `data.data_dir` (downloaded only when `data.download`).
- `imagefolder` (also named `imagenet`): any ImageFolder root at `data.data_dir` (`train/`, `val/` with the same
  class folders), resized and centre-cropped to `data.image_size`, decoded per item (`oodray.imagefolder`).

The registry declares which datasets are held in memory (`dataset(name, in_memory=True)`: digits, MNIST-likes,
CIFAR-10, synthetic) and which are streamed from files (ImageFolder); a streamed split is never stacked whole.
- `synthetic`: tiny class-patterned random images, for tests.

Splits: the official test split where one exists (else a seeded 20% of the data); validation is a seeded
`data.val_fraction` of the training split. `eval_indices(n, k, seed)` is the first k of a seeded permutation
(numpy's PCG64, stable across runs, machines and versions), so evaluation subsets never drift.

scikit-learn and torchvision are imported by the datasets that need them (heavy imports).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from oodray.errors import DataError
from oodray.imagefolder import ImageFiles, load_index
from oodray.registry import Registry

if TYPE_CHECKING:  # annotations only: the config package resolves dataset names through this module
    from oodray.config.schema import DataConfig

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")
IN_MEMORY: set[str] = set()  # datasets whose splits are tensors in RAM; every other one is streamed from files
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Splits:
    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset


class TensorImages(Dataset):
    """Images held in memory (uint8 or float) with integer labels; items are ([0,1] float CHW, int)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> None:
        if images.ndim != 4:
            raise DataError(f"images must be NCHW, got shape {tuple(images.shape)}")
        self.images, self.labels, self.scale = images, labels.long(), scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() * self.scale, int(self.labels[i])


def dataset(name: str, *, in_memory: bool) -> Callable[[Callable[..., Splits]], Callable[..., Splits]]:
    """Registers a dataset builder, declaring whether its splits live in RAM (small: digits, MNIST-likes, CIFAR) or
    are streamed from files (ImageFolder), which nothing may materialise whole (`stack` refuses it)."""
    def deco(fn: Callable[..., Splits]) -> Callable[..., Splits]:
        DATASETS.register(name)(fn)
        if in_memory:
            IN_MEMORY.add(name)
        return fn

    return deco


def is_in_memory(name: str) -> bool:
    DATASETS.get(name)  # an unknown name is a ConfigError listing the known ones
    return name in IN_MEMORY


def is_streamed(ds: Dataset) -> bool:
    """Whether a split (or a Subset of one) is read from files item by item."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return bool(getattr(ds, "streaming", False))


def load_dataset(cfg: DataConfig) -> Splits:
    """Builds the named dataset's splits; a missing dataset is a one-line `DataError` saying where it looked."""
    return DATASETS.get(cfg.name)(cfg)


def stack(ds: Dataset, indices: np.ndarray | list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialises (images, labels) of a dataset (or of the given indices) as tensors. A streamed split is only
    ever stacked at given indices (a batch, a shard, an evaluation subset), never whole."""
    if indices is None and is_streamed(ds):
        raise DataError(f"refusing to load all {len(ds)} images of a streamed split into memory; take a subset "
                        "(eval_subset) or iterate it with a DataLoader")
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorImages):
        base = ds.dataset
        idx = np.asarray(ds.indices) if indices is None else np.asarray(ds.indices)[np.asarray(indices)]
        return base.images[idx].float() * base.scale, base.labels[idx]
    if isinstance(ds, TensorImages):
        idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
        return ds.images[idx].float() * ds.scale, ds.labels[idx]
    idx = range(len(ds)) if indices is None else indices
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def eval_indices(n: int, k: int, seed: int) -> np.ndarray:
    """First k of a seeded permutation of range(n): the fixed evaluation subset."""
    if k > n:
        raise DataError(f"n-examples={k} is larger than the evaluation split ({n} images); use at most {n}")
    return np.random.default_rng(seed).permutation(n)[:k]


def eval_subset(ds: Dataset, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation subset of a split: stable across runs and machines for a given (k, seed)."""
    return stack(ds, eval_indices(len(ds), k, seed))


def _split_train_val(train: Dataset, cfg: DataConfig) -> tuple[Subset, Subset]:
    perm = np.random.default_rng(cfg.seed).permutation(len(train))
    n_val = max(1, int(round(cfg.val_fraction * len(train))))
    return Subset(train, perm[n_val:].tolist()), Subset(train, perm[:n_val].tolist())


# --- digits: the embedded default ----------------------------------------------------------------------------------


@dataset("digits", in_memory=True)
def _digits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = np.random.default_rng(cfg.seed).permutation(len(y))
    n_test = int(round(0.2 * len(y)))
    test_idx, rest = perm[:n_test], perm[n_test:]
    n_val = max(1, int(round(cfg.val_fraction * len(rest))))
    full = TensorImages(x, y)
    info = DatasetInfo("digits", 10, 1, (8, 8), (0.3053,), (0.3760,))
    return Splits(info, Subset(full, rest[n_val:].tolist()), Subset(full, rest[:n_val].tolist()),
                  Subset(full, test_idx.tolist()))


# --- MNIST-likes ---------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST; any damage is a one-line
    `DataError` naming the file (a cut or corrupt deflate stream raises zlib.error/EOFError, not OSError)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read '{path}': {e or type(e).__name__} (a damaged or partly downloaded file: "
                        "replace it)") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"'{path}' is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"'{path}' is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_dir(root: Path) -> Path | None:
    for d in (root, root / "raw", root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "MNIST" / "raw"):
        if all((d / f).exists() or (d / f"{f}.gz").exists() for pair in _IDX_FILES.values() for f in pair):
            return d
    return None


def _missing_idx_files(d: Path) -> list[str]:
    return [f for pair in _IDX_FILES.values() for f in pair if not (d / f).exists() and not (d / f"{f}.gz").exists()]


def _load_idx_split(d: Path, split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    def path(stem: str) -> Path:
        return d / f"{stem}.gz" if (d / f"{stem}.gz").exists() else d / stem

    ipath, lpath = (path(s) for s in _IDX_FILES[split])
    images, labels = read_idx(ipath), read_idx(lpath)
    if labels.ndim != 1:
        raise DataError(f"'{lpath}' holds {labels.ndim}-d labels; expected one label per image (1-d)")
    if len(images) != len(labels):
        raise DataError(f"'{d}': {len(images)} {split} images but {len(labels)} labels")
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"'{lpath}' holds label {int(labels[bad])} at index {bad}; labels must be in "
                        f"0..{num_classes - 1}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _mnist_like(cfg: DataConfig, info: DatasetInfo, dirs: list[Path], tv_name: str) -> Splits:
    """IDX files from the first of `dirs` holding them. An explicit data dir is the only place looked (the caller
    passes it alone): one that does not hold the data is an error naming it, never a fallback to another copy."""
    tried = []
    for d in dirs:
        found = _find_idx_dir(d)
        tried.append(str(d))
        if found is not None:
            (xtr, ytr), (xte, yte) = (_load_idx_split(found, s, info.num_classes) for s in ("train", "test"))
            break
    else:
        if cfg.data_dir and not cfg.download:
            expected = ", ".join(f for pair in _IDX_FILES.values() for f in pair)
            raise DataError(f"{info.name} not found in data directory '{cfg.data_dir}' (given explicitly, so no other "
                            f"copy is used): expected the IDX files {expected} (each optionally .gz) in it or in "
                            f"raw/, FashionMNIST/raw/ or MNIST/raw/; missing there: "
                            f"{', '.join(_missing_idx_files(Path(cfg.data_dir)))}")
        if not cfg.download:
            raise DataError(f"{info.name} not found (looked in: {', '.join(tried) or 'no directory given'}); "
                            f"pass --data-dir with its IDX files, or allow torchvision's download (data.download=true)")
        import torchvision

        root = Path(cfg.data_dir or Path.home() / ".cache" / "oodray" / "data")
        ds_cls = getattr(torchvision.datasets, tv_name)
        try:
            tr, te = ds_cls(root, train=True, download=True), ds_cls(root, train=False, download=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"{info.name}: torchvision download into '{root}' failed ({e})") from None
        xtr, ytr, xte, yte = tr.data.unsqueeze(1), tr.targets, te.data.unsqueeze(1), te.targets
    for x in (xtr, xte):
        if tuple(x.shape[1:]) != (1, 28, 28):
            raise DataError(f"{info.name}: images have shape {tuple(x.shape[1:])}, expected (1, 28, 28)")
    train, val = _split_train_val(TensorImages(xtr, ytr, 1 / 255), cfg)
    return Splits(info, train, val, TensorImages(xte, yte, 1 / 255))


@dataset("fashion-mnist", in_memory=True)
def _fashion_mnist(cfg: DataConfig) -> Splits:
    info = DatasetInfo("fashion-mnist", 10, 1, (28, 28), (0.2860,), (0.3530,))
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data directory '{cfg.data_dir}' does not exist")
    # An explicit data dir is the only place looked: the system copy is used only when none is given.
    dirs = [Path(cfg.data_dir)] if cfg.data_dir else [DEBIAN_FASHION_MNIST]
    return _mnist_like(cfg, info, dirs, "FashionMNIST")


@dataset("mnist", in_memory=True)
def _mnist(cfg: DataConfig) -> Splits:
    info = DatasetInfo("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,))
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data directory '{cfg.data_dir}' does not exist")
    return _mnist_like(cfg, info, [Path(cfg.data_dir)] if cfg.data_dir else [], "MNIST")


# --- CIFAR-10 ------------------------------------------------------------------------------------------------------


@dataset("cifar10", in_memory=True)
def _cifar10(cfg: DataConfig) -> Splits:
    import torchvision

    info = DatasetInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    if not cfg.data_dir and not cfg.download:
        raise DataError("cifar10 needs --data-dir (a folder holding cifar-10-batches-py/), or data.download=true")
    root = Path(cfg.data_dir or Path.home() / ".cache" / "oodray" / "data")
    if cfg.data_dir and not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist")
    try:
        tr = torchvision.datasets.CIFAR10(root, train=True, download=cfg.download)
        te = torchvision.datasets.CIFAR10(root, train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataError(f"cifar10 not found in '{root}' ({str(e).splitlines()[0]}); it must hold "
                        "cifar-10-batches-py/ (the python version), or pass data.download=true") from None
    except Exception as e:  # noqa: BLE001 - corrupt pickles/network errors
        raise DataError(f"cifar10 in '{root}' could not be read ({type(e).__name__}: {e})") from None

    def to_tensor(ds: object) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    (xtr, ytr), (xte, yte) = to_tensor(tr), to_tensor(te)
    train, val = _split_train_val(TensorImages(xtr, ytr, 1 / 255), cfg)
    return Splits(info, train, val, TensorImages(xte, yte, 1 / 255))


# --- ImageFolder (ImageNet): streamed from disk -------------------------------------------------------------------


def _imagefolder(cfg: DataConfig) -> Splits:
    """Any ImageFolder root with train/ and val/ (same class folders), decoded per item; the index is cached."""
    if not cfg.data_dir:
        raise DataError(f"{cfg.name} needs --data-dir pointing at a folder with train/ and val/, one subfolder per "
                        "class")
    index = load_index(cfg.data_dir, name=cfg.name)
    size = cfg.image_size
    train_full, test = (ImageFiles(index.root, index.paths[s], index.labels[s], size) for s in ("train", "val"))
    mean_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet's, as torchvision's weights expect
    info = DatasetInfo(cfg.name, len(index.classes), 3, (size, size), *mean_std)
    train, val = _split_train_val(train_full, cfg)
    return Splits(info, train, val, test)


for _name in ("imagefolder", "imagenet"):
    dataset(_name, in_memory=False)(_imagefolder)


# --- synthetic: tiny class-patterned data for tests ----------------------------------------------------------------


@dataset("synthetic", in_memory=True)
def _synthetic(cfg: DataConfig) -> Splits:
    """10 classes, 1x8x8: a fixed random prototype per class plus noise; learnable in a few steps."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(10, 1, 8, 8, generator=g)
    n = 600
    y = torch.arange(n) % 10
    x = (0.7 * protos[y] + 0.3 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    full = TensorImages(x, y)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    info = DatasetInfo("synthetic", 10, 1, (8, 8), (0.5,), (0.25,))
    return Splits(info, Subset(full, perm[200:].tolist()), Subset(full, perm[100:200].tolist()),
                  Subset(full, perm[:100].tolist()))
