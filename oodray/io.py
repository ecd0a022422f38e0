"""Files written atomically (temp file + rename) and checkpoints read as data (`weights_only=True`).

Every file oodray writes goes through `atomic_write_bytes`: a uniquely named temp file in the target's directory,
written, fsynced, renamed over the target, then the directory fsynced, so a kill or a power cut leaves the old file or
the new one, never a cut one. A full disk or quota (ENOSPC/EDQUOT) is one `StorageFullError` line naming the path, and
the temp file is removed. Nothing here ever unpickles code: every torch load goes through `load_checkpoint`, which
refuses a pickle that carries objects other than tensors and plain containers, and turns truncated/corrupt files into
`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from oodray.errors import CheckpointError, OodrayError, StorageFullError

log = logging.getLogger(__name__)


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file read in 1 MiB pieces (memory O(chunk), whatever the file's size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object that oodray wrote; an unreadable, cut or otherwise shaped one is a one-line error naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise OodrayError(f"'{path}' is unreadable or not valid JSON ({e}); it was cut short or damaged") from None
    if not isinstance(obj, dict):
        raise OodrayError(f"'{path}' holds a JSON {type(obj).__name__}, not the object oodray writes there; it was "
                          "damaged or written by something else")
    return obj


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Interprets the content of a file oodray wrote: a missing field or a value of the wrong type inside it is a
    one-line error naming the file (never a KeyError traceback far from it)."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        if isinstance(e, OodrayError):
            raise
        raise OodrayError(f"'{path}' does not have the fields oodray writes there ({type(e).__name__}: {e}); it was "
                          "damaged or written by something else") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (Tune's result.json); a line cut by an interruption is skipped, and so is a
    line that is not a JSON object."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows
