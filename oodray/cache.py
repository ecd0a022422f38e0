"""The oblivious-attack cache: adversarial versions of the training split, crafted against C alone, once.

Every trial that uses the same classifier (by its weights), dataset split and attack config shares one cache
directory `<cache>/oblivious/<dataset>-<key>/`. On a multi-node cluster that directory must sit on a file system
every node mounts (NFS, EFS, Lustre): tasks write shards wherever they run and trainers read them wherever they run.

Format (`FORMAT`): shards of `SHARD_SIZE` images stored as raw uint8 bytes on the 1/255 grid (N x C x H x W, 1 byte
per pixel, a quarter of float32; the shape is in the manifest), each written atomically (temp file + rename) and
recorded with its size and sha256 in `manifest.json` only once complete, so an interrupted build leaves at most
unrecorded shards, which the next build regenerates, alone. Raw bytes are data only: nothing is ever unpickled from a
shard. A manifest of another format (the float16 torch shards of format 1) is not read: its shards are regenerated
and the old files removed.

Quantisation (`quantize`) never moves a pixel further from the clean image x than the attack did when x lies on the
1/255 grid (MNIST, Fashion-MNIST, CIFAR-10, ImageNet decoded by PIL): each pixel takes the grid neighbour of the
attacked value on x's side. Then every norm of the stored perturbation is at most the attack's, so the stored image
stays in the eps ball, Linf and L2 alike. For data off that grid (digits, synthetic) a pixel may have no grid point
that close; there the per-image Linf distance is bounded by max(attack's Linf distance, 1/510).

Building (`build_oblivious_cache`): the size is estimated first and refused with one line when the destination cannot
hold it; the missing shards are grouped into Ray tasks of `cache.shards_per_task` shards (one load of C per task,
the training split passed once through the object store, never re-scanned by a task), each task attacking
`cache.batch_size` images at a time (bounded memory) on the GPU it was granted (`cache.gpus_per_task`). Tasks are
generators: each shard is recorded as soon as it is written. The attack runs in float32: bf16 autocast would change
the sign of small gradient components of PGD steps, so the cached images would depend on the device.

Reading (`ObliviousCache`): an index maps to its shard and offset; one image is read with `os.pread` (memory O(image),
never O(dataset); no mapping keeps pages resident), from a small LRU of open shard files, each checked against its
sha256 (streamed) the first time this process opens it.

ray is imported inside the functions that use it, so that importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from oodray.attacks import attack_specs, mixed_attack
from oodray.attacks.common import memory_batch
from oodray.config import ExperimentConfig, data_identity
from oodray.data import load_dataset, stack
from oodray.errors import CheckpointError, StorageFullError
from oodray.io import (
    atomic_write_bytes,
    atomic_write_text,
    ensure_writable_dir,
    load_checkpoint,
    reading,
    sha256_file,
)
from oodray.models.classifier import classifier_from_state
from oodray.progress import Progress
from oodray.runtime import fast_layout, task_device, use_channels_last

log = logging.getLogger(__name__)
FORMAT = "oodray.oblivious-cache/2"  # raw uint8 shards; format 1 (no tag in the manifest) held float16 torch files
SHARD_SIZE = 512
MAX_OPEN_SHARDS = 8  # shard files a reader keeps open at once
GRID = 255
SNAP = 1e-4  # an attacked value within SNAP/255 of a grid point is that grid point (float32 rounding of x +- eps)


def weights_digest(classifier_state: dict[str, Any]) -> str:
    """sha256 of C's weights (tensor names, dtypes, shapes and bytes): the same C gives the same digest whatever else
    its file holds (timings), so a rebuilt identical classifier keeps its caches."""
    h = hashlib.sha256()
    for name, t in sorted(classifier_state["state_dict"].items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def attack_batch_size(cfg: ExperimentConfig, shape: tuple[int, ...] | None) -> int:
    """Images attacked at once by a cache task: `cache.batch_size`, or as many images of `shape` (C, H, W) as fit
    memory (`attacks.common.memory_batch`); at most a shard."""
    if cfg.cache.batch_size:
        return min(cfg.cache.batch_size, SHARD_SIZE)
    return memory_batch(shape, SHARD_SIZE) if shape else SHARD_SIZE


def image_shape(classifier_state: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the images C was built for, from its checkpoint: the shape of every cached image."""
    info = classifier_state["info"]
    return int(info["channels"]), *(int(v) for v in info["image_size"])


