"""The results tables of a search experiment: one row per trial (its knobs, loss weights, proxy metrics and, where
evaluated, AutoAttack and shift accuracies) and the undefended classifier, ranked; written as `results.csv`, `.md` and
`.json` (every column) beside the plots. Reads only plain files (Tune's per-trial `params.json`/`result.json`, the
experiment's `oodray_config.json`, the Train checkpoints and the evaluation `summary.json`s), never unpickles."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from oodray.config import ExperimentConfig
from oodray.errors import ConfigError, OodrayError
from oodray.io import atomic_write_text, read_json, read_jsonl, reading
from oodray.models.translator import latest_checkpoint
from oodray.plots import plot_extras, plot_pareto
from oodray.search_space import trial_name, trial_overrides
from oodray.summaries import read_summary

RESULT_FILES = ["results.csv", "results.md", "results.json", "pareto.png", "shifts.png", "robust-vs-eps.png",
                "robust-vs-compute.png"]
KNOBS = ["translator.depth", "translator.width", "translator.blocks", "translator.downsamplings", "translator.norm",
         "translator.residual", "train.regime", "train.lr", "train.lr_schedule", "attack.steps"]
WEIGHTS = ["loss.pixel", "loss.consistency", "loss.ce", "loss.feature", "loss.identity", "loss.clean_consistency",
           "loss.trades", "loss.gan"]


def load_trials(exp_dir: str | Path) -> list[dict[str, Any]]:
    """One record per Tune trial: params, resolved config, per-epoch history, last metrics, latest checkpoint."""
    exp_dir = Path(exp_dir)
    cfg_path = exp_dir / "oodray_config.json"
    if not cfg_path.exists():
        raise OodrayError(f"'{exp_dir}' is not an oodray experiment (no oodray_config.json)")
    try:
        base = ExperimentConfig.from_dict(read_json(cfg_path))
    except ConfigError as e:
        raise ConfigError(f"'{cfg_path}': {e}") from None
    trials = []
    for params_file in sorted(exp_dir.glob("*/params.json")):
        tdir = params_file.parent
        history = read_jsonl(tdir / "result.json")
        if not history:
            continue
        params = read_json(params_file)
        trial_id = history[-1].get("trial_id") or tdir.name
        with reading(params_file):
            cfg = base.replace(**trial_overrides(params, base))
        trials.append({
            "trial_id": trial_id, "params": params, "config": cfg.to_dict(), "history": history,
            "metrics": history[-1], "checkpoint": latest_checkpoint(exp_dir / "train" / trial_name(trial_id)),
        })
    return trials


def rank_trials(trials: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    def key(t: dict[str, Any]) -> tuple[float, float]:
        m = t["metrics"]
        first = m.get("robust_accuracy" if objective == "pareto" else "objective", -math.inf)
        return (first if first is not None else -math.inf, m.get("clean_accuracy") or -math.inf)

    return sorted(trials, key=key, reverse=True)


def _eval_columns(summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"AA clean C": summary.get("clean_accuracy_classifier"),
                           "AA clean C(T)": summary.get("clean_accuracy_defended")}
    for k, v in sorted(summary.get("robust", {}).items()):
        row[f"AA {k}"] = v
    shifts = summary.get("shifts") or {}
    if shifts:
        row["shifts mean C(T)"] = sum(s["defended"] for s in shifts.values()) / len(shifts)
        for name, s in sorted(shifts.items()):
            row[f"shift {name}"] = s["defended"]
    return row


def build_table(exp_dir: str | Path) -> pd.DataFrame:
    """The ranked table: trials (best first) and the undefended classifier, one row each."""
    exp_dir = Path(exp_dir)
    base = read_json(exp_dir / "oodray_config.json") if (exp_dir / "oodray_config.json").exists() else {}
    objective = base.get("tune", {}).get("objective", "robust")
    rows = []
    for rank, t in enumerate(rank_trials(load_trials(exp_dir), objective), 1):
        cfg, m = ExperimentConfig.from_dict(t["config"]), t["metrics"]
        d = cfg.to_dict()
        row: dict[str, Any] = {"rank": rank, "trial": trial_name(t['trial_id']), "arch": cfg.translator.arch}
        for k in KNOBS + WEIGHTS:
            sec, key = k.split(".")
            row[k.split(".")[1] if sec != "loss" else f"w_{key}"] = d[sec][key]
        row["attacks"] = "+".join(cfg.attack.attacks)
        row.update({"clean acc (proxy)": m.get("clean_accuracy"), "robust acc (proxy, adaptive PGD)":
                    m.get("robust_accuracy"), "objective": m.get("objective"), "epochs": m.get("epoch"),
                    "time s": round(m.get("time_total_s") or 0.0, 1)})
        summary = exp_dir / "eval" / trial_name(t['trial_id']) / "summary.json"
        if summary.exists():
            row.update(_eval_columns(read_summary(summary)))
        rows.append(row)
    und = exp_dir / "eval" / "undefended" / "summary.json"
    if und.exists():
        summary = read_summary(und)
        rows.append({"rank": None, "trial": "undefended", "arch": "identity", **_eval_columns(summary)})
    if not rows:
        raise OodrayError(f"experiment '{exp_dir}' has no finished trial results yet")
    table = pd.DataFrame(rows)
    ints = [c for c in ("rank", "depth", "width", "blocks", "downsamplings", "epochs") if c in table]
    return table.astype({c: "Int64" for c in ints})  # whole numbers stay whole beside the undefended row's gaps


def write_tables(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """results.csv/.md/.json (every column of `table`), pareto.png and the plots the evaluations support; returns the
    plots written (`oodray.results.write_outputs` adds the compute plot, which needs the leaderboard)."""
    out = Path(out_dir)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    cells = table.astype(object).where(table.notna(), None)  # gaps (undefended row, other arch's knobs) stay blank
    atomic_write_text(out / "results.md", cells.to_markdown(index=False, floatfmt=".4f", missingval=""))
    atomic_write_text(out / "results.json", table.to_json(orient="records", indent=1))
    plot_pareto(table, out / "pareto.png")
    return [out / "pareto.png", *plot_extras(out)]


def compare(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    """Best trial and undefended row of two experiments side by side."""
    def pick(t: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([t[t["trial"] != "undefended"].head(1), t[t["trial"] == "undefended"]])

    return pd.concat([pick(a).assign(experiment=name_a), pick(b).assign(experiment=name_b)], ignore_index=True)
