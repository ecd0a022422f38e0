"""Reading the evaluation files that `oodray.evaluate` writes (`summary.json`, `shifts.json`) for the tables, the
leaderboard and the plots: each is checked for the fields they use, so a damaged or foreign file is one line naming
it, never a traceback far from it. Imports only io."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oodray.io import read_json, reading


def read_summary(path: str | Path) -> dict[str, Any]:
    """An evaluation's summary.json, with the fields the results read checked."""
    s = read_json(path)
    with reading(path):
        for key in ("clean_accuracy_classifier", "clean_accuracy_defended"):
            if s.get(key) is not None:
                float(s[key])
        for name, acc in (s.get("robust") or {}).items():
            _threat, _norm, eps = name.split("/")
            float(eps), float(acc)
        for mean in (s.get("shifts") or {}).values():
            float(mean["defended"]), float(mean["classifier"])
    return s


def read_shifts(path: str | Path) -> dict[str, Any]:
    """An evaluation's shifts.json: shift -> {"severity": {"1".."5": {"classifier", "defended"}}, "mean": ...}."""
    shifts = read_json(path)
    with reading(path):
        shifts = shifts["shifts"]
        for per in shifts.values():
            for acc in per["severity"].values():
                float(acc["classifier"]), float(acc["defended"])
    return shifts


def eval_summaries(exp_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Evaluation label -> summary.json of every evaluation under <exp>/eval/ (trials, undefended, baselines)."""
    return {p.parent.name: read_summary(p) for p in sorted((Path(exp_dir) / "eval").glob("*/summary.json"))}
