"""Wall time of an evaluation summed over every attempt at it, so that a resumed evaluation reports what it really
cost, not only its last run's share.

Each run of the evaluation driver that has work left appends one attempt to `<out_dir>/wall.json` and rewrites its
`seconds` every `interval` seconds from a daemon thread, then once more when it stops. A run that is killed (SIGKILL,
a lost node, the machine going down) therefore leaves its time on disk too, short by at most one interval. A run that
finds everything done is not an attempt. The driver holds the output directory's lock while it writes, so there is
one writer per file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from oodray.errors import StorageFullError
from oodray.io import atomic_write_text

log = logging.getLogger(__name__)
INTERVAL_SECONDS = 10.0


def read_attempts(path: Path) -> list[dict[str, Any]]:
    """The attempts recorded in `path` ([] when there is none, or it cannot be read: a lost record never stops an
    evaluation, it only leaves the total short, and the summary counts the attempts it could read)."""
    try:
        attempts = json.loads(path.read_text()).get("attempts")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as err:
        log.warning("'%s' cannot be read (%s): earlier attempts' wall time is not counted", path, err)
        return []
    return [a for a in attempts if isinstance(a, dict) and isinstance(a.get("seconds"), (int, float))] \
        if isinstance(attempts, list) else []


def recorded_totals(path: Path) -> dict[str, Any]:
    """`wall_seconds_total` and `attempts` of the attempts recorded in `path`; {} when none is (an evaluation finished
    before attempts were recorded: its total is unknown, not 0)."""
    attempts = read_attempts(path)
    return _totals(attempts) if attempts else {}


def _totals(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"wall_seconds_total": round(sum(a["seconds"] for a in attempts), 1), "attempts": len(attempts)}


class AttemptClock:
    """Records this attempt's wall seconds in `path` beside the earlier attempts' while it runs (a context manager)."""

    def __init__(self, path: Path, interval: float = INTERVAL_SECONDS) -> None:
        self.path, self.interval = path, interval
        self.earlier = read_attempts(path)
        self.t0 = time.time()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="oodray-attempt-clock", daemon=True)

    def _write(self) -> None:
        attempts = [*self.earlier, {"started": self.started, "seconds": round(time.time() - self.t0, 1)}]
        try:
            atomic_write_text(self.path, json.dumps({"attempts": attempts}, indent=1))
        except (OSError, StorageFullError) as err:  # the results matter more than their timing
            log.warning("could not record the evaluation's wall time in '%s': %s", self.path, err)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def __enter__(self) -> AttemptClock:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._write()

    def totals(self) -> dict[str, Any]:
        """`wall_seconds_total` (every attempt, this one until now) and `attempts` (how many)."""
        return _totals([*self.earlier, {"seconds": time.time() - self.t0}])


EVAL_SECONDS_NOTE = ("the evaluation's wall seconds summed over every attempt at it, killed ones included, "
                     "with the number of attempts in brackets (an interrupted evaluation redoes the AutoAttack work "
                     "that was in progress, so this is at most, not exactly, what one uninterrupted run takes)")
EVAL_SECONDS_STAR = ("a figure marked * is the last attempt's only (evaluated before wall time was summed over "
                     "attempts), so it understates a resumed evaluation")


def eval_seconds_cell(summary: dict[str, Any]) -> str | None:
    """An evaluation's wall time for a results table: "1234 (3)" (every attempt's, 3 of them) from a summary that
    summed it, "373*" (its last run's only) from an older one, None when neither is recorded."""
    if summary.get("wall_seconds_total") is not None:
        return f"{summary['wall_seconds_total']:.0f} ({summary.get('attempts', '?')})"
    return f"{summary['seconds']:.0f}*" if summary.get("seconds") is not None else None
