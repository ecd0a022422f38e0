"""The bodies of the evaluation's Ray tasks: AutoAttack on one shard, clean accuracy and the natural shifts.

Plain functions, callable in-process (tests) and wrapped by `ray.remote` when the driver submits them. Each rebuilds
C and C(T(.)) from plain state dicts on its first lines, on the device its resources grant.

ray is imported only where a task asks for its node (heavy import).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodray.attacks import autoattack
from oodray.config import ExperimentConfig
from oodray.models.classifier import classifier_from_state
from oodray.models.defended import build_defended
from oodray.runtime import fast_layout, task_device, use_channels_last
from oodray.shifts import SEVERITIES, SHIFTS, apply_shift


def block_size(n: int, batch_size: int) -> int:
    """Examples per AutoAttack block: n split into equal blocks of at most `eval.batch_size`, and into at least two so
    that the default two shards both have work. Depends on n and batch_size only, never on the number of shards."""
    return math.ceil(n / max(math.ceil(n / batch_size), min(2, n)))


def is_stochastic(defended: torch.nn.Module, x: torch.Tensor) -> bool:
    """True if T says it is stochastic, or two eval-mode passes with different seeds disagree (e.g. live dropout)."""
    if getattr(defended.translator, "stochastic", False):
        return True
    defended.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        a = defended.translator(x)
        torch.manual_seed(1)
        b = defended.translator(x)
    return not torch.equal(a, b)


def _task_setup(cfg: ExperimentConfig) -> torch.device:
    if not logging.getLogger().handlers:  # a fresh Ray worker: its per-block lines (and resumes) reach the driver
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("auto-attack").setLevel(logging.WARNING)  # repeats its settings for every block
    return task_device(cfg.eval.gpus_per_task, cfg.eval.cpus_per_task)


def _models(cfg: ExperimentConfig, classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
            device: torch.device, image_size: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """C and the defended model C(T(.)) (sharing C) on the task's device, in the memory layout for the device and
    image size (`use_channels_last`), and that layout."""
    layout = use_channels_last(cfg.train.channels_last, device, image_size)
    classifier = fast_layout(classifier_from_state(classifier_state).to(device), layout)
    return classifier, fast_layout(build_defended(cfg, classifier, translator_state).to(device), layout), layout


def _node_id() -> str | None:
    """The Ray node this runs on (recorded per shard, to show where work went); None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # the call alone would start Ray


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
    """Predictions block by block (the same batches in every shard split, so float results never differ)."""
    return torch.cat([model(x[i:i + block].to(device)).argmax(1).cpu() for i in range(0, len(x), block)])


def attack_shard(job: dict[str, Any], classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
                 surrogate_state: dict[str, Any] | None, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """AutoAttack on one shard (x, y = subset[start:stop]), block by block, each block resuming from its state file."""
    t0, cpu0 = time.time(), time.process_time()
    cfg = ExperimentConfig.from_dict(job["config"])
    device = _task_setup(cfg)
    classifier, defended, layout = _models(cfg, classifier_state, translator_state, device, x.shape[-2:])
    threat, block, start = job["threat"], job["block"], job["start"]
    target = {"oblivious": classifier, "adaptive": defended}.get(threat)
    if threat == "transfer":
        target = fast_layout(classifier_from_state(surrogate_state).to(device), layout)
    stages = ["clean", *job["attacks"]]
    counts = dict.fromkeys(stages, 0)
    x_adv, target_robust, messages = [], [], []
    for b0 in range(0, len(x), block):
        xb, yb = x[b0:b0 + block], y[b0:b0 + block]
        res = autoattack(target, xb.to(device), yb.to(device), norm=job["norm"], eps=job["eps"],
                         version=job["version"], seed=job["seed"], batch_size=block, device=device,
                         state_path=Path(job["state_dir"]) / f"block-{start + b0:06d}.pt")
        x_adv.append(res.x_adv.cpu())
        target_robust.append(res.y_adv.cpu() == yb)
        messages += [m for m in res.messages if m not in messages]
        last = 0
        for s in stages:  # stages AutoAttack skipped (nothing left to attack) keep the last count
            if s in res.accuracy:
                last = round(res.accuracy[s] * len(xb))
            counts[s] += last
    x_adv_t = torch.cat(x_adv)
    clean_ok = _predict(defended, x, block, device) == y
    adv_ok = _predict(defended, x_adv_t, block, device) == y
    gate_flags = None
    if getattr(defended, "gate", None) is not None:
        gate_flags = torch.cat([defended.gate.flags(classifier, x_adv_t[i:i + block].to(device)).cpu()
                                for i in range(0, len(x), block)]).int().tolist()
    return {"start": start, "stop": job["stop"], "robust": (clean_ok & adv_ok).int().tolist(),
            "adv_correct": adv_ok.int().tolist(), "target_robust": torch.cat(target_robust).int().tolist(),
            "stage_counts": counts, "messages": messages, "gate_flags": gate_flags, "seconds": time.time() - t0,
            "cpu_seconds": time.process_time() - cpu0, "node_id": _node_id(), "channels_last": layout}


def shift_accuracies(classifier: torch.nn.Module, defended: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     seed: int, block: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy of C and of C(T(.)) under every shift at severities 1-5 (noise seeded per shift and severity)."""
    device = torch.device(device)
    gate = getattr(defended, "gate", None)
    out: dict[str, Any] = {}
    for k, name in enumerate(SHIFTS):
        per: dict[str, Any] = {}
        for sev in SEVERITIES:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 100 * k + sev)
            xs = apply_shift(x, name, sev, generator=g)
            per[str(sev)] = {"classifier": (_predict(classifier, xs, block, device) == y).float().mean().item(),
                             "defended": (_predict(defended, xs, block, device) == y).float().mean().item()}
            if gate is not None:
                per[str(sev)]["gate_flag_rate"] = defended.flag_rate(xs.to(device))
        mean = {m: float(np.mean([per[str(s)][m] for s in SEVERITIES])) for m in per["1"]}
        out[name] = {"mean": mean, "severity": per}
    return out


def clean_and_shifts(job: dict[str, Any], classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
                     x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Clean accuracy of C and C(T(.)) (and the gate's clean flag rate); the natural shifts when job['shifts']."""
    cfg = ExperimentConfig.from_dict(job["config"])
    device = _task_setup(cfg)
    classifier, defended, _ = _models(cfg, classifier_state, translator_state, device, x.shape[-2:])
    block = block_size(len(y), cfg.eval.batch_size)
    pc, pd = _predict(classifier, x, block, device), _predict(defended, x, block, device)
    out: dict[str, Any] = {"classifier_correct": (pc == y).int().tolist(), "defended_correct": (pd == y).int().tolist(),
                           "gate_flag_rate": defended.flag_rate(x.to(device)) if defended.gate is not None else None}
    if job["shifts"]:
        out["shifts"] = shift_accuracies(classifier, defended, x, y, cfg.eval.seed, block, device)
    return out
