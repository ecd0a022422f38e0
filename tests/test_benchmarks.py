"""The GPU benchmark script runs end to end on CPU (`--smoke`), so it is ready for a lent accelerator: every section
(C alone, both regimes, cache generation, Ray Train scaling) produces a figure. Nothing here is timed."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["size"] == 32
    assert all(r["classifier"][f"{k}_images_per_s"] > 0 for k in ("forward", "attack_step", "train_step"))
    assert {(t["regime"], t["batch"]) for t in r["train"]} == {(g, b) for g in ("oblivious", "adaptive")
                                                                for b in (2, 4)}
    assert all(t["images_per_s"] > 0 and not t["oom"] for t in r["train"] + r["cache"])
    assert [s["workers"] for s in r["scaling"]] == [1, 2] and all(s["images_per_s_total"] > 0 for s in r["scaling"])
    assert "Ray Train data-parallel scaling" in proc.stdout and "adapt/obl" in proc.stdout


def test_agreement_chance_is_exact_for_odd_repeats_and_rejects_zero():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from spread import agreement_chance

    # 20 ways to split ranks 0-5 into two runs of 3: the second median falls inside the first's range in 12 of them,
    # and both ways in 8; with 5 repeats, both ways in 180 of 252 splits.
    assert agreement_chance(3) == (12 / 20, 8 / 20)
    assert agreement_chance(5)[1] == 180 / 252
    assert agreement_chance(1) == (0.0, 0.0)
    one, both = agreement_chance(2, draws=20_000)
    assert both < one and 0.15 < both < 0.35  # estimated from normal values: about 0.25
    proc = subprocess.run([sys.executable, "benchmarks/spread.py", "--repeats", "3", "0"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--repeats 0: a run has at least 1 repeat")


def test_search_efficiency_counts_and_places_epochs_in_reporting_order():
    """The search benchmark's counts: trial-epochs in the order they were reported (a paused trial's later epochs
    after the trials that ran meanwhile; replayed rows not counted), and where a best epoch came from."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_efficiency as se

    def row(tid, epoch, at, objective, **kw):
        return {"trial_id": tid, "epoch": epoch, "reported_at": at, "objective": objective, **kw}

    trials = [  # listed out of order: b first reported at t=1, a at t=2; b is resumed after a
        {"trial_id": "a", "history": [row("a", 1, 2.0, 0.1), row("a", 2, 3.0, 0.3)]},
        {"trial_id": "b", "history": [row("b", 1, 1.0, 0.2), row("b", 1, 3.5, 0.2, replayed=True),
                                      row("b", 2, 4.0, 0.5)]},
    ]
    assert [(r["trial_id"], r["epoch"]) for r in se.epoch_rows(trials)] == [("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert se.trial_order(trials) == ["b", "a"]
    top = se.best_row(trials)
    assert top["objective"] == 0.5 and se.position(trials, top) == "trial 1 of 2, epoch 2"
    assert se.epochs_to_reach(trials, 0.3) == 3 and se.epochs_to_reach(trials, 0.5) == 4
    assert se.epochs_to_reach(trials, 0.6) is None


def test_asha_floor_is_the_first_trials_budget_plus_a_grace_period_for_each_trial_between():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_efficiency as se

    assert se.asha_floor(1, 3, budget=4, grace=1) == 3  # the first trial: only its own epochs
    assert se.asha_floor(2, 4, budget=4, grace=1) == 8  # 4 (the first, run to its budget) + 4
    assert se.asha_floor(5, 2, budget=8, grace=1) == 8 + 3 + 2
    assert se.asha_floor(4, 1, budget=4, grace=9) == 4 + 2 * 4 + 1  # a grace period past the budget is the budget
    with pytest.raises(ValueError, match="trial 0, epoch 1"):
        se.asha_floor(0, 1, budget=4, grace=1)
    assert se.grace_of("asha:3") == se.DEFAULT_GRACE == 1 and se.grace_of("asha:3:2") == 2
    assert se.scheduler_settings("fifo") == {"tune.scheduler": "fifo"}
    assert se.scheduler_settings("asha:3:2") == {"tune.scheduler": "asha", "tune.reduction_factor": "3",
                                                 "tune.grace_period": "2"}
    reports = {"x": [(1, 5.0)], "y": [(1, 1.0), (2, 2.0)]}  # x's only epoch comes after y's two
    trials = [{"trial_id": t, "history": [{"trial_id": t, "epoch": e, "reported_at": at, "objective": 0.0}
                                          for e, at in ep]} for t, ep in reports.items()]
    assert se.trial_and_epoch(trials, trials[0]["history"][0]) == (2, 1)


@pytest.mark.parametrize("args,needle", [
    (["index_scan.py", "--repeats", "0"], "--repeats: '0' is not accepted"),
    (["search_efficiency.py", "--schedulers", "fifo,pbt:3"], "tune.scheduler='pbt'"),
    (["oblivious_cache.py", "--dataset", "imagenett"], "unknown dataset 'imagenett'"),
])
def test_a_benchmark_refuses_bad_input_in_one_line_before_it_runs(args, needle):
    """A bad count, scheduler or dataset is one line and exit 2 at once: search_efficiency used to run its whole FIFO
    search (minutes) before the scheduler it would compare was refused."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in lines[-1], lines[-1:]