def cache_dir(cfg: ExperimentConfig, classifier_path: Path) -> Path:
    """`<cache>/oblivious/<dataset>-<key>`: the key covers C's weights, the data split and size, every attack setting,
    the seed and the attack batch size (each batch draws its own random starts), i.e. everything that changes the
    cached images."""
    a = cfg.attack
    state = load_checkpoint(classifier_path, what="classifier checkpoint")
    key_src = {
        "classifier_weights": weights_digest(state),
        "data": data_identity(cfg),  # with an ImageFolder's root: one C (e.g. pretrained weights) on two roots
        "attack": {"norm": a.norm, "eps": a.eps_values(), "attacks": list(a.attacks), "steps": a.steps},
        "seed": cfg.train.seed,
    }
    batch = attack_batch_size(cfg, image_shape(state) if "info" in state else None)
    if batch != SHARD_SIZE:  # a whole shard per batch: what format 1 did, so those keys stay as they were
        key_src["batch"] = batch
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.resolved_cache_dir() / "oblivious" / f"{cfg.data.name}-{key}"


# --- the stored format -----------------------------------------------------------------------------------------------


def quantize(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The attacked images `x_adv` of clean images `x` (both [0,1], NCHW) as uint8 on the 1/255 grid, never further
    from x than the attack: each value takes the grid neighbour of x_adv on x's side; where x is off the grid and no
    grid point is that close, the one nearest x, within each image's Linf attack radius or 1/510."""
    t, u = x_adv.detach().double().cpu() * GRID, x.detach().double().cpu() * GRID
    lo, hi = torch.floor(t + SNAP), torch.ceil(t - SNAP)  # the grid neighbours of t (equal when t is on the grid)
    q = torch.where((hi - u).abs() <= (lo - u).abs(), hi, lo)
    # Off the grid: keep |q - u| within the image's Linf radius (at least half a step, so the box holds a grid point).
    r = (t - u).abs().flatten(1).amax(1).clamp_min(0.5).view(-1, *([1] * (x.dim() - 1)))
    q = torch.minimum(torch.maximum(q, torch.ceil(u - r - SNAP)), torch.floor(u + r + SNAP))
    return q.clamp(0, GRID).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    return q.float() / GRID


def _read_manifest(d: Path) -> dict[str, Any]:
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"shards": {}}
    return m if isinstance(m, dict) and isinstance(m.get("shards"), dict) else {"shards": {}}


def _shard_file(d: Path, sid: str) -> Path:
    return d / f"shard-{sid}.u8"


def _shard_ok(d: Path, sid: str, entry: dict[str, Any] | None, verify: bool) -> bool:
    """A recorded shard whose file is there with its recorded size (and, with `verify`, its sha256)."""
    f = _shard_file(d, sid)
    if entry is None or not f.is_file() or f.stat().st_size != entry.get("bytes"):
        return False
    return not verify or sha256_file(f) == entry["sha256"]


# --- the plan: what is missing, how big, does it fit -----------------------------------------------------------------


@dataclasses.dataclass
class CachePlan:
    """What a build of one cache will write: the shards missing from `dir`, their size, where the size is checked."""

    dir: Path
    n: int
    shape: tuple[int, int, int]
    batch: int
    manifest: dict[str, Any]
    todo: list[tuple[str, int, int]]

    @property
    def todo_bytes(self) -> int:
        return sum(e - s for _, s, e in self.todo) * math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        return self.n * math.prod(self.shape)


