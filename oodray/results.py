"""Results tables of a search experiment: ranked trials with their knobs, proxy and AutoAttack numbers, and plots.

    python -m oodray.results runs/tune-digits-robust-<hash>
    python -m oodray.results runs/EXP_A --compare runs/EXP_B

Reads only plain files (Tune's per-trial `params.json`/`result.json`, the experiment's `oodray_config.json`,
the Train checkpoints and the evaluation `summary.json`s), never unpickles anything, and writes `results.csv`,
`results.md`, `results.json` and `pareto.png` (clean vs robust accuracy, trials vs the undefended classifier).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from oodray.cli import run
from oodray.config import ExperimentConfig
from oodray.errors import ConfigError, OodrayError
from oodray.io import atomic_write_text
from oodray.models.translator import latest_checkpoint
from oodray.search_space import trial_name, trial_overrides
from oodray.storage import exists, is_uri, mirror_down, mirror_up

RESULT_FILES = ["results.csv", "results.md", "results.json", "pareto.png"]
KNOBS = ["translator.depth", "translator.width", "translator.blocks", "translator.downsamplings", "translator.norm",
         "translator.residual", "train.regime", "train.lr"]
WEIGHTS = ["loss.pixel", "loss.consistency", "loss.ce", "loss.feature", "loss.identity", "loss.clean_consistency",
           "loss.gan"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by an interruption
    return rows


def _read_json(path: Path) -> Any:
    """A JSON file of the experiment; an unreadable or cut one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OodrayError(f"'{path}' is unreadable or not valid JSON ({e}); it was cut short or damaged") from None


def load_trials(exp_dir: str | Path) -> list[dict[str, Any]]:
    """One record per Tune trial: params, resolved config, per-epoch history, last metrics, latest checkpoint."""
    exp_dir = Path(exp_dir)
    cfg_path = exp_dir / "oodray_config.json"
    if not cfg_path.exists():
        raise OodrayError(f"'{exp_dir}' is not an oodray experiment (no oodray_config.json)")
    try:
        base = ExperimentConfig.from_dict(_read_json(cfg_path))
    except ConfigError as e:
        raise ConfigError(f"'{cfg_path}': {e}") from None
    trials = []
    for params_file in sorted(exp_dir.glob("*/params.json")):
        tdir = params_file.parent
        history = _read_jsonl(tdir / "result.json")
        if not history:
            continue
        params = _read_json(params_file)
        trial_id = history[-1].get("trial_id") or tdir.name
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
    base = _read_json(exp_dir / "oodray_config.json") if (exp_dir / "oodray_config.json").exists() else {}
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
            row.update(_eval_columns(_read_json(summary)))
        rows.append(row)
    und = exp_dir / "eval" / "undefended" / "summary.json"
    if und.exists():
        summary = _read_json(und)
        rows.append({"rank": None, "trial": "undefended", "arch": "identity", **_eval_columns(summary)})
    if not rows:
        raise OodrayError(f"experiment '{exp_dir}' has no finished trial results yet")
    table = pd.DataFrame(rows)
    ints = [c for c in ("rank", "depth", "width", "blocks", "downsamplings", "epochs") if c in table]
    return table.astype({c: "Int64" for c in ints})  # whole numbers stay whole beside the undefended row's gaps


def write_outputs(table: pd.DataFrame, out_dir: str | Path) -> None:
    out = Path(out_dir)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    cells = table.astype(object).where(table.notna(), None)  # gaps (undefended row, other arch's knobs) stay blank
    atomic_write_text(out / "results.md", cells.to_markdown(index=False, floatfmt=".4f", missingval=""))
    atomic_write_text(out / "results.json", table.to_json(orient="records", indent=1))
    plot_pareto(table, out / "pareto.png")


def _robust_column(table: pd.DataFrame) -> str | None:
    cols = [c for c in table.columns if c.startswith("AA adaptive/")]
    return cols[0] if cols else None


def plot_pareto(table: pd.DataFrame, path: Path) -> None:
    """Clean vs robust accuracy: AutoAttack adaptive where evaluated, else the proxy; undefended as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    trials = table[table["trial"] != "undefended"]
    ax.scatter(trials["clean acc (proxy)"], trials["robust acc (proxy, adaptive PGD)"], c="tab:blue",
               label="trials (proxy: PGD end to end, validation)")
    rc = _robust_column(table)
    if rc:
        ev = table[table[rc].notna()]
        ax.scatter(ev["AA clean C(T)"], ev[rc], marker="s", c=["tab:red" if t == "undefended" else "tab:green"
                                                              for t in ev["trial"]], s=60)
        for _, r in ev.iterrows():
            ax.annotate(r["trial"], (r["AA clean C(T)"], r[rc]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], marker="s", c="tab:green", label=f"{rc} (test subset)")
        ax.scatter([], [], marker="s", c="tab:red", label="undefended classifier")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("robust accuracy")
    ax.set_title("clean vs robust accuracy (adaptive attacker)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def compare(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    """Best trial and undefended row of two experiments side by side."""
    def pick(t: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([t[t["trial"] != "undefended"].head(1), t[t["trial"] == "undefended"]])

    return pd.concat([pick(a).assign(experiment=name_a), pick(b).assign(experiment=name_b)], ignore_index=True)


def _local(experiment: str, local_dir: str) -> Path:
    """The experiment as a local directory (a URI experiment is mirrored down first)."""
    if is_uri(experiment):
        if not exists(experiment):
            raise OodrayError(f"experiment '{experiment}' does not exist")
        return mirror_down(experiment, Path(local_dir) / experiment.rstrip("/").rsplit("/", 1)[-1])
    if not Path(experiment).is_dir():
        raise OodrayError(f"experiment directory '{experiment}' does not exist")
    return Path(experiment)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.results", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="experiment directory (storage/name), or its s3:// / gs:// / file:// URI")
    p.add_argument("--local-dir", default="runs", help="where a URI experiment is mirrored to")
    p.add_argument("--compare", help="a second experiment directory to compare with")
    args = p.parse_args(argv)
    exp = _local(args.experiment, args.local_dir)
    table = build_table(exp)
    try:
        write_outputs(table, exp)
    except OSError as e:
        target = e.filename2 or e.filename  # os.replace(tmp, target) names the target second
        raise OodrayError(f"cannot write the results into '{exp}' ({e.strerror or e}: '{target}')") from None
    if is_uri(args.experiment):
        mirror_up(exp, args.experiment, RESULT_FILES)
    print(table.to_string(index=False))
    if args.compare:
        other = _local(args.compare, args.local_dir)
        print("\n" + compare(table, build_table(other), exp.name, other.name).to_string(index=False))
    print(f"\nwrote {exp / 'results.csv'}, results.md, results.json, pareto.png")
    return 0


if __name__ == "__main__":
    run(main)
