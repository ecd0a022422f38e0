"""Ray Tune schedulers whose decisions survive an interruption: what `oodray.tune` passes to the `Tuner`.

Ray Tune 2.60 pickles the scheduler into `tuner.pkl` once, when the experiment starts, and never calls its
`save`/`restore` afterwards, so `Tuner.restore` (our `--resume`) brings ASHA back with empty rungs: a later trial is
then judged against nothing and runs on where an uninterrupted search would have stopped it, and the resumed search
is not the search that was interrupted. `ResumableASHA` writes its rungs beside the experiment after every result
and reads them back when Tune unpickles it on restore.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from oodray.io import atomic_write_bytes

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
        atomic_write_bytes(self._state_path, pickle.dumps(self.__dict__))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        path = state.get("_state_path")
        if path and os.path.exists(path):  # written by this experiment's earlier run (trusted as tuner.pkl is)
            with open(path, "rb") as f:
                self.__dict__.update(pickle.load(f))
            self._state_path = path
            log.info("ASHA rungs restored from %s", path)
