"""The oblivious-attack cache: adversarial versions of the training split, crafted against C alone, once.

Every trial that uses the same classifier (by checksum), dataset split and attack config shares one cache
directory `<cache>/oblivious/<dataset>-<key>/`. Shards are generated as Ray tasks (submitted together, drained
with `ray.wait`); each shard is written atomically (temp file + rename) and recorded with its sha256 in
`manifest.json` only once complete, so an interrupted run leaves at most partial shards, which the next run
detects (missing entry or checksum mismatch) and regenerates, alone. Imports attacks and data, never train.

ray is imported inside the functions that use it, so that importing this module stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from oodray.attacks import attack_specs, mixed_attack
from oodray.config import ExperimentConfig
from oodray.data import load_dataset, stack
from oodray.io import atomic_write_text, ensure_writable_dir, load_checkpoint, save_checkpoint
from oodray.models.classifier import classifier_from_state
from oodray.progress import Progress

log = logging.getLogger(__name__)
SHARD_SIZE = 512


def weights_digest(classifier_state: dict[str, Any]) -> str:
    """sha256 of C's weights (tensor names, dtypes, shapes and bytes): the same C gives the same digest whatever else
    its file holds (timings), so a rebuilt identical classifier keeps its caches."""
    h = hashlib.sha256()
    for name, t in sorted(classifier_state["state_dict"].items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_dir(cfg: ExperimentConfig, classifier_path: Path) -> Path:
    """`<cache>/oblivious/<dataset>-<key>`: the key covers C's weights, the data split and size, every attack setting
    and the seed, i.e. everything that changes the cached images."""
    a = cfg.attack
    key_src = {
        "classifier_weights": weights_digest(load_checkpoint(classifier_path, what="classifier checkpoint")),
        "data": {"name": cfg.data.name, "seed": cfg.data.seed, "val_fraction": cfg.data.val_fraction,
                 "image_size": cfg.data.image_size},
        "attack": {"norm": a.norm, "eps": a.eps_values(), "attacks": list(a.attacks), "steps": a.steps},
        "seed": cfg.train.seed,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.resolved_cache_dir() / "oblivious" / f"{cfg.data.name}-{key}"


def _read_manifest(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"shards": {}}


def _shard_ok(d: Path, sid: str, entry: dict[str, Any] | None) -> bool:
    f = d / f"shard-{sid}.pt"
    if entry is None or not f.is_file():
        return False
    return hashlib.sha256(f.read_bytes()).hexdigest() == entry["sha256"]


def _generate_shard(cfg_dict: dict[str, Any], classifier_state: Any, start: int, stop: int, out: str) -> str:
    """Ray task: attack training examples [start, stop) against C alone and write them atomically."""
    import ray

    cfg = ExperimentConfig.from_dict(cfg_dict)
    state = ray.get(classifier_state) if isinstance(classifier_state, ray.ObjectRef) else classifier_state
    classifier = classifier_from_state(state)
    x, y = stack(load_dataset(cfg.data).train, range(start, stop))
    g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + start)
    x_adv = mixed_attack(classifier, x, y, attack_specs(cfg), generator=g)
    return save_checkpoint({"x_adv": x_adv.half(), "start": start, "stop": stop}, out)


def ensure_oblivious_cache(cfg: ExperimentConfig, classifier_path: Path) -> torch.Tensor:
    """The cached oblivious OOD images for the training split (float16, split order), generating missing shards."""
    return load_oblivious_cache(build_oblivious_cache(cfg, classifier_path)[0])


def build_oblivious_cache(cfg: ExperimentConfig, classifier_path: Path) -> tuple[Path, int]:
    """Generates the shards that are missing or partial (as Ray tasks); returns (directory, shards generated)."""
    import ray

    d = ensure_writable_dir(cache_dir(cfg, classifier_path), "oblivious cache directory")
    n = len(load_dataset(cfg.data).train)
    manifest = _read_manifest(d)
    if manifest.get("n") not in (None, n) or manifest.get("shard_size") not in (None, SHARD_SIZE):
        manifest = {"shards": {}}
    manifest.update(n=n, shard_size=SHARD_SIZE)
    todo = [(f"{i:05d}", s, min(n, s + SHARD_SIZE)) for i, s in enumerate(range(0, n, SHARD_SIZE))
            if not _shard_ok(d, f"{i:05d}", manifest["shards"].get(f"{i:05d}"))]
    if not todo:
        log.info("oblivious cache %s complete (%d examples); nothing to generate", d, n)
        return d, 0
    log.info("oblivious cache %s: generating %d of %d shards as Ray tasks", d, len(todo),
             (n + SHARD_SIZE - 1) // SHARD_SIZE)
    state_ref = ray.put(load_checkpoint(classifier_path, what="classifier checkpoint"))
    # DEFAULT scheduling: inside a Tune trial, tasks must not be captured by the trial's placement group.
    task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="DEFAULT")(_generate_shard)
    pending = {task.remote(cfg.to_dict(), state_ref, s, e, str(d / f"shard-{sid}.pt")): (sid, s, e)
               for sid, s, e in todo}
    bar = Progress("oblivious cache", total=sum(e - s for _, s, e in todo), unit="img")
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        sid, s, e = pending.pop(done[0])
        manifest["shards"][sid] = {"sha256": ray.get(done[0]), "start": s, "stop": e}
        atomic_write_text(d / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        bar.update(e - s)
    return d, len(todo)


def load_oblivious_cache(d: Path) -> torch.Tensor:
    manifest = _read_manifest(d)
    parts = []
    for sid in sorted(manifest["shards"]):
        entry = manifest["shards"][sid]
        parts.append(load_checkpoint(d / f"shard-{sid}.pt", what="oblivious cache shard",
                                     sha256=entry["sha256"])["x_adv"])
    x = torch.cat(parts)
    if len(x) != manifest["n"]:
        raise RuntimeError(f"oblivious cache {d} holds {len(x)} examples, expected {manifest['n']}")
    return x
