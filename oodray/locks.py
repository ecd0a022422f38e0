"""One writer per run directory: a lock file that a second `oodray.tune`/`train`/`evaluate` on the same directory
is refused by, with one line naming the holder (pid, host, since, command).

Mechanism: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<dir>/.oodray.lock`, which holds the holder's pid, host, start time and
command as JSON. flock rather than `O_CREAT | O_EXCL`, because the kernel drops a flock when its holder dies in any
way (SIGKILL, OOM killer), so a crashed run never blocks the next one and two processes can never both take over the
same stale lock (with O_EXCL, taking over means checking a pid, deleting and re-creating the file: a race). The file is
removed on release; one left by a crashed run is recognised as stale (its pid no longer runs on this host) and taken
over with a log line. Limits (docs/reliability.md): flock across hosts works only on filesystems that pass it to the
server (NFSv4 on Linux); a lock file written on another host is never taken over automatically, because its pid cannot
be checked from here; URIs (s3://, gs://) cannot be locked, so oodray locks their local staging directory.

CLIs call `hold(dir, what)` before Ray starts; `oodray.cli.run` releases every held lock when the command ends,
normally or through an exception (`release_all`). `RunLock` is the underlying context manager.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from oodray.errors import OodrayError
from oodray.io import ensure_writable_dir, fsync_dir

log = logging.getLogger(__name__)

LOCK_FILE = ".oodray.lock"


class LockedError(OodrayError):
    """Another live process holds the lock of the directory this command would write."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder recorded in a lock file still runs (only decidable on its own host)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("pid_start") in (None, ticks)


def _command() -> str:
    """This process's command line as typed: `python -m oodray.train --name x`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]])


def describe(holder: dict[str, Any]) -> str:
    cmd = holder.get("command") or "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"({cmd[:160]})")


class RunLock:
    """Context manager: holds `<directory>/.oodray.lock` exclusively, or raises `LockedError` naming the holder."""

    def __init__(self, directory: str | Path, what: str = "run directory") -> None:
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None

    def _read(self) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(self.fd, 65536, 0).decode() or "{}")
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict[str, Any], why: str = "") -> LockedError:
        return LockedError(f"{self.what} '{self.dir}' is in use by {describe(holder)}{why}; wait for it to finish or "
                           f"stop it (lock file: {self.path})")

    def acquire(self) -> RunLock:
        ensure_writable_dir(self.dir, self.what)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.fd = fd
                holder = self._read()
                os.close(fd)
                self.fd = None
                raise self._refuse(holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file we locked must still be the one at the path (a holder unlinks it on release)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        old = self._read()
        if old:
            if old.get("host") != host:
                self.release(unlink=False)
                raise self._refuse(old, " (a lock written on another host: if that run is gone, delete the lock file)")
            if old.get("pid") != os.getpid() and _alive(old):  # flock free but its writer alive: trust the writer
                self.release(unlink=False)
                raise self._refuse(old)
            log.warning("took over the stale lock of %s '%s': %s no longer runs", self.what, self.dir, describe(old))
        me = {"pid": os.getpid(), "pid_start": _start_ticks(os.getpid()), "host": host,
              "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started": time.time(),
              "command": _command()}
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        fsync_dir(self.dir)
        return self

    def release(self, unlink: bool = True) -> None:
        if self.fd is None:
            return
        try:
            if unlink:  # removed while still held, so nobody can lock the old file and believe it is current
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, RunLock] = {}


def hold(directory: str | Path, what: str = "run directory") -> RunLock:
    """Takes the directory's lock until `release_all` (called by `oodray.cli.run` when the command ends) or exit.
    Holding the same directory twice in one process is a no-op."""
    key = Path(directory).resolve()
    if key not in _HELD:
        _HELD[key] = RunLock(directory, what).acquire()
    return _HELD[key]


def release_all() -> None:
    while _HELD:
        _HELD.popitem()[1].release()


atexit.register(release_all)
