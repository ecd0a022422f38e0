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
