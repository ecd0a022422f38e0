"""Ray Tune schedulers whose decisions survive an interruption: what `oodray.tune` passes to the `Tuner`.

Ray Tune 2.60 pickles the scheduler into `tuner.pkl` once, when the experiment starts, and never calls its
`save`/`restore` afterwards, so `Tuner.restore` (our `--resume`) brings ASHA back with empty rungs: a later trial is
then judged against nothing and runs on where an uninterrupted search would have stopped it, and the resumed search
is not the search that was interrupted. `ResumableASHA` writes its rungs (what each trial recorded at each milestone)
beside the experiment as JSON after every result, and reads them back when Tune unpickles it on restore.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from oodray.io import atomic_write_text, read_json, reading

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
