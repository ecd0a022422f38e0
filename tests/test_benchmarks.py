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
