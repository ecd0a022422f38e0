"""Files written atomically (temp file + rename) and checkpoints read as data (`weights_only=True`).

Every file oodray writes goes through `atomic_write_bytes`: a uniquely named temp file in the target's directory,
written, fsynced, renamed over the target, then the directory fsynced, so a kill or a power cut leaves the old file or
the new one, never a cut one. A full disk or quota (ENOSPC/EDQUOT) is one `StorageFullError` line naming the path, and
the temp file is removed. Nothing here ever unpickles code: every torch load goes through `load_checkpoint`, which
refuses a pickle that carries objects other than tensors and plain containers, and turns truncated/corrupt files into
`CheckpointError`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oodray.errors import CheckpointError, OodrayError

log = logging.getLogger(__name__)


class StorageFullError(OodrayError):
    """The device or quota holding a file oodray writes is full; what was finished before is kept."""


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def storage_full(err: OSError, path: str | Path) -> StorageFullError:
    return StorageFullError(f"no space left writing '{path}' ({err.strerror or os.strerror(err.errno)}); free space "
                            "(or raise the quota) and re-run the same command: finished work is kept")


def fsync_dir(path: str | Path) -> None:
    """Makes a rename (or a new file) in `path` durable: without it a power cut can forget the rename."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (FUSE, some network mounts) cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` atomically and durably (unique temp name, fsync file, rename, fsync directory)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            raise storage_full(e, path) from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> str:
    """torch.save to bytes, then an atomic write; returns the sha256 of what was written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path, *, what: str = "checkpoint", sha256: str | None = None) -> dict[str, Any]:
    """Loads a checkpoint as data only; any failure is a one-line `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{what} '{path}' does not match its recorded checksum (partial or altered write)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{what} '{path}' holds objects other than tensors; refused to unpickle it "
                                  "(only weights_only data is loaded)") from None
        raise CheckpointError(f"{what} '{path}' is corrupt or not a torch checkpoint ({first[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} '{path}' holds a {type(obj).__name__}, expected a dict")
    return obj


def check_finite(tensors: dict[str, Any], what: str, path: str | Path) -> None:
    """Refuses weights holding NaN/Inf (a diverged or damaged run): every output computed from them is meaningless."""
    for key, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{what} '{path}' holds NaN/Inf values (in '{key}'); it comes from a diverged or "
                                  "damaged run and cannot be used")


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Creates the directory if needed and checks that files can be written there."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OodrayError(f"{what} '{p}' is not writable ({e.strerror or e})") from None
    return p


def safe_child(root: str | Path, name: str) -> Path:
    """root/name, refusing names that are absolute, climb out of root ('..') or are not printable ASCII."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise OodrayError(f"name '{name}' must be a relative path inside '{root}' (no '..', not absolute)")
    if not name.isascii() or not name.isprintable():
        # Ray 2.60 tags its metrics with the run name and fails mid-run ('ascii' codec can't encode) on anything else
        bad = next(c for c in name if not (c.isascii() and c.isprintable()))
        raise OodrayError(f"name '{name}' holds {bad!r}: run and experiment names must be printable ASCII (Ray Train "
                          "and Tune fail on others), e.g. letters, digits, '-', '_', '.'")
    return Path(root) / name


# --- resuming a Ray Train run --------------------------------------------------------------------------------------

RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train 2.60's index of registered checkpoints
INCOMPLETE_PREFIX = ".incomplete-"


def ray_train_checkpoints(run_dir: Path) -> tuple[str | None, set[str]] | None:
    """(the checkpoint directory Ray Train will resume from, every registered one), read from the run's checkpoint
    manager snapshot; None when there is no snapshot (Ray then starts the run from scratch).

    Ray Train 2.60 (v2 `CheckpointManager`) resumes a run from `latest_checkpoint_result` of this snapshot, never by
    listing directories. A checkpoint is registered there only after its upload into `checkpoint_*` finished, so a
    directory cut short by a full disk or a kill is never resumed from by Ray.
    """
    path = run_dir / RAY_TRAIN_SNAPSHOT
    if not path.is_file():
        return None
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
        latest = snap.get("latest_checkpoint_result")
        latest = None if latest is None else str(latest["checkpoint_dir_name"])
        registered = {str(r["checkpoint_dir_name"]) for r in snap.get("checkpoint_results", [])}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"Ray Train's checkpoint index '{path}' is cut short or damaged ({type(e).__name__}), "
                              "e.g. by a full disk: Ray cannot resume this run. Move that file aside to train this run "
                              "again from scratch, or pass another --name") from None
    return latest, registered | ({latest} if latest else set())


def resume_checkpoint(run_dir: str | Path, filename: str, load: Callable[[Path], dict[str, Any]],
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a re-run of `run_dir` resumes from, loaded with `load`, or None for a fresh start.

    That is the one Ray Train registered last when the run has Ray's snapshot, and a damaged one is an error (Ray
    would load it). Checkpoint directories Ray never registered and that do not load (cut short by a full disk or a
    kill during the upload) are skipped, reported, and renamed `.incomplete-checkpoint_*`, so that nothing takes them
    for checkpoints. Without a snapshot, the newest complete checkpoint is returned so that the caller can check that
    the run is the same one (Ray itself starts from scratch then).
    """
    run_dir = Path(run_dir)
    ray_state = ray_train_checkpoints(run_dir)
    latest, registered = ray_state if ray_state is not None else (None, set())
    complete: list[tuple[Path, dict[str, Any]]] = []
    for d in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        if d.name in registered:
            continue
        try:
            complete.append((d / filename, load(d / filename)))
        except CheckpointError as e:
            aside = d.with_name(INCOMPLETE_PREFIX + d.name)
            os.replace(d, aside)
            fsync_dir(run_dir)
            log.warning("skipped incomplete checkpoint '%s' (%s); Ray Train never registered it; moved to '%s'",
                        d, str(e).split("' ", 1)[-1], aside)
    if latest is not None:
        return run_dir / latest / filename, load(run_dir / latest / filename)
    if ray_state is None and complete:
        return complete[-1]
    return None
