"""`python -m oodray.tune` end to end on a real local Ray (tiny search on synthetic data), resume, results CLI."""

import json
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import optuna
import pandas as pd
import pytest
from conftest import ROOT, assert_one_line_error, run_cli

from oodray.errors import ConfigError, OodrayError
from oodray.locks import LOCK_FILE
from oodray.search_space import CONDITIONAL, SPACE, DefineByRun, narrowed_space

pytestmark = pytest.mark.ray

TINY = ["--dataset", "synthetic", "--num-samples", "2", "--epochs", "1", "--final-top-k", "1",
        "--set", "eval.n_examples=16", "--set", "train.max_batches=4", "--set", "train.proxy_examples=16",
        "--set", "train.cpus_per_worker=0.5",
        "--set", "tune.space={translator.width: [8], translator.blocks: [1], attack.steps: [5]}"]


def test_conditional_parameters_only_for_their_architecture():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = DefineByRun(narrowed_space({}), max_depth=3)
    for _ in range(30):
        trial = study.ask()
        define(trial)
        arch = trial.params["translator.arch"]
        for key, owner in CONDITIONAL.items():
            assert (key in trial.params) == (owner == arch), (key, arch, trial.params)
        assert trial.params.get("translator.depth", 1) <= 3
        study.tell(trial, 0.0)
    seen = {t.params["translator.arch"] for t in study.trials}
    assert seen == {"unet", "resnet"}


def test_space_narrowing():
    s = narrowed_space({"translator.arch": ["unet"], "loss.gan": 0.0, "train.lr": {"low": 1e-4, "high": 1e-3}})
    assert s["translator.arch"] == ("cat", ["unet"]) and s["loss.gan"] == ("fixed", 0.0)
    assert s["train.lr"][1][:2] == (1e-4, 1e-3)
    with pytest.raises(ConfigError, match="narrows 'translator.arch' to nothing"):
        narrowed_space({"translator.arch": []})
    with pytest.raises(ConfigError, match="'translator.heads' is not searched"):
        narrowed_space({"translator.heads": [2]})
    assert set(SPACE) >= set(CONDITIONAL)


def test_bohb_space_matches_the_optuna_space():
    """`tune.scheduler=bohb`: Ray's TuneBOHB proposes from `config_space`; each proposal is a valid config with plain
    Python values, conditional keys only under their architecture, depths capped by the image, fixed keys apart."""
    from ray.tune.search.bohb import TuneBOHB

    from oodray.config import ExperimentConfig
    from oodray.search_space import config_space, trial_overrides

    base = ExperimentConfig.from_dict({"data": {"name": "digits"}})
    cs, fixed = config_space(narrowed_space({"loss.gan": 0.0}), max_depth=2, seed=0)
    assert fixed == {"loss.gan": 0.0}
    searcher = TuneBOHB(space=cs, metric="objective", mode="max", seed=0)
    seen = set()
    for i in range(40):
        params = searcher.suggest(f"t{i}")
        arch = params["translator.arch"]
        seen.add(str(arch))
        for key, owner in CONDITIONAL.items():
            assert (key in params) == (owner == arch), (key, arch, params)
        assert params.get("translator.depth", 1) <= 2 and params.get("translator.downsamplings", 0) <= 1
        overrides = trial_overrides({**fixed, **params}, base)
        assert all(type(v) in (str, int, float, bool, tuple, type(None)) for v in overrides.values()), overrides
        cfg = base.replace(**overrides)
        assert cfg.translator.arch == arch and cfg.loss.gan == 0.0
    assert seen == {"unet", "resnet"}
    # One architecture: the other's conditional keys are not searched at all.
    cs, _ = config_space(narrowed_space({"translator.arch": ["unet"]}), max_depth=3, seed=0)
    assert "translator.depth" in cs and "translator.blocks" not in cs and not cs.conditions


def test_bohb_refusals(monkeypatch, tmp_path):
    from oodray import tune as tune_mod

    base = ["oodray.tune", "--dataset", "synthetic", "--storage", str(tmp_path), "--set", "tune.scheduler=bohb"]
    assert_one_line_error(run_cli(*base, "--objective", "pareto"), "tune.scheduler=bohb needs tune.objective=robust")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "hpbandster" else object())
    with pytest.raises(OodrayError, match="needs hpbandster, not installed here; install them with pip install"):
        tune_mod.check_bohb_installed()


