"""What an evaluation computes and what it may reuse: inputs loaded and validated on the driver, the fixed blocks and
shards of the evaluation subset, the result files (one per threat model, norm and eps) and their fingerprints.

Determinism: pyautoattack reseeds torch on every perturb() call and draws random starts of the whole batch's shape, so a
point's attack depends on which points share its batch (seen: the same 16 points attacked as one batch or as two
batches of 8 get adversarial images up to 2 eps apart). The evaluation subset is therefore cut into fixed blocks of
consecutive examples, each attacked on its own (one AutoAttack cascade, one batch per attack), and a shard is a
contiguous run of whole blocks. The block size depends only on n_examples and `eval.batch_size` (`tasks.block_size`), so
every model call sees the same blocks whatever the number of shards, and the merged flags equal a single-process run
(shards=1) bit for bit. Finished results are reused; one made by a different evaluation is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodray.config import ExperimentConfig, classifier_key
from oodray.data import eval_subset, load_dataset
from oodray.errors import ConfigError, OodrayError
from oodray.evaluate.tasks import block_size, is_stochastic
from oodray.fixed_classifier import get_classifier, surrogate_config
from oodray.io import atomic_write_text, load_checkpoint
from oodray.models.defended import build_defended
from oodray.models.translator import CHECKPOINT_FILE, load_translator_checkpoint

log = logging.getLogger(__name__)
RESULT_FORMAT = "oodray.eval/1"
BASELINES = ("identity", "bitdepth")  # translators that need no checkpoint


def shard_ranges(n: int, block: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) example ranges made of whole blocks (as even as blocks allow); at most one per block."""
    n_blocks = math.ceil(n / block)
    groups = np.array_split(np.arange(n_blocks), min(shards, n_blocks))
    return [(int(g[0]) * block, min(n, (int(g[-1]) + 1) * block)) for g in groups]


def result_name(threat: str, norm: str, eps: float) -> str:
    return f"{threat}-{norm}-{eps:g}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_result(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished result made by this same evaluation, None if absent; a different finished one is an error."""
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
        saved = res["fingerprint"] if res.get("complete") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OodrayError(f"'{path}' exists but is not an oodray result; move it away to recompute it") from None
    if saved is None:
        return None
    diff = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diff:
        k = diff[0]
        raise OodrayError(f"'{path}' holds a finished result of another evaluation ({k}: {saved.get(k)!r} there, "
                          f"{fingerprint.get(k)!r} now); pass another --out or move it away")
    return res


def _write_result(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({**payload, "complete": True}, indent=1))


