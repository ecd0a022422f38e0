"""Experiment storage that may be a local path or a URI (s3://, gs://, file://), through pyarrow's filesystems.

Ray Tune and Ray Train write trials and checkpoints straight to the storage URI. oodray's own files (resolved
config, evaluations, tables, plots) are written in a local staging directory and mirrored to the URI, and
`mirror_down` brings an experiment's files back for evaluation and the results tables.

pyarrow is imported when a URI is used (heavy import).
"""

from __future__ import annotations

import logging
from pathlib import Path

from oodray.io import atomic_write_bytes

log = logging.getLogger(__name__)


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
    """Copies every file under `uri` that is missing (or of another size) locally; returns `local`."""
    import pyarrow.fs

    fs, root = _fs(uri)
    local.mkdir(parents=True, exist_ok=True)
    n = 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        dst = local / info.path[len(root):].lstrip("/")
        if dst.exists() and dst.stat().st_size == info.size:
            continue
        with fs.open_input_stream(info.path) as src:
            atomic_write_bytes(dst, src.read())  # #15: unique temp name, fsync, ENOSPC as one line
        n += 1
    log.info("mirrored %d files from %s to %s", n, uri, local)
    return local


def mirror_up(local: Path, uri: str, names: list[str]) -> None:
    """Uploads the given files/folders (relative to `local`) under `uri`."""
    import pyarrow.fs

    fs, root = _fs(uri)
    for name in names:
        src = local / name
        if not src.exists():
            continue
        dst = join(root, name)
        if src.is_dir():
            fs.create_dir(dst, recursive=True)
            pyarrow.fs.copy_files(str(src), dst, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
        else:
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            with open(src, "rb") as f, fs.open_output_stream(dst) as out:
                out.write(f.read())


def storage_uri(storage: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://) pass through."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())