class Experiment(NamedTuple):
    exp: Path  # the stored experiment, read as a local path
    proc: subprocess.CompletedProcess  # the search's run
    storage: str  # the URI given as --storage
    where: list[str]  # the arguments that name its storage and staging directory
    staged: Path  # the staged copy, where oodray's own files are written first


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Experiment:
    """The tiny search, stored at a URI (file:// here; s3:// and gs:// take the same pyarrow path): Tune and Train write
    there, oodray's files are staged in --local-dir and mirrored."""
    root = tmp_path_factory.mktemp("tune")
    storage = f"file://{root / 'bucket'}"
    where = ["--storage", storage, "--local-dir", str(root / "stage")]
    proc = run_cli("oodray.tune", *TINY, *where, "--name", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Experiment(root / "bucket" / "tiny", proc, storage, where, root / "stage" / "tiny")


def test_the_console_shows_oodray_s_lines_not_ray_train_s_chatter(experiment):
    """At `train.ray_log_level: WARNING` (the default) Ray Train's INFO lines stay off the console: every report with
    its whole metrics dict (some 2,000 characters per epoch), every checkpoint, each worker group's start."""
    out = experiment.proc.stdout + experiment.proc.stderr
    assert "(attack_shard" in out, out[-3000:]  # workers' lines do reach this console: the checks below are not vacuous
    for chatter in ("Reporting training result", "Checkpoint successfully created", "Started training worker group",
                    "Moving model to device"):
        assert chatter not in out, chatter


def test_tiny_search_yields_a_full_table(experiment):
    exp, proc = experiment.exp, experiment.proc
    assert (exp / "tuner.pkl").exists() and list(exp.glob("train/trial-*/checkpoint_*/translator.pt"))
    assert (exp / "eval" / "undefended" / "summary.json").exists()
    table = pd.read_csv(exp / "results.csv")
    trials = table[table["trial"] != "undefended"]
    assert len(trials) == 2 and (table["trial"] == "undefended").sum() == 1
    for col in ("arch", "clean acc (proxy)", "robust acc (proxy, adaptive PGD)", "epochs", "time s", "w_pixel", "lr"):
        assert trials[col].notna().all(), col
    best, und = trials.iloc[0], table[table["trial"] == "undefended"].iloc[0]
    aa_cols = [c for c in table.columns if c.startswith("AA ")]
    assert {"AA oblivious/Linf/0.1", "AA adaptive/Linf/0.1", "AA transfer/Linf/0.1"} <= set(aa_cols)
    for c in aa_cols + ["shifts mean C(T)"]:
        assert pd.notna(best[c]) and pd.notna(und[c]), c
    # The identity translator's adaptive and oblivious attackers are the same attacker.
    assert und["AA adaptive/Linf/0.1"] == und["AA oblivious/Linf/0.1"]
    assert und["AA clean C"] == und["AA clean C(T)"]
    assert (exp / "pareto.png").stat().st_size > 1000 and (exp / "results.md").exists()
    assert "undefended" in proc.stdout
    for params in exp.glob("*/params.json"):
        p = json.loads(params.read_text())
        for key, owner in CONDITIONAL.items():
            assert (key in p) == (owner == p["translator.arch"])


def test_resume_does_not_rerun_finished_work(experiment):
    """Resuming a finished experiment from its URI trains nothing again (the stored checkpoints are untouched),
    evaluates nothing again (the staged evaluation files, where evaluations write, are untouched) and sends nothing
    to the URI again (its evaluation and result files are untouched: no PUT per file per resume on S3)."""
    exp, where, staged = experiment.exp, experiment.where, experiment.staged
    before = {p: p.stat().st_mtime for p in exp.glob("train/*/checkpoint_*/translator.pt")}
    summaries = {p: p.stat().st_mtime for p in staged.glob("eval/*/*.json")}
    # Not results.json: Ray Tune itself, saving the experiment's state on a resume, uploads it from its driver staging
    # directory (oodray's) beside its own state files (seen: results.json, oodray_config.json, tuner.pkl, ...).
    sent = {p: p.stat().st_mtime_ns for p in [*exp.glob("eval/**/*"), exp / "results.csv", exp / "results.md",
                                              *exp.glob("*.png")] if p.is_file()}
    assert before and summaries and len(sent) > len(summaries)
    proc = run_cli("oodray.tune", *TINY, *where, "--name", "tiny", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in exp.glob("train/*/checkpoint_*/translator.pt")} == before
    assert {p: p.stat().st_mtime for p in staged.glob("eval/*/*.json")} == summaries
    assert {p: p.stat().st_mtime_ns for p in sent} == sent
    assert not list(exp.glob(f"eval/**/{LOCK_FILE}"))  # a lock names a local process: it stays in the staging dir
    assert len(pd.read_csv(exp / "results.csv")) == 3


def test_results_cli_reads_an_earlier_experiment(experiment, tmp_path):
    exp = experiment.exp
    proc = run_cli("oodray.results", str(exp), "--compare", str(exp))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trial-" in proc.stdout and "undefended" in proc.stdout
    # Read back from the URI into another local directory.
    proc = run_cli("oodray.results", experiment.storage + "/tiny", "--local-dir", str(tmp_path / "read"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "read" / "tiny" / "results.csv")) == 3  # two trials and the undefended row
    assert_one_line_error(run_cli("oodray.results", experiment.storage + "/nope"), "does not exist")
    assert_one_line_error(run_cli("oodray.results", str(tmp_path / "nope")), "does not exist")
    assert_one_line_error(run_cli("oodray.results", str(tmp_path)), "not an oodray experiment")


def test_existing_experiment_is_not_overwritten(experiment):
    proc = run_cli("oodray.tune", *TINY, *experiment.where, "--name", "tiny")
    assert_one_line_error(proc, "already exists", "--resume")
    assert (experiment.exp / "results.csv").exists()


def test_bad_inputs_exit_2(tmp_path):
    base = ["oodray.tune", "--dataset", "synthetic", "--storage", str(tmp_path)]
    assert_one_line_error(run_cli(*base, "--objective", "fastest"), "fastest", "robust")
    assert_one_line_error(run_cli("oodray.tune", "--dataset", "svhn"), "unknown dataset 'svhn'")
    assert_one_line_error(run_cli(*base, "--set", "tune.space={translator.arch: []}"), "to nothing")
    assert_one_line_error(run_cli(*base, "--resume", "--name", "never-ran"), "no experiment 'never-ran'")
    assert_one_line_error(run_cli(*base, "--gpus-per-worker", "1", "--name", "gpu"), "GPUs", "cluster has 0")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("oodray.tune", "--dataset", "synthetic", "--storage", str(blocker)), "not writable")


