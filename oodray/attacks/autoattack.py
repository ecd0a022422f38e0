"""The resumable AutoAttack wrapper: pyautoattack's cascade driven one (attack, batch) at a time, with its state saved
after every batch so that a killed evaluation resumes and returns the same result.

The cascade is AutoAttack's own (its objects, settings and checks); the attack runs only on the points still robust.
pyautoattack's warnings (randomised defences, zero gradients, Square beating the white-box attacks) are captured into
the result. Leaves torch's global RNG as it found it (pyautoattack reseeds it on every call).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyautoattack import AutoAttack
from pyautoattack import checks as aa_checks
from torch import Tensor, nn

from oodray.attacks.common import (
    AA_LOGGER,
    _attack_mode,
    _check_batch,
    _check_int,
    _check_version,
    _forked_rng,
    validate_eps,
)
from oodray.errors import StateFileError
from oodray.io import atomic_write_bytes, load_checkpoint

logger = logging.getLogger(__name__)
_STATE_FORMAT = 1


@dataclass(frozen=True)
class AutoAttackResult:
    """AutoAttack's output: adversarial images (clean where no attack succeeded), the model's predictions on
    them, the warnings pyautoattack raised (its checks for randomised/dynamic defences, probability outputs,
    zero gradients, Square beating the white-box attacks) and the accuracy after each stage of the cascade."""

    x_adv: Tensor
    y_adv: Tensor
    messages: list[str] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # "clean", then each attack that ran, in order

    @property
    def clean_accuracy(self) -> float:
        return self.accuracy["clean"]

    @property
    def robust_accuracy(self) -> float:
        return list(self.accuracy.values())[-1]


def _build_autoattack(model: nn.Module, norm: str, eps: float, version: str, seed: int,
                      device: torch.device | str) -> AutoAttack:
    eps = validate_eps(eps, norm)
    _check_version(version)
    seed = _check_int("seed", seed, 0)
    return AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)


def autoattack_settings(version: str = "standard", norm: str = "Linf", eps: float = 0.3) -> dict[str, Any]:
    """The attacks and hyperparameters AutoAttack `version` runs, read off a constructed AutoAttack object."""
    aa = _build_autoattack(nn.Identity(), norm, eps, version, 0, "cpu")
    return {
        "version": version,
        "norm": norm,
        "eps": float(aa.epsilon),
        "attacks": list(aa.attacks_to_run),
        "apgd": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "eot_iter": aa.apgd.eot_iter,
                 "rho": aa.apgd.thr_decr},
        "apgd_targeted": {"n_iter": aa.apgd_targeted.n_iter, "n_restarts": aa.apgd_targeted.n_restarts,
                          "n_target_classes": aa.apgd_targeted.n_target_classes,
                          "eot_iter": aa.apgd_targeted.eot_iter},
        "fab": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts,
                "n_target_classes": aa.fab.n_target_classes},
        "square": {"n_queries": aa.square.n_queries, "n_restarts": aa.square.n_restarts,
                   "p_init": aa.square.p_init},
    }


class _ListHandler(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_messages(messages: list[str]) -> Iterator[None]:
    """Append pyautoattack's warnings (its logger and `warnings`) to `messages`; re-issue other warnings."""
    aa_logger = logging.getLogger(AA_LOGGER)
    handler, old_level = _ListHandler(messages), aa_logger.level
    if aa_logger.getEffectiveLevel() > logging.WARNING:
        aa_logger.setLevel(logging.WARNING)
    aa_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.setLevel(old_level)
        for w in caught:
            if "pyautoattack" in w.filename:
                messages.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@dataclass
class _Progress:
    """Where an AutoAttack cascade stands; saved after every batch so a killed run resumes."""

    x_adv: Tensor
    y_adv: Tensor
    robust: Tensor  # bool, on CPU: still correctly classified
    fooled: Tensor  # bool, on CPU: x_adv differs from x (an attack succeeded)
    done: list[str]
    pending: Tensor | None  # CPU indices the current attack still has to run on
    accuracy: dict[str, float]
    messages: list[str]


def _fingerprint(x: Tensor, y: Tensor, norm: str, eps: float, version: str, seed: int,
                 attacks: list[str]) -> dict[str, Any]:
    return {"format": _STATE_FORMAT, "norm": norm, "eps": eps, "version": version, "seed": seed,
            "attacks": attacks, "shape": list(x.shape), "x_sum": float(x.double().sum())}


def _save_state(path: Path, fingerprint: dict[str, Any], labels: Tensor, p: _Progress) -> None:
    index = p.fooled.nonzero().flatten()
    payload = {
        "fingerprint": fingerprint, "labels": labels.cpu(), "y_adv": p.y_adv.cpu(), "robust": p.robust,
        "adv_index": index, "adv_rows": p.x_adv[index.to(p.x_adv.device)].cpu(), "done": list(p.done),
        "pending": p.pending, "accuracy": dict(p.accuracy), "messages": list(p.messages),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())  # temp file, fsync, rename: a kill mid-save leaves the previous state