def plan_oblivious_cache(cfg: ExperimentConfig, classifier_path: Path, n: int, verify: bool = True) -> CachePlan:
    """The shards of this config's cache (of a training split of `n` images) that are missing or partial; nothing
    is written. With `verify` every recorded shard is checked against its sha256 (streamed), else only its size."""
    shape = image_shape(load_checkpoint(classifier_path, what="classifier checkpoint"))
    batch = attack_batch_size(cfg, shape)
    d = cache_dir(cfg, classifier_path)
    manifest = _read_manifest(d)
    header = {"format": FORMAT, "n": n, "shard_size": SHARD_SIZE, "batch_size": batch, "shape": list(shape)}
    if any(manifest.get(k) != v for k, v in header.items()):
        manifest = {"shards": {}, "stale": manifest.get("format") != FORMAT}  # another format or layout: regenerate
    manifest.update(header)
    todo = [(f"{i:05d}", s, min(n, s + SHARD_SIZE)) for i, s in enumerate(range(0, n, SHARD_SIZE))
            if not _shard_ok(d, f"{i:05d}", manifest["shards"].get(f"{i:05d}"), verify)]
    return CachePlan(d, n, shape, batch, manifest, todo)


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_space(plans: list[CachePlan]) -> None:
    """Refuses (one `StorageFullError` line) builds whose missing shards do not fit the free space of their file
    system, counted together per file system, with one shard of headroom per plan (a task's temp file)."""
    need: dict[int, tuple[int, Path]] = {}
    for p in plans:
        if not p.todo:
            continue
        where = _existing_parent(p.dir)
        dev = where.stat().st_dev
        extra = p.todo_bytes + SHARD_SIZE * math.prod(p.shape)
        need[dev] = (need.get(dev, (0, where))[0] + extra, need.get(dev, (0, where))[1])
    for total, where in need.values():
        free = shutil.disk_usage(where).free
        if total > free:
            raise StorageFullError(
                f"the oblivious cache needs {_gb(total)} under '{where}' but only {_gb(free)} is free; free space, "
                "point --cache-dir at a larger (on a cluster: shared) file system, or train without a cache "
                "(--set train.regime=adaptive)")


def _gb(b: float) -> str:
    """A byte count for people: 174 GB, 25.6 kB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def check_cache_space(cfgs: list[ExperimentConfig], classifier_paths: list[Path], n: int) -> list[CachePlan]:
    """The plans of several caches of a training split of `n` images (e.g. every attack variant a search may pick),
    refused together when they do not fit: what CLIs call before Ray starts. Only file sizes are looked at here (the
    build checks checksums)."""
    plans = [plan_oblivious_cache(c, p, n, verify=False) for c, p in zip(cfgs, classifier_paths)]
    for p in plans:
        if p.todo:
            log.info("oblivious cache %s: %d of %d images to generate, %s on disk (uint8)", p.dir,
                     sum(e - s for _, s, e in p.todo), p.n, _gb(p.todo_bytes))
    check_space(plans)
    return plans


# --- building --------------------------------------------------------------------------------------------------------


def _chunk_seed(cfg: ExperimentConfig, start: int) -> int:
    return cfg.train.seed * 100_003 + start


def attack_chunk(cfg: ExperimentConfig, classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, start: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The cached (uint8) images of training examples [start, start + len(x)): one seeded attack batch."""
    g = torch.Generator().manual_seed(_chunk_seed(cfg, start))
    x_adv = mixed_attack(classifier, x.to(device), y.to(device), attack_specs(cfg), generator=g)
    return quantize(x, x_adv)


def _generate_shards(cfg_dict: dict[str, Any], classifier_state: dict[str, Any], train: Dataset,
                     shards: list[tuple[str, int, int]], out: str, batch: int) -> Any:
    """Ray task (a generator): load C once, then attack each shard `batch` images at a time and write it atomically;
    yields (shard id, start, stop, sha256, bytes) per shard, so the driver records each as soon as it exists."""
    cfg = ExperimentConfig.from_dict(cfg_dict)
    device = task_device(cfg.cache.gpus_per_task, cfg.cache.cpus_per_task)
    layout = use_channels_last(cfg.train.channels_last, device, train[0][0].shape[-2:])
    classifier = fast_layout(classifier_from_state(classifier_state).to(device), layout)
    for sid, start, stop in shards:
        parts = []
        for s in range(start, stop, batch):
            x, y = stack(train, range(s, min(stop, s + batch)))
            parts.append(attack_chunk(cfg, classifier, x, y, s, device))
        data = torch.cat(parts).contiguous().numpy().tobytes()
        atomic_write_bytes(_shard_file(Path(out), sid), data)
        yield sid, start, stop, hashlib.sha256(data).hexdigest(), len(data)