def test_asha_rungs_survive_a_restore(tmp_path):
    """Ray Tune restores the scheduler by unpickling the one it pickled at the start: ResumableASHA reads back the
    rungs it recorded since, so a trial after --resume is judged against the same rungs as without interruption."""
    import pickle
    from types import SimpleNamespace

    from oodray.schedulers import ResumableASHA

    state = tmp_path / "oodray_scheduler.json"
    asha = ResumableASHA(str(state), metric="objective", mode="max", time_attr="epoch", max_t=4, grace_period=1,
                         reduction_factor=2)
    at_start = pickle.dumps(asha)  # what tuner.pkl holds
    trials = [SimpleNamespace(trial_id=t) for t in "abc"]
    for t, score in zip(trials, (0.9, 0.8, 0.7)):
        asha.on_trial_add(None, t)
        asha.on_trial_result(None, t, {"epoch": 1, "objective": score})
    restored = pickle.loads(at_start)
    state.unlink()
    fresh = pickle.loads(at_start)  # no state file: Ray's behaviour, empty rungs
    late = SimpleNamespace(trial_id="d")
    for s in (restored, fresh):
        s.on_trial_add(None, late)
    assert restored.on_trial_result(None, late, {"epoch": 1, "objective": 0.1}) == "STOP"
    assert fresh.on_trial_result(None, late, {"epoch": 1, "objective": 0.1}) == "CONTINUE"


def test_refit_stage_retrains_the_best_config_and_is_what_gets_evaluated(tmp_path):
    """--refit-epochs: the top configuration is trained again from scratch for that budget, the final AutoAttack
    evaluates the refit model (not the short search trial), its row carries its training compute, and a resume
    re-trains and re-evaluates nothing (a finished refit starts no Ray Train run)."""
    # The fixture's search covers every threat model; here one (adaptive) on 8 images is enough to show what is
    # evaluated.
    args = [*TINY, "--num-samples", "1", "--refit-epochs", "2", "--set", "eval.n_examples=8", "--set",
            "eval.threat_models=[adaptive]", "--set", "eval.shifts=false", "--storage", str(tmp_path),
            "--name", "refit"]
    proc = run_cli("oodray.tune", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "refit"
    [run] = list((exp / "refit").glob("refit-trial-*"))
    ckpts = sorted(run.glob("checkpoint_*/translator.pt"))
    assert len(ckpts) == 2  # two epochs, each checkpointed
    summary = json.loads((exp / "eval" / run.name / "summary.json").read_text())
    assert summary["config"]["train"]["epochs"] == 2 and summary["config"]["train"]["max_batches"] is None
    tc = summary["training_compute"]
    assert tc["translator_examples"] == 2 * (400 // 32) * 32  # whole epochs: 400 images, batches of 32, last dropped
    assert tc["passes"] == tc["classifier_passes"] + tc["translator_passes"] + tc["cache_passes"]
    assert not list((exp / "eval").glob("trial-*"))  # the search's own trial is not what is reported
    lb = json.loads((exp / "results.json").read_text()) if (exp / "results.json").exists() else None
    assert lb is not None
    assert run.name in proc.stdout and "refit" in proc.stdout
    before = {p: p.stat().st_mtime for p in [*ckpts, *(exp / "eval").glob("*/summary.json")]}
    again = run_cli("oodray.tune", *args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in before} == before
    assert f"refit {run.name} already trained for its 2 epochs; kept" in again.stderr  # no Train worker group again
    # `python -m oodray.refit` on the finished search, named by a relative path (as experiments/*-budget.sh does):
    rel = os.path.relpath(exp, ROOT)
    later = run_cli("oodray.refit", rel, "--epochs", "1", "--suffix=-e1", "--n-examples", "8")
    assert later.returncode == 0, later.stdout[-2000:] + later.stderr[-3000:]
    assert len(list((exp / "refit" / f"{run.name}-e1").glob("checkpoint_*/translator.pt"))) == 1
    assert json.loads((exp / "eval" / f"{run.name}-e1" / "summary.json").read_text())["n_examples"] == 8
