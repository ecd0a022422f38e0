"""Shared fixtures: a private oodray cache per test session, and a real local Ray per module that needs one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def oodray_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test writes classifiers and attack caches into one temporary directory, never the user's cache."""
    d = tmp_path_factory.mktemp("oodray-cache")
    old = os.environ.get("OODRAY_CACHE")
    os.environ["OODRAY_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("OODRAY_CACHE", None)
    else:
        os.environ["OODRAY_CACHE"] = old


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (2 CPUs), shut down when the module's tests are done."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m <args>` as a user would, with the session's cache."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def forbid_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any start of (or connection to) Ray in this process fails the test: bad input must be refused before it."""
    import ray

    def no_ray(*_a, **_k):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