def _estimate_seconds(cfg: ExperimentConfig, state: dict[str, Any], train: Dataset, plan: CachePlan) -> float:
    """CPU seconds per image of this attack, measured on a few training images on the driver after one warm-up image
    (a rough figure: GPU tasks are much faster, larger batches somewhat faster per image)."""
    k = min(4, plan.n)
    x, y = stack(train, range(k))
    layout = use_channels_last(cfg.train.channels_last, "cpu", x.shape[-2:])  # as CPU tasks will run it
    classifier = fast_layout(classifier_from_state(state), layout)
    attack_chunk(cfg, classifier, x[:1], y[:1], 0)
    t0 = time.perf_counter()
    attack_chunk(cfg, classifier, x, y, 0)
    return (time.perf_counter() - t0) / k


def build_oblivious_cache(cfg: ExperimentConfig, classifier_path: Path, train: Dataset | None = None,
                          verify: bool = True) -> tuple[Path, int]:
    """Generates the shards that are missing or partial (as Ray tasks); returns (directory, shards generated).
    `train` is the training split when the caller has it (else it is loaded once here); `verify` checks every
    recorded shard's sha256 (streamed), else only its size (trials of a search whose caches were just verified)."""
    import ray

    if train is None and not verify:  # a trial: a complete cache is read without loading (scanning) the dataset
        m = _read_manifest(cache_dir(cfg, classifier_path))
        if m.get("format") == FORMAT and isinstance(m.get("n"), int):
            plan = plan_oblivious_cache(cfg, classifier_path, m["n"], verify=False)
            if not plan.todo:
                return plan.dir, 0
    if train is None:
        train = load_dataset(cfg.data).train
    plan = plan_oblivious_cache(cfg, classifier_path, len(train), verify=verify)
    d = plan.dir
    if not plan.todo:
        log.info("oblivious cache %s complete (%d examples); nothing to generate", d, plan.n)
        return d, 0
    check_space([plan])
    ensure_writable_dir(d, "oblivious cache directory")
    if plan.manifest.pop("stale", False):
        for old in d.glob("shard-*.pt"):  # format 1's float16 torch files, never read again
            old.unlink(missing_ok=True)
    state = load_checkpoint(classifier_path, what="classifier checkpoint")
    n_todo = sum(e - s for _, s, e in plan.todo)
    per_image = _estimate_seconds(cfg, state, train, plan)
    c = cfg.cache
    slots = ray.cluster_resources().get("GPU" if c.gpus_per_task > 0 else "CPU", 1.0) / (
        c.gpus_per_task if c.gpus_per_task > 0 else c.cpus_per_task)
    if slots < 1:
        log.warning("cache tasks ask for %g GPU each and the cluster has no GPU now: they wait until a GPU node "
                    "joins (set cache.gpus_per_task=0 to build on CPUs)", c.gpus_per_task)
    per_task = max(1, min(c.shards_per_task, math.ceil(len(plan.todo) / max(1.0, slots))))
    groups = [plan.todo[i:i + per_task] for i in range(0, len(plan.todo), per_task)]
    log.info("oblivious cache %s: generating %d of %d shards (%d images, %s uint8) in %d Ray tasks of up to %d "
             "shards, batches of %d; ~%.2g CPU-hours at %.3g CPU-s per image measured here on CPU", d, len(plan.todo),
             math.ceil(plan.n / SHARD_SIZE), n_todo, _gb(plan.todo_bytes), len(groups), per_task, plan.batch,
             n_todo * per_image / 3600, per_image)
    state_ref, train_ref = ray.put(state), ray.put(train)
    # DEFAULT scheduling: inside a Tune trial, tasks must not be captured by the trial's placement group.
    task = ray.remote(num_cpus=c.cpus_per_task, num_gpus=c.gpus_per_task, max_retries=2,
                      scheduling_strategy="DEFAULT")(_generate_shards)
    pending = [task.remote(cfg.to_dict(), state_ref, train_ref, group, str(d), plan.batch) for group in groups]
    manifest = plan.manifest
    bar = Progress("oblivious cache", total=n_todo, unit="img")
    while pending:
        ready, _ = ray.wait(pending, num_returns=1)
        try:
            ref = next(ready[0])
        except StopIteration:
            pending.remove(ready[0])
            continue
        sid, s, e, sha, size = ray.get(ref)
        manifest["shards"][sid] = {"sha256": sha, "bytes": size, "start": s, "stop": e}
        atomic_write_text(d / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        bar.update(e - s)
    return d, len(plan.todo)


def ensure_oblivious_cache(cfg: ExperimentConfig, classifier_path: Path, train: Dataset | None = None,
                           ) -> ObliviousCache:
    """The cached oblivious OOD images of the training split (a lazy reader), generating missing shards first."""
    return ObliviousCache(build_oblivious_cache(cfg, classifier_path, train)[0])


# --- reading ---------------------------------------------------------------------------------------------------------


class ObliviousCache:
    """The cached images of a complete cache directory, by training index, as float [0,1] CHW tensors.

    Each item is one `os.pread` of C x H x W bytes from its shard file; at most `max_open` shard files stay open
    (least recently used closed first), so a reader holds O(image) memory whatever the dataset's size, and no mapped
    pages stay resident. Each shard's sha256 is checked (streamed) the first time this process opens it. Picklable
    (DataLoader workers, Ray): open files are not carried along.
    """

    def __init__(self, directory: str | Path, max_open: int = MAX_OPEN_SHARDS) -> None:
        self.dir, self.max_open = Path(directory), max(1, max_open)
        m = _read_manifest(self.dir)
        if m.get("format") != FORMAT:
            raise CheckpointError(f"oblivious cache '{self.dir}' is not a complete cache of format {FORMAT}; build it "
                                  "with oodray.cache.build_oblivious_cache (oodray.train and oodray.tune do)")
        with reading(self.dir / "manifest.json"):
            self.n, self.shard_size = int(m["n"]), int(m["shard_size"])
            self.shape = tuple(int(v) for v in m["shape"])
            self.entries = m["shards"]
        self.image_bytes = math.prod(self.shape)
        missing = [f"{i:05d}" for i in range(math.ceil(self.n / self.shard_size)) if f"{i:05d}" not in self.entries]
        if missing:
            raise CheckpointError(f"oblivious cache '{self.dir}' misses {len(missing)} shards (first: {missing[0]}); "
                                  "its build did not finish: run the same command again to complete it")
        self._open: OrderedDict[str, int] = OrderedDict()  # shard id -> open file descriptor
        self._verified: set[str] = set()
        self.opens = 0  # shard files opened so far (the LRU's misses)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for an oblivious cache of {self.n} images")
        sid = f"{i // self.shard_size:05d}"
        fd = self._fd(sid)
        j = i - int(self.entries[sid]["start"])
        data = os.pread(fd, self.image_bytes, j * self.image_bytes)
        if len(data) != self.image_bytes:
            raise CheckpointError(f"oblivious cache shard '{_shard_file(self.dir, sid)}' ends before image {i}; "
                                  "delete the cache directory to rebuild it")
        return dequantize(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.shape))

    def _fd(self, sid: str) -> int:
        if sid in self._open:
            self._open.move_to_end(sid)
            return self._open[sid]
        entry, path = self.entries[sid], _shard_file(self.dir, sid)
        expect = (int(entry["stop"]) - int(entry["start"])) * self.image_bytes
        try:
            size = path.stat().st_size
        except OSError:
            raise CheckpointError(f"oblivious cache shard '{path}' does not exist; run the same command again to "
                                  "rebuild it") from None
        if size != expect or (sid not in self._verified and sha256_file(path) != entry["sha256"]):
            raise CheckpointError(f"oblivious cache shard '{path}' does not match its recorded size and checksum "
                                  "(partial or altered write); run the same command again to rebuild it")
        self._verified.add(sid)
        self.opens += 1
        self._open[sid] = os.open(path, os.O_RDONLY)
        while len(self._open) > self.max_open:
            os.close(self._open.popitem(last=False)[1])
        return self._open[sid]

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}

    @property
    def open_shards(self) -> int:
        return len(self._open)
