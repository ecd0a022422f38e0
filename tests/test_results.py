"""The results leaderboard (view, ranking, merging, formats, bad input), the plots beside pareto.png, the progress
display, Tune's live-table knobs and experiments/summarize.py, on experiment directories written here (no Ray)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, assert_one_line_error, run_cli

from oodray.cli import run
from oodray.config import resolve_config
from oodray.progress import Progress, set_quiet, varying_knobs
from oodray.results import (
    LEADERBOARD,
    build_table,
    load_leaderboard,
    main,
    render_leaderboard,
    view_columns,
    write_outputs,
)
from oodray.shifts import SEVERITIES, SHIFTS

CFG = resolve_config("digits").to_dict()  # Linf eps 0.2, AutoAttack standard, n=200, as the demo


def _summary(label: str, translator: str, clean_c: float, clean_ct: float, robust: dict[str, float],
             dataset: str = "digits", n: int = 200, shift: float = 0.9) -> dict:
    cfg = json.loads(json.dumps(CFG))
    cfg["data"]["name"] = dataset
    return {"label": label, "translator": translator, "checkpoint": None, "stochastic_translator": False,
            "clean_accuracy_classifier": clean_c, "clean_accuracy_defended": clean_ct, "robust": robust,
            "attack_target_accuracy": dict(robust),
            "shifts": {s: {"classifier": shift - 0.01 * i, "defended": shift - 0.02 * i} for i, s in enumerate(SHIFTS)},
            "gate_flag_rate": None, "sanity": [], "n_examples": n, "version": "standard", "config": cfg}


def _write_eval(d: Path, summary: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary))
    per = {s: {"mean": v, "severity": {str(k): {"classifier": v["classifier"] - 0.01 * k,
                                                  "defended": v["defended"] - 0.02 * k} for k in SEVERITIES}}
           for s, v in summary["shifts"].items()}
    (d / "shifts.json").write_text(json.dumps({"shifts": per, "complete": True}))
    return d


def _trial(exp: Path, tid: str, params: dict, proxy: float, clean: float, extra: dict | None = None) -> None:
    d = exp / f"trial_driver_{tid}"
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params))
    lines = [{"trial_id": tid, "epoch": e, "objective": proxy - 0.01 * (3 - e), "robust_accuracy": proxy,
              "clean_accuracy": clean, "time_total_s": 10.0 * e, "loss_pixel": 0.1, **(extra or {})} for e in (1, 2, 3)]
    (d / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))


def make_experiment(root: Path, name: str = "tune-digits-robust-0123456789", compute: bool = False) -> Path:
    """A finished demo-like experiment: 4 trials (one evaluated), the undefended classifier, a bitdepth baseline."""
    exp = root / name
    exp.mkdir(parents=True)
    (exp / "oodray_config.json").write_text(json.dumps(CFG))
    unet = {"translator.arch": "unet", "translator.depth": 1, "translator.width": 16, "train.regime": "adaptive",
            "loss.clean_consistency": 2.6, "attack.attacks": "pgd", "attack.eps_mix": "eps"}
    resnet = {"translator.arch": "resnet", "translator.blocks": 2, "translator.downsamplings": 1, "translator.width": 8,
              "train.regime": "oblivious", "attack.attacks": "pgd,fgsm", "attack.eps_mix": "eps"}
    for i, (tid, params, proxy) in enumerate([("aaaa0001", unet, 0.31), ("bbbb0002", resnet, 0.12),
                                              ("cccc0003", unet, 0.22), ("dddd0004", resnet, 0.05)]):
        _trial(exp, tid, params, proxy, 0.97, {"train_examples": 1000 * (i + 1)} if compute else None)
    _write_eval(exp / "eval" / "trial-aaaa0001", _summary(
        "trial-aaaa0001", "unet", 0.995, 0.990,
        {"oblivious/Linf/0.2": 0.115, "adaptive/Linf/0.2": 0.060, "transfer/Linf/0.2": 0.325}))
    _write_eval(exp / "eval" / "undefended", _summary(
        "undefended", "identity", 0.995, 0.995,
        {"oblivious/Linf/0.2": 0.0, "adaptive/Linf/0.2": 0.0, "transfer/Linf/0.2": 0.125}))
    _write_eval(exp / "eval" / "bitdepth", _summary(
        "bitdepth", "bitdepth", 0.995, 0.985,
        {"oblivious/Linf/0.2": 0.045, "adaptive/Linf/0.2": 0.015, "transfer/Linf/0.2": 0.275}))
    return exp


def test_default_leaderboard_fits_120_columns_with_adaptive_autoattack_first(tmp_path, capsys):
    exp = make_experiment(tmp_path)
    assert main([str(exp)]) == 0
    out = capsys.readouterr().out
    board = [line for line in out.splitlines() if not line.startswith(("results: ", "plots: "))]  # paths vary
    assert max(len(line) for line in board) <= 120, max(board, key=len)
    title = next(line for line in out.splitlines() if "threat model" in line)
    for words in ("digits", "Linf eps 0.2", "AutoAttack standard", "n=200"):
        assert words in title, title
    rule = next(i for i, line in enumerate(board) if line.startswith("-  ---"))
    spans = [m.span() for m in re.finditer(r"-+", board[rule])]  # two-line headers: 'AA' over 'adaptive'
    names = [" ".join(w for w in (board[rule - 2][a:b].strip(), board[rule - 1][a:b].strip()) if w) for a, b in spans]
    assert names == LEADERBOARD, names
    first = board[rule + 1]
    assert [first[a:b].strip() for a, b in spans][:5] == ["1", "trial-aaaa0001", "trial", "unet", "0.0600"]
    # The first column that holds numbers other than the rank is the adaptive AutoAttack accuracy.
    lb = load_leaderboard([exp])
    numeric = [c for c in view_columns(lb) if c != "#" and lb[c].notna().any()
               and pd.api.types.is_numeric_dtype(lb[c].dropna().infer_objects())]
    assert numeric[0] == "AA adaptive"
    # Every row is ranked: undefended and baselines too; evaluated rows by AA adaptive, then trials by proxy.
    assert lb["#"].notna().all() and list(lb["#"]) == list(range(1, len(lb) + 1))
    assert list(lb["defence"]) == ["trial-aaaa0001", "bitdepth", "undefended", "trial-cccc0003", "trial-bbbb0002",
                                   "trial-dddd0004"]
    assert list(lb["kind"]) == ["trial", "baseline", "undefended", "trial", "trial", "trial"]
    best = lb.iloc[0]
    assert best["AA adaptive"] == 0.060 and best["AA oblivious"] == 0.115 and best["AA transfer"] == 0.325
    assert best["drop vs C"] == pytest.approx(0.995 - 0.990) and best["proxy"] == 0.31
    assert lb["compute"].isna().all()  # blank until trials report compute
    assert "loss_pixel" not in out
    assert "results.md" in out and "pareto.png" in out and "shifts.png" in out


def test_result_files_keep_every_column_of_build_table(tmp_path):
    exp = make_experiment(tmp_path)
    assert main([str(exp)]) == 0
    table = build_table(exp)
    csv = pd.read_csv(exp / "results.csv")
    assert list(csv.columns) == list(table.columns) and "kind" not in csv.columns
    assert "w_clean_consistency" in csv.columns and "robust acc (proxy, adaptive PGD)" in csv.columns
    header = (exp / "results.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == list(table.columns)
    # Writing again from the same table gives the same bytes (the leaderboard never feeds back into the files).
    before = {f: (exp / f).read_bytes() for f in ("results.csv", "results.md", "results.json")}
    write_outputs(table, exp)
    assert {f: (exp / f).read_bytes() for f in before} == before


def test_wide_columns_sort_and_formats(tmp_path, capsys):
    exp = make_experiment(tmp_path)
    lb = load_leaderboard([exp])
    wide = view_columns(lb, wide=True)
    assert wide[: len(LEADERBOARD)] == LEADERBOARD and {"depth", "blocks", "regime", "lr", "shift darker"} <= set(wide)
    assert main([str(exp), "--columns", "defence,proxy,AA adaptive", "--sort", "proxy", "--format", "csv"]) == 0
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(rows.columns) == ["dataset", "norm", "eps", "version", "n", "defence", "proxy", "AA adaptive"]
    trials = rows[rows["proxy"].notna()]
    assert list(trials["proxy"]) == sorted(trials["proxy"], reverse=True)
    md = render_leaderboard(lb, view_columns(lb), "md")
    assert md.startswith("## digits | threat model Linf eps 0.2") and "| trial-aaaa0001 |" in md
    records = json.loads(render_leaderboard(lb, view_columns(lb), "json"))
    assert records[0]["defence"] == "trial-aaaa0001" and records[0]["AA adaptive"] == 0.06


def test_merged_leaderboard_groups_by_dataset_and_threat_model(tmp_path, capsys):
    exp = make_experiment(tmp_path / "a")
    pgd_at = _write_eval(tmp_path / "evals" / "pgd-at", _summary(
        "pgd-at", "identity", 0.965, 0.965, {"adaptive/Linf/0.2": 0.37, "transfer/Linf/0.2": 0.59}))
    wide_eps = _write_eval(tmp_path / "evals" / "eps", _summary(
        "und-eps", "identity", 0.99, 0.99, {"adaptive/Linf/0.1": 0.2, "adaptive/Linf/0.2": 0.0}))
    fashion = _write_eval(tmp_path / "evals" / "fm", _summary(
        "undefended", "identity", 0.917, 0.917, {"adaptive/Linf/0.1": 0.0}, dataset="fashion-mnist", n=1000))
    assert main([str(exp), str(tmp_path / "evals" / "*")]) == 0  # a quoted glob is expanded
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if "| threat model" in line]
    assert [t.split(" | ")[:2] for t in titles] == [["digits", "threat model Linf eps 0.1"],
                                                    ["digits", "threat model Linf eps 0.2"],
                                                    ["fashion-mnist", "threat model Linf eps 0.1"]]
    board = [line for line in out.splitlines() if not line.startswith(("results: ", "plots: "))]
    assert "n=1000" in titles[2] and max(len(line) for line in board) <= 120
    lb = load_leaderboard([exp, pgd_at, wide_eps, fashion])
    g = lb[(lb["dataset"] == "digits") & (lb["eps"] == 0.2)]
    assert list(g["defence"][:2]) == ["pgd-at", "trial-aaaa0001"] and list(g["#"][:2]) == [1, 2]
    assert g.iloc[0]["AA oblivious"] == 0.37  # identity translator: the oblivious attacker is the adaptive one
    assert not (tmp_path / "evals" / "pgd-at" / "results.csv").exists()  # evaluation directories are only read


def _exits_2(capsys, argv: list[str], *needles: str) -> None:
    """In-process `python -m oodray.results ARGV` through the CLI wrapper: one error line, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    exp = make_experiment(tmp_path)
    _exits_2(capsys, [str(exp), "--sort", "speed"], "--sort", "'speed'", "AA adaptive")
    _exits_2(capsys, [str(exp), "--columns", "defence,color"], "'color'", "proxy")
    (tmp_path / "plain").mkdir()
    _exits_2(capsys, [str(exp), str(tmp_path / "plain")], "not an oodray experiment", "summary.json")
    # The real CLI process, once: nothing is read or written before the format is checked.
    (exp / "results.csv").unlink()
    assert_one_line_error(run_cli("oodray.results", str(exp), "--format", "xml"), "'xml'", "table, md, csv, json")
    assert not (exp / "results.csv").exists()


