"""Ray Tune schedulers whose decisions survive an interruption: what `oodray.tune` passes to the `Tuner`.

Ray Tune 2.60 pickles the scheduler into `tuner.pkl` once, when the experiment starts, and never calls its
`save`/`restore` afterwards, so `Tuner.restore` (our `--resume`) brings ASHA back with empty rungs: a later trial is
then judged against nothing and runs on where an uninterrupted search would have stopped it, and the resumed search
is not the search that was interrupted. `ResumableASHA` writes its rungs (what each trial recorded at each milestone)
beside the experiment as JSON after every result, and reads them back when Tune unpickles it on restore.

`ReleaseOrphanedPlacementGroups` is the Tune callback that keeps a search from hanging when a trial that Tune
stopped leaves its worker group's CPUs reserved (oodray.runtime.release_orphaned_placement_groups says how).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler

from oodray.io import atomic_write_text, read_json, reading
from oodray.runtime import release_orphaned_placement_groups

log = logging.getLogger(__name__)


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA (Li et al. 2020, Ray's `ASHAScheduler`) with its state in `state_path`, a local file of the experiment."""

    def __init__(self, state_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_path = state_path

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

    def _persist(self) -> None:
        state = {"num_stopped": self._num_stopped,
                 "brackets": [[{"milestone": m, "recorded": recorded} for m, recorded in b._rungs]
                              for b in self._brackets]}
        atomic_write_text(self._state_path, json.dumps(state))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        path = state.get("_state_path")
        if path and os.path.exists(path):  # written by this experiment's earlier run
            saved = read_json(path)
            with reading(path):
                for bracket, rungs in zip(self._brackets, saved["brackets"], strict=True):
                    for (milestone, recorded), rung in zip(bracket._rungs, rungs, strict=True):
                        if rung["milestone"] != milestone:
                            raise ValueError(f"milestone {rung['milestone']} where this search has {milestone}")
                        recorded.update({str(k): float(v) for k, v in rung["recorded"].items()})
                self._num_stopped = int(saved["num_stopped"])
            log.info("ASHA rungs restored from %s", path)


class ReleaseOrphanedPlacementGroups(Callback):
    """Every `every_s` seconds of a search, releases the placement groups that stopped trials left behind (empty for
    `grace_s`), with a warning per group. If Ray's state API cannot be reached it says so once and stops checking:
    the search goes on as without it."""

    def __init__(self, grace_s: float = 60.0, every_s: float = 15.0) -> None:
        self.grace_s, self.every_s = grace_s, every_s
        self._first_seen: dict[str, float] = {}
        self._last = 0.0
        self._off = False

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self._off or now - self._last < self.every_s:
            return
        self._last = now
        try:
            removed = release_orphaned_placement_groups(self._first_seen, self.grace_s, now)
        except Exception as e:  # noqa: BLE001 - a check that cannot run must not end the search
            self._off = True
            log.warning("cannot check for placement groups left by stopped trials (Ray's state API: %s); a trial that "
                        "Tune stops may keep its workers' CPUs reserved", e)
            return
        for pg in removed:
            log.warning("released placement group %s: it held CPUs with no actor in it for %.0f s (left by a trial "
                        "that Tune stopped, whose Ray Train cleaner had exited)", pg, self.grace_s)