def _load_state(path: Path, fingerprint: dict[str, Any], x: Tensor, y: Tensor) -> _Progress:
    try:
        payload = load_checkpoint(path, what="AutoAttack state file")  # weights_only: data, never code
        saved = payload["fingerprint"]
        if not isinstance(saved, dict):
            raise TypeError("no fingerprint")
    except Exception as err:  # any unreadable file is the same user error: the wrong state_path
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StateFileError(f"state file {path} is not an oodray AutoAttack state ({reason}); "
                         "delete it or pass another state_path") from None
    for key, value in fingerprint.items():
        same = saved.get(key) == value
        if key == "x_sum" and isinstance(saved.get(key), float):
            same = abs(saved[key] - value) <= 1e-6 * max(1.0, abs(value))
        if not same:
            raise StateFileError(f"state file {path} belongs to another evaluation ({key}: saved "
                             f"{saved.get(key)!r}, now {value!r}); delete it or pass another state_path")
    if not torch.equal(payload["labels"], y.cpu()):
        raise StateFileError(f"state file {path} belongs to another evaluation (labels differ); "
                         "delete it or pass another state_path")
    x_adv = x.clone()
    x_adv[payload["adv_index"].to(x.device)] = payload["adv_rows"].to(x.device, x.dtype)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool)
    fooled[payload["adv_index"]] = True
    logger.info("resuming AutoAttack from %s: done %s", path, payload["done"] or "nothing yet")
    return _Progress(x_adv=x_adv, y_adv=payload["y_adv"].to(y.device), robust=payload["robust"],
                     fooled=fooled, done=list(payload["done"]), pending=payload["pending"],
                     accuracy=dict(payload["accuracy"]), messages=list(payload["messages"]))


def _clean_pass(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                device: torch.device | str) -> _Progress:
    with torch.no_grad():
        preds = [model(x[i:i + batch_size].to(device)).argmax(1).to(y.device)
                 for i in range(0, len(x), batch_size)]
    y_pred = torch.cat(preds)
    robust = (y_pred == y).cpu()
    return _Progress(x_adv=x.clone(), y_adv=y_pred, robust=robust, fooled=torch.zeros_like(robust), done=[],
                     pending=None, accuracy={"clean": robust.float().mean().item()}, messages=[])


def _attack_batch(aa: AutoAttack, attack: str, x: Tensor, y: Tensor, idx: Tensor, p: _Progress,
                  batch_size: int) -> None:
    aa.attacks_to_run = [attack]
    for key in aa_checks.funcs:  # module-global call counters behind the dynamic-defence check; never reset
        aa_checks.funcs[key] = 0
    tracer = sys.gettrace()  # check_dynamic ends with sys.settrace(None), which would stop coverage/debuggers
    x_idx, y_idx = idx.to(x.device), idx.to(y.device)
    try:
        x_batch, y_batch = aa.run_standard_evaluation(x[x_idx], y[y_idx], batch_size=batch_size)
    finally:
        sys.settrace(tracer)
    hit = (y_batch.to(y.device) != y[y_idx]).cpu()
    rows = idx[hit]
    p.x_adv[rows.to(x.device)] = x_batch[hit.to(x_batch.device)].to(x.device, x.dtype)
    p.y_adv[rows.to(y.device)] = y_batch[hit.to(y_batch.device)].to(y.device)
    p.robust[rows] = False
    p.fooled[rows] = True


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
    state_path: Path | None = None,
    device: torch.device | str = "cpu",
) -> AutoAttackResult:
    """Run AutoAttack `version` (standard, plus, rand) on (x, y) and return an ``AutoAttackResult``.

    The cascade is AutoAttack's: each attack runs, with pyautoattack's own objects and settings, only on the
    points still robust, in batches of `batch_size`, moved to `device`. We drive it one (attack, batch) at a
    time because pyautoattack 0.2.0 cannot resume: its state file stores the attack set as a string, so
    reloading always fails, and its resume path would return clean images for points broken before the
    restart. With `state_path` our own state (a torch file: flags, predictions, adversarial rows) is written
    after every batch, and a rerun with the same arguments continues where a killed run stopped and returns
    the same result. The accuracies are over all of x (clean mistakes count as not robust).
    """
    eps = validate_eps(eps, norm)
    _check_version(version)
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    _check_batch(x, y)
    if x.shape[0] == 0:
        raise ValueError("autoattack needs at least one image, got an empty batch")
    state_path = Path(state_path) if state_path is not None else None
    x, y = x.detach(), y.detach()
    aa = _build_autoattack(model, norm, eps, version, seed, device)
    attacks = list(aa.attacks_to_run)
    fingerprint = _fingerprint(x, y, norm, eps, version, seed, attacks)
    progress = None
    if state_path is not None and state_path.exists():
        progress = _load_state(state_path, fingerprint, x, y)

    def save() -> None:
        if state_path is not None:
            _save_state(state_path, fingerprint, y, progress)

    messages: list[str] = [] if progress is None else progress.messages
    with _attack_mode(model), _forked_rng(), _capture_messages(messages):
        if progress is None:
            progress = _clean_pass(model, x, y, batch_size, device)
            progress.messages = messages
            save()
        for attack in attacks:
            if attack in progress.done:
                continue
            if progress.pending is None:
                progress.pending = progress.robust.nonzero().flatten()
                if progress.pending.numel() == 0:
                    progress.pending = None
                    break  # nothing left to attack: AutoAttack skips the remaining attacks
            while progress.pending.numel():
                _attack_batch(aa, attack, x, y, progress.pending[:batch_size], progress, batch_size)
                progress.pending = progress.pending[batch_size:]
                save()
            progress.pending = None
            progress.done.append(attack)
            progress.accuracy[attack] = progress.robust.float().mean().item()
            logger.debug("robust accuracy after %s: %.2f%%", attack, 100 * progress.accuracy[attack])
            save()
        aa_checks.check_square_sr(progress.accuracy, logger=aa.logger)
    messages = list(dict.fromkeys(messages))
    for message in messages:
        logger.debug("AutoAttack check: %s", message)
    logger.info("AutoAttack %s %s eps=%g: clean %.2f%%, robust %.2f%% on %d points", version, norm, eps,
                100 * progress.accuracy["clean"], 100 * list(progress.accuracy.values())[-1], x.shape[0])
    return AutoAttackResult(x_adv=progress.x_adv, y_adv=progress.y_adv, messages=messages,
                            accuracy=dict(progress.accuracy))