def test_plots_beside_pareto(tmp_path):
    exp = make_experiment(tmp_path, compute=True)
    _write_eval(exp / "eval" / "undefended", _summary(
        "undefended", "identity", 0.995, 0.995, {"adaptive/Linf/0.1": 0.3, "adaptive/Linf/0.2": 0.0}))
    written = write_outputs(build_table(exp), exp)
    assert {p.name for p in written} == {"pareto.png", "shifts.png", "robust-vs-eps.png", "robust-vs-compute.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    lb = load_leaderboard([exp])
    assert lb.set_index("defence").loc["trial-dddd0004", "compute"] == 3 * 4000.0  # summed over its 3 epochs
    plain = make_experiment(tmp_path / "b")  # one eps, no compute: only the plots the data supports
    assert {p.name for p in write_outputs(build_table(plain), plain)} == {"pareto.png", "shifts.png"}


def test_progress_bar_on_a_terminal_and_lines_in_a_log(caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress("evaluation", total=10, unit="img", stream=tty)
    for _ in range(3):
        bar.update(1, robust=0.5)
    assert "3/10" in tty.getvalue() and "robust=0.5000" in tty.getvalue()
    bar.update(7)
    assert "10/10" in tty.getvalue() and bar._closed

    now = [0.0]
    caplog.set_level(logging.INFO, logger="oodray.progress")
    bar = Progress("cache", total=100, unit="img", stream=io.StringIO(), clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.0
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "cache: 100 img to do" and lines[-1].startswith("cache: 100/100 img (100%)")
    assert 10 <= len(lines) <= 13, lines  # every 10% (or 30 s), not every update
    assert "cache: 50/100 img (50%), 50s elapsed, ETA 50s" in lines

    caplog.clear()
    set_quiet(True)
    try:
        q = Tty()
        bar = Progress("quiet", total=5, stream=q)
        bar.update(5)
        assert q.getvalue() == "" and not caplog.records
    finally:
        set_quiet(False)


def test_live_table_knobs_are_the_ones_that_vary():
    configs = [{"translator.arch": "unet", "train.regime": "adaptive", "train.lr": 1e-3, "loss.pixel": 0.5},
               {"translator.arch": "unet", "train.regime": "oblivious", "train.lr": 2e-3, "loss.pixel": 0.7}]
    assert varying_knobs(configs) == ["train.regime", "train.lr", "loss.pixel"]
    assert varying_knobs(configs, limit=2) == ["train.regime", "train.lr"]
    assert varying_knobs(configs[:1]) == ["translator.arch"]  # one trial: still a column, never all of them
    conditional = [{"translator.arch": "unet", "translator.depth": 2}, {"translator.arch": "resnet"}]
    assert varying_knobs(conditional) == ["translator.arch"]  # depth: not every trial has it


def test_summarize_reads_the_merged_rows(tmp_path):
    """experiments/summarize.py on an OUT dir of experiments/<dataset>.sh: search/ + eval/<baseline>/."""
    out = tmp_path / "digits-experiment"
    make_experiment(out, name="search")
    _write_eval(out / "eval" / "pgd-at", _summary("pgd-at", "identity", 0.965, 0.965,
                                                  {"adaptive/Linf/0.2": 0.37, "transfer/Linf/0.2": 0.59}))
    proc = subprocess.run([sys.executable, "experiments/summarize.py", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "# digits: defences under AutoAttack (standard), Linf eps 0.2"
    header = next(line for line in lines if line.startswith("| defence"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:7] == ["defence", "translator", "clean C", "clean C(T)", "adaptive (Linf/0.2)",
                        "oblivious (Linf/0.2)", "transfer (Linf/0.2)"]
    assert cols[7:] == [*sorted(SHIFTS), "compute (passes)", "train s", "eval s"]  # compute beside every row
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if re.match(r"\| (trial|und|bit|pgd)", line)]
    assert [r[0] for r in rows] == ["bitdepth", "trial-aaaa0001", "undefended", "pgd-at"]  # files in path order
    pgd = rows[-1]
    assert pgd[4] == "0.370" and pgd[5] == "0.370" and pgd[6] == "0.590"  # oblivious filled from adaptive
    assert pgd[7 + len(SHIFTS)] == "not recorded"  # a summary without training_compute says so, never 0


def test_budget_curves_show_every_attempts_wall_time(tmp_path):
    """experiments/budget_curves.py: eval s is the sum over attempts with their count; an older summary's last-run
    seconds are marked as such; the surrogate's training has its own column; the plot is written."""
    out, search = tmp_path / "budget", tmp_path / "search"
    search.mkdir()
    tc = {"passes": 864000.0, "classifier_wall_seconds": 970.0}
    new = {**_summary("pgd-at-b2", "identity", 0.77, 0.77, {"adaptive/Linf/0.2": 0.6}), "seconds": 373.0,
           "wall_seconds_total": 2468.4, "attempts": 3, "surrogate_train_seconds": 512.0, "training_compute": tc}
    old = {**_summary("undefended", "identity", 0.91, 0.91, {"adaptive/Linf/0.2": 0.0}), "seconds": 204.0,
           "training_compute": {**tc, "passes": 432000.0}}
    _write_eval(out / "pgd-at-b2", new)
    _write_eval(out / "undefended", old)
    proc = subprocess.run([sys.executable, "experiments/budget_curves.py", str(out), str(search),
                           str(tmp_path / "digits-budget")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    cols = [c.strip() for c in next(x for x in lines if x.startswith("| method")).strip("|").split("|")]
    rows = {r[1]: dict(zip(cols, r)) for r in ([c.strip() for c in x.strip("|").split("|")] for x in lines
                                                if re.match(r"\| (PGD|undef)", x))}
    assert rows["pgd-at-b2"]["eval s"] == "2468 (3)" and rows["pgd-at-b2"]["surrogate s"] == "512"
    assert rows["undefended"]["eval s"] == "204*" and rows["undefended"]["surrogate s"] == ""
    assert "marked * is the last attempt's only" in proc.stdout
    assert (tmp_path / "digits-budget-curves.png").stat().st_size > 1000
