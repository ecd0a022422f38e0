"""Progress of long steps (done/total, rate, ETA) and the live table of a Tune search.

`Progress` is what the long loops call (oblivious cache build, evaluation fan-out, final AutoAttack of the top-k):
a tqdm bar on a terminal, plain log lines when stderr is a file or a pipe (at most one per 30 s or per 10% of the
work, plus the last), nothing under `-q`. Call sites stay one or two lines:

    bar = Progress("oblivious cache", total=n, unit="img")
    bar.update(k, robust=0.42)      # closes itself when done reaches total; close() is idempotent
    for job in Progress("final AutoAttack", len(jobs), "models").track(jobs): ...

`trial_table(...)` gives the `tune.RunConfig` arguments that make Tune's live table show what the search decides
on (status, epoch, proxy robust and clean accuracy, objective, the few knobs that vary) instead of the loss terms.
Ray 2.60's default output engine ignores a `progress_reporter` ("AIR_VERBOSITY is set, ignoring passed-in
ProgressReporter"), so it switches that process to the reporter engine (`RAY_AIR_NEW_OUTPUT=0`, read at `fit()`).

tqdm and ray.tune are imported when a bar or the live table is made (heavy imports).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)

_QUIET = False
_OPEN_BARS = 0  # TTY bars open now (nested: the final AutoAttack's bar around each evaluation's)
LINE_EVERY_S = 30.0  # plain lines: at most one per this many seconds...
LINE_EVERY_FRACTION = 0.10  # ...unless this much more of the work is done


def set_quiet(quiet: bool) -> None:
    """`-q/--quiet`: no bars, no progress lines (errors and results still print)."""
    global _QUIET
    _QUIET = bool(quiet)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


class Progress:
    """done/total of one long step with its ETA; a bar on a TTY, rate-limited log lines otherwise.

    `stream` (default stderr) decides: its `isatty()` picks the bar. `clock` is injectable for tests.
    """

    def __init__(self, desc: str, total: int, unit: str = "it", *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.total, self.unit, self.done = desc, max(0, int(total)), unit, 0
        self.postfix: dict[str, Any] = {}
        self._clock, self._t0 = clock, clock()
        self._last_line_t, self._last_line_done = self._t0, 0
        self._closed = _QUIET or self.total == 0
        stream = stream if stream is not None else sys.stderr
        self._bar, self._redirect = None, None
        if not self._closed and stream.isatty():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            global _OPEN_BARS
            if _OPEN_BARS == 0:  # log lines go above the bars instead of through them (once, for nested bars)
                self._redirect = logging_redirect_tqdm()
                self._redirect.__enter__()
            _OPEN_BARS += 1

            # leave=None: a nested bar (an evaluation inside the final AutoAttack) disappears when done.
            # mininterval=0: updates are finished Ray tasks, rare enough to redraw on each.
            # Size from shutil: a terminal that reports 0x0 (a pty under `script`, some CI consoles) would make tqdm
            # compute -1 rows and draw nothing; shutil falls back to 100x24 there.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, leave=None, mininterval=0,
                             miniters=1, ncols=size.columns, nrows=size.lines)
        elif not self._closed:
            log.info("%s: %d %s to do", desc, self.total, unit)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Counts n more units done; keyword values (e.g. robust=0.42) are shown beside the count."""
        if self._closed:
            return
        self.done = min(self.total, self.done + n)
        self.postfix.update(postfix)
        if self._bar is not None:
            if self.postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        else:
            now = self._clock()
            due = (now - self._last_line_t >= LINE_EVERY_S
                   or (self.done - self._last_line_done) >= LINE_EVERY_FRACTION * self.total)
            if due or self.done >= self.total:
                log.info("%s", self.line())
                self._last_line_t, self._last_line_done = now, self.done
        if self.done >= self.total:
            self.close()

    def line(self) -> str:
        """'desc: 64/192 img (33%), robust 0.4219, 20s elapsed, ETA 40s' (the plain-line form)."""
        elapsed = self._clock() - self._t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        parts.append(f"{_duration(elapsed)} elapsed")
        if 0 < self.done < self.total:
            parts.append(f"ETA {_duration(elapsed * (self.total - self.done) / self.done)}")
        return ", ".join(parts)

    def close(self) -> None:
        global _OPEN_BARS
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _OPEN_BARS -= 1
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        self._closed = True

    def track(self, items: list[Any]) -> Any:
        """Yields the items, counting one done after the caller's loop body for each (a `continue` counts too)."""
        for item in items:
            yield item
            self.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# --- Tune's live table -----------------------------------------------------------------------------------------

METRIC_COLUMNS = {"epoch": "epoch", "robust_accuracy": "robust (proxy)", "clean_accuracy": "clean",
                  "objective": "objective"}
# Knobs in the order a reader wants them when they vary across trials (the loss weights last); at most MAX_KNOBS.
KNOB_ORDER = ["translator.arch", "train.regime", "translator.width", "translator.depth", "translator.blocks",
              "translator.downsamplings", "attack.attacks", "train.lr", "translator.norm", "translator.residual",
              "attack.eps_mix", "translator.dropout"]
MAX_KNOBS = 5


def varying_knobs(configs: list[dict[str, Any]], limit: int = MAX_KNOBS) -> list[str]:
    """The searched keys whose values differ across trials, in KNOB_ORDER (then the rest), at most `limit`. Only keys
    every trial has: Tune's best-trial line looks each column up without a default (a resnet has no depth)."""
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if all(k in c for c in configs)]
    ordered = [k for k in KNOB_ORDER if k in keys] + sorted(k for k in keys if k not in KNOB_ORDER)
    varying = [k for k in ordered if len({repr(c.get(k)) for c in configs}) > 1]
    return varying[:limit] or ordered[:1]


@functools.cache
def _trial_table_class() -> type:
    """TrialTable is built on first use, so importing this module does not import Ray Tune."""
    from ray.tune import CLIReporter

    class TrialTable(CLIReporter):
        """CLIReporter whose knob columns follow the trials: the few searched keys that differ between them."""

        def _progress_str(self, trials: list[Any], done: bool, *sys_info: str, **kw: Any) -> str:
            knobs = varying_knobs([t.config for t in trials if t.config])
            self._parameter_columns = {k: ("w_" if k.startswith("loss.") else "") + k.split(".")[-1] for k in knobs}
            try:
                return super()._progress_str(trials, done, *sys_info, **kw)
            except Exception as e:  # noqa: BLE001 - a display must never stop the search it displays
                return f"(trial table unavailable: {type(e).__name__}: {e})\n"

    TrialTable.__module__, TrialTable.__qualname__ = __name__, "TrialTable"  # pickled into tuner.pkl by name
    return TrialTable


def __getattr__(name: str) -> Any:
    if name == "TrialTable":  # what unpickling tuner.pkl on --resume looks up
        return _trial_table_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trial_table(metric: str, mode: str) -> dict[str, Any]:
    """`tune.RunConfig` keyword arguments: the trial table reporter and its verbosity (0 under -q).

    Also needed before `Tuner.restore(...).fit()`: the restored RunConfig carries the reporter, the engine switch
    does not."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the default engine ignores progress_reporter (see the docstring)
    every = 15 if sys.stdout.isatty() else 30  # seconds between tables (Ray: 5)
    reporter = _trial_table_class()(metric_columns=dict(METRIC_COLUMNS), metric=metric, mode=mode,
                                    max_report_frequency=every, print_intermediate_tables=True, sort_by_metric=True)
    return {"progress_reporter": reporter, "verbose": 0 if _QUIET else 1}