def _translator_state(cfg: ExperimentConfig, checkpoint: str | Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's (config, translator, gate) and its sha256; checks it fits the requested dataset/classifier."""
    if checkpoint is None:
        if cfg.translator.arch not in BASELINES:
            raise ConfigError(f"translator '{cfg.translator.arch}' needs a trained checkpoint (--checkpoint PATH); "
                              f"without one choose --translator {' or '.join(BASELINES)}")
        return None, None
    state = load_translator_checkpoint(checkpoint)
    ckpt_cfg = ExperimentConfig.from_dict(state["config"])
    if ckpt_cfg.data.name != cfg.data.name:
        raise ConfigError(f"checkpoint '{checkpoint}' was trained on dataset '{ckpt_cfg.data.name}', "
                          f"not '{cfg.data.name}'")
    want, have = classifier_key(cfg), classifier_key(ckpt_cfg)  # recomputed: keys of older versions covered less
    if want != have:
        raise ConfigError(f"checkpoint '{checkpoint}' defends classifier '{have}', not '{want}'")
    p = Path(checkpoint)
    sha = _sha256(p / CHECKPOINT_FILE if p.is_dir() else p)
    return {"config": state["config"], "translator": state["translator"], "gate": state.get("gate"),
            "metrics": state.get("metrics"), "path": str(checkpoint)}, sha


@dataclass
class _Inputs:
    """Everything the tasks need, loaded and validated on the driver before any work starts."""

    cfg: ExperimentConfig
    x: torch.Tensor
    y: torch.Tensor
    block: int
    classifier_state: dict[str, Any]
    translator_state: dict[str, Any] | None
    surrogate_state: dict[str, Any] | None
    surrogate_sha256: str | None
    fingerprint: dict[str, Any]  # what makes results comparable; a finished result with another one is not reused
    meta: dict[str, Any]  # written into every result
    stochastic: bool
    gated: bool
    num_classes: int
    notes: list[dict[str, Any]] = field(default_factory=list)  # sanity records found while loading
    train_examples: int | None = None  # size of the training split (derives the compute of older classifiers)


def _load_inputs(cfg: ExperimentConfig, checkpoint: str | Path | None, label: str) -> _Inputs:
    translator_state, translator_sha = _translator_state(cfg, checkpoint)
    splits = load_dataset(cfg.data)
    x, y = eval_subset(splits.test, cfg.eval.n_examples, cfg.eval.seed)
    block = block_size(len(y), cfg.eval.batch_size)
    classifier, cpath = get_classifier(cfg, splits, train=checkpoint is None)
    classifier_state = load_checkpoint(cpath, what="classifier checkpoint")
    defended = build_defended(cfg, classifier, translator_state)  # a checkpoint that does not fit fails before work
    surrogate_state, surrogate_sha, notes = None, None, []
    if "transfer" in cfg.eval.threat_models:
        _, spath = get_classifier(surrogate_config(cfg), splits)
        surrogate_state, surrogate_sha = load_checkpoint(spath, what="surrogate classifier checkpoint"), _sha256(spath)
        same = surrogate_state["arch"] == classifier_state["arch"] and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(classifier_state["state_dict"].values(),
                                                                     surrogate_state["state_dict"].values()))
        if same:  # a recipe that ignores the seed: 'transfer' would be a white-box attack on C
            raise ConfigError(f"the 'transfer' surrogate '{spath}' has C's exact weights; name another model with "
                              "eval.surrogate_arch / eval.surrogate_weights, or leave 'transfer' out of "
                              "eval.threat_models")
    arch = ExperimentConfig.from_dict(translator_state["config"]).translator.arch if translator_state \
        else cfg.translator.arch
    fingerprint = {"format": RESULT_FORMAT, "data": cfg.to_dict()["data"] | {"data_dir": None},
                   "classifier": classifier_key(cfg), "classifier_sha256": _sha256(cpath), "translator": arch,
                   "translator_sha256": translator_sha, "n_examples": len(y), "eval_seed": cfg.eval.seed,
                   "block": block}
    meta = {"label": label, "translator": arch, "checkpoint": str(checkpoint) if checkpoint else None,
            "n_examples": len(y), "config": cfg.to_dict()}
    return _Inputs(cfg, x, y, block, classifier_state, translator_state, surrogate_state, surrogate_sha, fingerprint,
                   meta, is_stochastic(defended, x[:block]), getattr(defended, "gate", None) is not None,
                   splits.info.num_classes, notes, train_examples=len(splits.train))


@dataclass
class _Job:
    """One (threat model, norm, eps) result still to compute."""

    key: tuple[str, str, float]
    path: Path
    fingerprint: dict[str, Any]
    version: str
    version_note: str | None
    state_dir: Path
    parts: list[dict[str, Any]] = field(default_factory=list)


def _plan(inp: _Inputs, out_dir: Path) -> tuple[list[_Job], dict[tuple[str, str, float], dict[str, Any]]]:
    """The attack results still to compute, and the finished ones to reuse (a different finished one is an error)."""
    cfg = inp.cfg
    todo, done = [], {}
    for threat in dict.fromkeys(cfg.eval.threat_models):
        version, note = cfg.eval.version, None
        if threat == "adaptive" and inp.stochastic and version != "rand":
            version, note = "rand", (f"translator is stochastic in eval mode: AutoAttack version 'rand' (EoT) "
                                     f"replaces '{cfg.eval.version}'")
            log.warning("%s", note)
        for norm in dict.fromkeys(cfg.eval_norms()):
            for eps in dict.fromkeys(cfg.eval_eps()):
                key = (threat, norm, eps)
                fp = {**inp.fingerprint, "threat_model": threat, "norm": norm, "eps": eps, "version": version}
                if threat == "transfer":
                    fp["surrogate_sha256"] = inp.surrogate_sha256
                path = out_dir / f"{result_name(*key)}.json"
                prev = _read_result(path, fp)
                if prev is not None:
                    log.info("reusing finished result %s", path)
                    done[key] = prev
                    continue
                digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
                todo.append(_Job(key, path, fp, version, note, out_dir / "state" / f"{result_name(*key)}-{digest}"))
    return todo, done
