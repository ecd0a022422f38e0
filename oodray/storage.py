"""Experiment storage that may be a local path or a URI (s3://, gs://, file://), through pyarrow's filesystems.

Ray Tune and Ray Train write trials and checkpoints straight to the storage URI. oodray's own files (resolved
config, evaluations, tables, plots) are written in a local staging directory and mirrored to the URI, and
`mirror_down` brings an experiment's files back for evaluation and the results tables.

pyarrow is imported when a URI is used (heavy import).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from oodray.io import atomic_write_bytes, atomic_write_text
from oodray.locks import LOCK_FILE

log = logging.getLogger(__name__)

MIRRORED = ".oodray_mirrored.json"  # in a staging directory: what its URI holds (see _Mirrored)


def is_uri(storage: str) -> bool:
    return "://" in storage


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def has_content(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False)))


def write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def mirror_down(uri: str, local: Path) -> Path:
    """Copies every file under `uri` that is missing (or of another size) locally, but no lock file; returns `local`.
    A lock fetched into a staging directory on another host would refuse that host's evaluation (its pid cannot be
    checked from there)."""
    import pyarrow.fs

    fs, root = _fs(uri)
    local.mkdir(parents=True, exist_ok=True)
    sent = _Mirrored(local, uri)
    n = 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        rel = info.path[len(root):].lstrip("/")
        dst = local / rel
        if dst.name == LOCK_FILE or (dst.exists() and dst.stat().st_size == info.size):
            continue  # a lock names a process on the host that took it (earlier versions sent locks up)
        with fs.open_input_stream(info.path) as src:
            data = src.read()
        atomic_write_bytes(dst, data)  # #15: unique temp name, fsync, ENOSPC as one line
        sent.files[rel] = _digest(data)  # the URI holds these bytes: mirror_up need not send them back
        n += 1
    sent.save()
    log.info("mirrored %d files from %s to %s", n, uri, local)
    return local


def mirror_up(local: Path, uri: str, names: list[str]) -> None:
    """Uploads the given files/folders (relative to `local`) under `uri`, except lock files, skipping each file whose
    bytes the URI already holds: the same content as this staging directory last sent (or fetched), and the same size
    there. Resuming a finished experiment then sends nothing (on S3, no PUT per file per resume)."""
    import pyarrow.fs

    fs, root = _fs(uri)
    sent = _Mirrored(local, uri)
    n = skipped = 0
    for name in names:
        src, dst = local / name, join(root, name)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != LOCK_FILE)  # a lock stays local
            found = fs.get_file_info(pyarrow.fs.FileSelector(dst, recursive=True, allow_not_found=True))
        else:
            files = [src] if src.exists() else []
            found = fs.get_file_info([dst]) if files else []
        there = {info.path[len(root):].lstrip("/"): info.size for info in found
                 if info.type == pyarrow.fs.FileType.File}
        for path in files:
            rel = path.relative_to(local).as_posix()
            data = path.read_bytes()
            digest = _digest(data)
            if sent.files.get(rel) == digest and there.get(rel) == len(data):
                skipped += 1
                continue
            dst = join(root, rel)
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(dst) as out:
                out.write(data)
            sent.files[rel] = digest
            n += 1
    sent.save()
    log.info("mirrored %d files from %s to %s (%d already there)", n, local, uri, skipped)


class _Mirrored:
    """What a staging directory knows the URI holds: the sha256 of each file it last sent there or fetched from
    there, kept in `local/MIRRORED` for one URI. Another writer that changed a file at the URI to other bytes of the
    same size would go unseen: the staging directory's lock keeps out a second writer on this machine only."""

    def __init__(self, local: Path, uri: str):
        self.path, self.uri = local / MIRRORED, uri
        try:
            kept = json.loads(self.path.read_text())
        except (OSError, ValueError):
            kept = {}
        self.files: dict[str, str] = kept.get("files", {}) if isinstance(kept, dict) and kept.get("uri") == uri else {}
        self._saved = dict(self.files)

    def save(self) -> None:
        if self.files != self._saved:
            atomic_write_text(self.path, json.dumps({"uri": self.uri, "files": self.files}, sort_keys=True))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def storage_uri(storage: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://) pass through."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())
