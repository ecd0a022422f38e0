"""Names derived from a config, deterministic across runs and machines: `config_hash` (run and experiment names) and
`classifier_key` (the fixed classifier's cache directory), which covers everything that changes C's weights."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from oodray.config.schema import ClassifierConfig, ExperimentConfig

LOADER_KEYS = ("loader_workers", "prefetch_factor", "pin_memory", "persistent_workers")
LAYOUT_KEYS = ("channels_last",)  # train.*: how tensors lie in memory changes float rounding, not the experiment
LOGGING_KEYS = ("ray_log_level",)  # train.*: what the console shows


def config_hash(cfg: ExperimentConfig, sections: tuple[str, ...] = ("data", "classifier", "translator", "loss",
                                                                        "attack", "train")) -> str:
    """A short digest of the given sections: the deterministic part of run and experiment names."""
    d = cfg.to_dict()
    for key in LOADER_KEYS:  # how batches are fed changes no result: a run resumes whatever the loader settings
        d["data"].pop(key)
    # nor does the memory layout or what the console shows (names from before these keys existed stay valid)
    for key in (*LAYOUT_KEYS, *LOGGING_KEYS):
        d["train"].pop(key)
    blob = json.dumps({k: d[k] for k in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def data_identity(cfg: ExperimentConfig) -> dict[str, object]:
    """The data settings that decide which images C and the oblivious cache see: the split and size, and for a
    streamed dataset (an ImageFolder root: any folder or URI) the root itself. Two roots under one dataset name are two
    datasets; an in-memory dataset is fixed by its name (keys from before roots counted stay valid)."""
    from oodray.data import is_in_memory  # oodray.data imports the config package

    d = cfg.data
    out: dict[str, object] = {"name": d.name, "seed": d.seed, "val_fraction": d.val_fraction,
                              "image_size": d.image_size}
    if d.data_dir and not is_in_memory(d.name):
        out["root"] = (d.data_dir.split("?", 1)[0].rstrip("/") if "://" in d.data_dir  # options, keys: not identity
                       else str(Path(d.data_dir).expanduser().resolve()))
    return out


def classifier_key(cfg: ExperimentConfig) -> str:
    """The name of the fixed classifier this config trains (and of its cache directory): readable, then a digest of
    every setting that changes C's weights (data split, size and, for a streamed dataset, its root; every
    classifier.* key, the adversarial threat model, and the content of a weights file), so a cached C is reused only
    by runs that would train the same one."""
    c, d = cfg.classifier, cfg.data
    adv_eps = c.adv_eps or cfg.attack.eps
    src = {"data": data_identity(cfg),
           "classifier": {**_recipe(c), "weights": _file_digest(c.weights)},
           "adversarial": {"norm": cfg.attack.norm, "eps": adv_eps} if c.adversarial != "none" else None}
    digest = hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:8]
    key = f"{d.name}-{c.arch}-seed{c.seed}"
    if c.adversarial != "none":
        key += f"-{c.adversarial}-{cfg.attack.norm}-eps{adv_eps:.4g}"
    return f"{key}-{digest}"


EXECUTION_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker")  # where C trains, not what it learns


def _recipe(c: ClassifierConfig) -> dict[str, object]:
    """classifier.* in the key. Where C trains enters only when not the default (in-process): a key from before
    those settings existed stays valid, and C trained by N DDP workers (other batches) is another C."""
    d = dataclasses.asdict(c)
    if d["workers"] == 0:
        for k in EXECUTION_KEYS:
            d.pop(k)
    else:
        d.pop("cpus_per_worker")  # CPU threads do not change the weights
        d.pop("gpus_per_worker")  # nor does the device (up to float rounding)
    return d


def _file_digest(path: str | None) -> str | None:
    """sha256 of a weights file's bytes (the name when it is not a local file: a weights name, or not there yet)."""
    if path is None or not Path(path).expanduser().is_file():
        return path
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _sha256_file(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the cache: a changed file rehashes
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
