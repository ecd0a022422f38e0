"""Results tables of a search experiment: ranked trials with their knobs, proxy and AutoAttack numbers, and plots.

    python -m oodray.results runs/tune-digits-robust-<hash>                 # the leaderboard (fits 120 columns)
    python -m oodray.results runs/tune-digits-robust-<hash> --wide --sort proxy --format md
    python -m oodray.results runs/digits-experiment/search runs/digits-experiment/eval/*   # merged, by threat model
    python -m oodray.results runs/EXP_A --compare runs/EXP_B

Reads only plain files (Tune's per-trial `params.json`/`result.json`, the experiment's `oodray_config.json`,
the Train checkpoints and the evaluation `summary.json`s), never unpickles anything, and writes into each experiment
`results.csv`, `results.md`, `results.json` (every column: knobs, proxy and AutoAttack numbers, per-shift accuracy)
and the plots: `pareto.png` (clean vs robust accuracy), `shifts.png` (accuracy vs severity per shift, C vs C(T)),
`robust-vs-eps.png` (when several eps were evaluated) and `robust-vs-compute.png` (when trials report compute).

What it prints is a RobustBench-style leaderboard, a view of those files: one row per defence (searched trials, the
undefended classifier, baselines evaluated into `<experiment>/eval/<name>/` or given as evaluation directories
made by `python -m oodray.evaluate --out DIR`), ranked by adaptive AutoAttack robust accuracy where evaluated, else
by the search's proxy, grouped by dataset and threat model (norm, eps, AutoAttack version, n) named in a header.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path
from typing import Any

import pandas as pd

from oodray.cli import run
from oodray.config import ExperimentConfig, classifier_key
from oodray.errors import ConfigError, OodrayError
from oodray.io import read_json
from oodray.plots import plot_compute
from oodray.search_space import trial_name
from oodray.storage import exists, is_uri, mirror_down, mirror_up
from oodray.summaries import eval_summaries, read_summary
from oodray.tables import (
    KNOBS,
    RESULT_FILES,
    WEIGHTS,
    build_table,
    compare,
    latest_checkpoint,
    load_trials,
    rank_trials,
    write_tables,
)

__all__ = ["KNOBS", "RESULT_FILES", "WEIGHTS", "build_table", "compare", "files_line", "latest_checkpoint",
           "load_leaderboard", "load_trials", "main", "print_leaderboard", "rank_trials", "render_leaderboard",
           "write_outputs"]


# --- the leaderboard: a view of the tables above, one row per defence, grouped by dataset and threat model ----------

THREATS = ("adaptive", "oblivious", "transfer")
GROUP = ["dataset", "norm", "eps", "version", "n"]
# The default view fits 120 columns; its first accuracy column is the number that counts (adaptive AutoAttack).
LEADERBOARD = ["#", "defence", "kind", "arch", "AA adaptive", "clean C(T)", "drop vs C", "AA oblivious",
               "AA transfer", "shifts", "proxy", "compute"]
# Knob columns of build_table shown by --wide, under their leaderboard names (translator.norm is 'norm' there).
WIDE = {"depth": "depth", "width": "width", "blocks": "blocks", "downsamplings": "downsamplings", "norm": "norm layer",
        "residual": "residual", "regime": "regime", "lr": "lr", "lr_schedule": "lr schedule", "steps": "attack steps",
        "attacks": "attacks", "epochs": "epochs",
        "time s": "time s"}
# Training compute of a defence, in forward+backward passes per example summed (oodray.compute): the classifier's, plus
# the translator's own and its oblivious cache's. Evaluations carry it in summary.json (`training_compute`); trials
# not evaluated yet take it from their last reported metrics and the experiment's classifier.
COMPUTE_UNIT = "fwd+bwd passes"
MAX_NAME = 22  # names are cut to this in the table view so that it fits 120 columns
LEGEND = "\n".join([
    "AA: AutoAttack robust accuracy on the fixed test subset. adaptive: end to end through C(T(.)) (the number that "
    "counts);",
    "oblivious: crafted on C alone; transfer: crafted on an independent surrogate. drop vs C: clean C - clean C(T).",
    "shifts: C(T) accuracy over the natural shifts, mean of severities 1-5. proxy: the search's PGD robust accuracy on",
    "validation. Rank: adaptive AutoAttack where evaluated, else proxy. compute: training compute of the whole defence",
    "in forward+backward passes per example, attack steps included (PGD-k: k+1), classifier + translator + its cache."])


def _row_base(summary: dict[str, Any], defence: str, kind: str, source: str) -> dict[str, Any]:
    cfg = summary.get("config") or {}
    c, ct = summary.get("clean_accuracy_classifier"), summary.get("clean_accuracy_defended")
    shifts = summary.get("shifts") or {}
    row = {"dataset": (cfg.get("data") or {}).get("name"), "version": summary.get("version"),
           "n": summary.get("n_examples"), "defence": defence, "kind": kind, "arch": summary.get("translator"),
           "source": source, "clean C": c, "clean C(T)": ct,
           "drop vs C": c - ct if c is not None and ct is not None else None,
           "shifts": sum(v["defended"] for v in shifts.values()) / len(shifts) if shifts else None}
    tc = summary.get("training_compute") or {}
    if tc.get("passes") is not None:
        row.update({"compute": float(tc["passes"]), "compute unit": COMPUTE_UNIT})
    wall = [tc.get(k) for k in ("classifier_wall_seconds", "translator_wall_seconds") if tc.get(k) is not None]
    if wall:
        row["train wall s"] = round(sum(wall), 1)
    row.update({f"shift {k}": v["defended"] for k, v in sorted(shifts.items())})
    return row


def summary_rows(summary: dict[str, Any], defence: str, kind: str, source: str) -> list[dict[str, Any]]:
    """Leaderboard rows of one evaluation `summary.json`: one per (norm, eps) it attacked."""
    base = _row_base(summary, defence, kind, source)
    by_tm: dict[tuple[str, float], dict[str, float]] = {}
    for key, acc in (summary.get("robust") or {}).items():
        threat, norm, eps = key.split("/")
        by_tm.setdefault((norm, float(eps)), {})[threat] = acc
    rows = []
    for (norm, eps), acc in by_tm.items():
        if summary.get("translator") == "identity" and "adaptive" in acc:
            acc.setdefault("oblivious", acc["adaptive"])  # no translator: the oblivious attacker is the adaptive one
        rows.append({**base, "norm": norm, "eps": eps, **{f"AA {t}": acc.get(t) for t in THREATS}})
    if not rows:  # a clean/shifts-only evaluation still belongs to its config's threat model
        ev, at = (summary.get("config") or {}).get("eval") or {}, (summary.get("config") or {}).get("attack") or {}
        rows.append({**base, "norm": (ev.get("norms") or [at.get("norm")])[0],
                     "eps": float((ev.get("eps") or [at.get("eps")])[0])})
    return rows


def _compute(history: list[dict[str, Any]], classifier_passes: float | None) -> tuple[float | None, str | None]:
    """(training compute of a trial's defence, its unit) from its reported metrics and its classifier's passes; the
    examples it trained on when it reported no passes (older runs); (None, None) when nothing is known."""
    last = history[-1] if history else {}
    if last.get("compute_passes") is not None and classifier_passes is not None:
        return float(last["compute_passes"] + last.get("cache_passes", 0.0) + classifier_passes), COMPUTE_UNIT
    per_epoch = {m.get("epoch"): m["train_examples"] for m in history if m.get("train_examples") is not None}
    return (float(sum(per_epoch.values())), "translator training examples") if per_epoch else (None, None)


def recorded_classifier_passes(cfg: ExperimentConfig) -> float | None:
    """The training passes recorded for the experiment's fixed classifier (its cached metrics.json), if any."""
    path = cfg.resolved_cache_dir() / "classifiers" / classifier_key(cfg) / "metrics.json"
    try:
        return read_json(path).get("compute_passes")
    except OodrayError:
        return None


def experiment_leaderboard(exp_dir: str | Path, table: pd.DataFrame) -> pd.DataFrame:
    """Every row of an experiment (its `build_table` plus the baselines under eval/): trials with their knobs,
    proxy and compute, the undefended classifier and baselines, one row per threat model they were attacked with."""
    exp_dir = Path(exp_dir)
    cfg = ExperimentConfig.from_dict(read_json(exp_dir / "oodray_config.json"))
    histories = {trial_name(t["trial_id"]): t["history"] for t in load_trials(exp_dir)}
    summaries = eval_summaries(exp_dir) if (exp_dir / "eval").is_dir() else {}
    # C's passes: recorded with it, else as the undefended evaluation derived them (a classifier cached by an older
    # version), so that trial rows and evaluated rows count the same things.
    classifier_passes = recorded_classifier_passes(cfg)
    if classifier_passes is None:
        classifier_passes = ((summaries.get("undefended") or {}).get("training_compute") or {}).get("classifier_passes")
    rows: list[dict[str, Any]] = []
    for _, r in table[table["trial"] != "undefended"].iterrows():
        knobs = {name: r.get(k) for k, name in WIDE.items() if k in r and pd.notna(r.get(k))}
        compute, unit = _compute(histories.get(r["trial"], []), classifier_passes)
        extra = {**knobs, "proxy": r.get("robust acc (proxy, adaptive PGD)"), "objective": r.get("objective"),
                 "compute": compute, "compute unit": unit}
        if r["trial"] in summaries:
            rows += [{**row, **extra, **{k: v for k, v in row.items() if k.startswith("compute") and v is not None}}
                     for row in summary_rows(summaries[r["trial"]], r["trial"], "trial", exp_dir.name)]
        else:  # not evaluated with AutoAttack: ranked by its proxy, in the experiment's main threat model
            rows.append({"dataset": cfg.data.name, "norm": cfg.eval_norms()[0], "eps": float(cfg.eval_eps()[0]),
                         "version": cfg.eval.version, "n": cfg.eval.n_examples, "defence": r["trial"], "kind": "trial",
                         "arch": r.get("arch"), "source": exp_dir.name, **extra})
    for label, summary in summaries.items():
        if not label.startswith("trial-"):
            kind = "undefended" if label == "undefended" else "refit" if label.startswith("refit-") else "baseline"
            rows += summary_rows(summary, label, kind, exp_dir.name)
    return pd.DataFrame(rows)


def eval_dir_leaderboard(eval_dir: str | Path) -> pd.DataFrame:
    """The rows of a plain evaluation directory (`python -m oodray.evaluate --out DIR`)."""
    summary = read_summary(Path(eval_dir) / "summary.json")
    label = summary.get("label") or Path(eval_dir).name
    return pd.DataFrame(summary_rows(summary, label, "undefended" if label == "undefended" else "baseline",
                                     Path(eval_dir).name))


def rank_leaderboard(lb: pd.DataFrame) -> pd.DataFrame:
    """Ranks within each (dataset, threat model) group: adaptive AutoAttack where evaluated, then by proxy."""
    lb = lb.copy()
    for col in ["AA adaptive", "clean C(T)", "proxy", "compute", "compute unit"]:
        if col not in lb:
            lb[col] = None
    evaluated = lb["AA adaptive"].notna()
    lb["_k1"] = evaluated.astype(int)
    lb["_k2"] = lb["AA adaptive"].where(evaluated, lb["proxy"]).astype(float).fillna(-1.0)
    lb["_k3"] = lb["clean C(T)"].astype(float).fillna(-1.0)
    lb = lb.sort_values(["dataset", "norm", "eps", "_k1", "_k2", "_k3"], ascending=[True, True, True, False, False,
                                                                                     False], kind="stable")
    lb["#"] = lb.groupby(GROUP, dropna=False).cumcount() + 1
    lb = lb.drop(columns=["_k1", "_k2", "_k3"]).reset_index(drop=True)
    dup = lb.duplicated(GROUP + ["defence"], keep=False)  # the same name from two sources (e.g. two undefended)
    lb.loc[dup, "defence"] = lb.loc[dup, "source"] + ":" + lb.loc[dup, "defence"]
    ints = [c for c in ("#", "n", "depth", "width", "blocks", "downsamplings", "epochs") if c in lb]
    return lb.astype({c: "Int64" for c in ints})  # whole numbers stay whole beside other rows' gaps


def load_leaderboard(paths: list[str | Path]) -> pd.DataFrame:
    """The merged, ranked leaderboard of experiments and evaluation directories."""
    frames = []
    for p in paths:
        p = Path(p)
        if (p / "oodray_config.json").exists():
            frames.append(experiment_leaderboard(p, build_table(p)))
        elif (p / "summary.json").exists():
            frames.append(eval_dir_leaderboard(p))
        else:
            raise OodrayError(f"'{p}' is not an oodray experiment (no oodray_config.json) nor an evaluation "
                              "directory (no summary.json)")
    return rank_leaderboard(pd.concat(frames, ignore_index=True))


def view_columns(lb: pd.DataFrame, wide: bool = False, columns: str | None = None) -> list[str]:
    """The columns shown: the default LEADERBOARD, + knobs with --wide, or exactly --columns (names checked)."""
    known = list(lb.columns)
    if columns:
        asked = [c.strip() for c in columns.split(",") if c.strip()]
        bad = [c for c in asked if c not in known]
        if bad:
            raise ConfigError(f"--columns: unknown column '{bad[0]}'; known: {', '.join(known)}")
        return asked
    cols = list(LEADERBOARD)
    if wide:
        cols += [c for c in [*WIDE.values(), "objective", "compute unit"] if c in lb.columns]
        cols += sorted(c for c in lb if c.startswith("shift "))
    return cols


def sort_leaderboard(lb: pd.DataFrame, sort: str | None) -> pd.DataFrame:
    """--sort COL: highest first for numbers (lowest first for '#'), A-Z for names; rank numbers stay."""
    if not sort:
        return lb
    known = list(lb.columns)
    if sort not in known:
        raise ConfigError(f"--sort: unknown column '{sort}'; known: {', '.join(known)}")
    ascending = sort == "#" or not pd.api.types.is_numeric_dtype(lb[sort].dropna().infer_objects())
    return lb.sort_values([*GROUP, sort], ascending=[True] * len(GROUP) + [ascending], kind="stable",
                          na_position="last").reset_index(drop=True)


def group_title(key: tuple[Any, ...], sources: list[str]) -> str:
    dataset, norm, eps, version, n = key
    title = f"{dataset} | threat model {norm} eps {eps:g} | AutoAttack {version} | n={n} test images | "
    rest = ", ".join(sources)
    return title + (rest if len(title + rest) <= 120 else rest[:117 - len(title)] + "...")


FORMATS = ("table", "md", "csv", "json")


def _fixed_width(cells: pd.DataFrame) -> str:
    """A plain terminal table: two-line headers ('AA' over 'adaptive'), numbers right-aligned with 4 decimals, names
    cut to MAX_NAME, two spaces between columns; blank cells stay blank."""
    def text(v: Any, col: str) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            if col == "compute":
                return f"{v:.0f}" if v < 1e7 and v == int(v) else f"{v:.3g}"
            return f"{v:.3g}" if col == "lr" else f"{v:.1f}" if col == "time s" else f"{v:.4f}"
        s = str(v)
        return s if len(s) <= MAX_NAME else s[:MAX_NAME - 1] + "~"

    cols = []
    for c in cells.columns:
        vals = [v for v in cells[c] if v is not None]
        numeric = bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        top, bottom = c.split(" ", 1) if " " in c and len(c) > 6 else ("", c)
        body = [text(v, c) for v in cells[c]]
        w = max(len(top), len(bottom), *(len(b) for b in body))
        just = str.rjust if numeric else str.ljust
        cols.append([just(top, w), just(bottom, w), "-" * w, *(just(b, w) for b in body)])
    return "\n".join("  ".join(col[i] for col in cols).rstrip() for i in range(len(cols[0]))).lstrip("\n")


def render_leaderboard(lb: pd.DataFrame, columns: list[str], fmt: str = "table") -> str:
    """The leaderboard as text: per group a header line naming the threat model, then the table (table, md); one
    flat table with the group columns first (csv, json)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not accepted; choose one of: {', '.join(FORMATS)}")
    if fmt in ("csv", "json"):
        flat = lb[GROUP + [c for c in columns if c not in GROUP]]
        return flat.to_csv(index=False) if fmt == "csv" else flat.to_json(orient="records", indent=1) + "\n"
    out = []
    for key, g in lb.groupby(GROUP, sort=False, dropna=False):
        cells = g[columns].astype(object).where(g[columns].notna(), None)
        title = group_title(key, list(dict.fromkeys(g["source"])))
        if fmt == "md":
            out.append(f"## {title}\n\n{cells.to_markdown(index=False, floatfmt='.4f', missingval='')}\n")
        else:
            out.append(f"{title}\n\n{_fixed_width(cells)}\n")
    if fmt == "table":
        out.append(LEGEND + "\n")
    return "\n".join(out)


def _local(experiment: str, local_dir: str) -> Path:
    """The experiment as a local directory (a URI experiment is mirrored down first)."""
    if is_uri(experiment):
        if not exists(experiment):
            raise OodrayError(f"experiment '{experiment}' does not exist")
        return mirror_down(experiment, Path(local_dir) / experiment.rstrip("/").rsplit("/", 1)[-1])
    if not Path(experiment).is_dir():
        raise OodrayError(f"experiment directory '{experiment}' does not exist")
    return Path(experiment)


def _expand(paths: list[str]) -> list[str]:
    """Quoted globs are expanded here (the shell expands unquoted ones); URIs pass through."""
    out: list[str] = []
    for p in paths:
        hits = sorted(glob.glob(p)) if not is_uri(p) and any(ch in p for ch in "*?[") else []
        out += hits or [p]
    return out


def write_outputs(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every results file of an experiment (see `tables.write_tables`) and, once its trials report training compute,
    robust-vs-compute.png; returns the plots written."""
    out = Path(out_dir)
    plots = write_tables(table, out)
    if (out / "oodray_config.json").exists():
        lb = experiment_leaderboard(out, table)
        trials = lb[lb["compute"].notna() & (lb["kind"] == "trial")] if "compute" in lb else lb.iloc[:0]
        if len(trials):
            plot_compute(trials, out / "robust-vs-compute.png")
            plots.append(out / "robust-vs-compute.png")
    return plots


def _write(table: pd.DataFrame, exp: Path) -> list[Path]:
    try:
        return write_outputs(table, exp)
    except OSError as e:
        target = e.filename2 or e.filename  # os.replace(tmp, target) names the target second
        raise OodrayError(f"cannot write the results into '{exp}' ({e.strerror or e}: '{target}')") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.results", description=__doc__.split("\n")[0])
    p.add_argument("experiment", nargs="+", help="experiment directories (storage/name) or their s3:// / gs:// / "
                   "file:// URIs, and evaluation directories (python -m oodray.evaluate --out DIR); globs accepted")
    p.add_argument("--wide", action="store_true", help="also show the knobs and per-shift accuracy")
    p.add_argument("--columns", help="exactly these columns, comma-separated (names as in --wide)")
    p.add_argument("--sort", help="column to order rows by within each threat model (default: the rank '#')")
    p.add_argument("--format", default="table", help=f"output: {' | '.join(FORMATS)} (default table)")
    p.add_argument("--local-dir", default="runs", help="where a URI experiment is mirrored to")
    p.add_argument("--compare", help="a second experiment directory to compare with")
    args = p.parse_args(argv)
    if args.format not in FORMATS:  # checked before anything is read or written
        raise ConfigError(f"--format {args.format!r} is not accepted; choose one of: {', '.join(FORMATS)}")
    dirs, written = [], []
    for name in _expand(args.experiment):
        d = _local(name, args.local_dir)
        dirs.append(d)
        if not (d / "oodray_config.json").exists():
            continue  # an evaluation directory: read only
        written.append((d, _write(build_table(d), d)))
        if is_uri(name):
            mirror_up(d, name, RESULT_FILES)
    lb = load_leaderboard(dirs)
    columns = view_columns(lb, args.wide, args.columns)
    print(render_leaderboard(sort_leaderboard(lb, args.sort), columns, args.format), end="")
    if args.compare:
        other = _local(args.compare, args.local_dir)
        print("\n" + compare(build_table(dirs[0]), build_table(other), dirs[0].name, other.name).to_string(index=False))
    if args.format == "table":
        for d, plots in written:
            print(f"\n{files_line(d, plots)}")
    return 0


def print_leaderboard(exp_dir: Path, table: pd.DataFrame) -> None:
    """The default leaderboard of one experiment on stdout (what `python -m oodray.tune` ends with)."""
    lb = rank_leaderboard(experiment_leaderboard(exp_dir, table))
    print("\n" + render_leaderboard(lb, view_columns(lb)), end="")


def files_line(exp_dir: Path, plots: list[Path]) -> str:
    """Where the full table and the plots of an experiment are (the CLIs' last lines)."""
    return (f"results: {exp_dir / 'results.md'} (every column; also results.csv, results.json)\n"
            f"plots: {', '.join(str(p) for p in plots)}")


if __name__ == "__main__":
    run(main)
