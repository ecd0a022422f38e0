"""Fault injection with real processes and a real local Ray (CPU): what survives a SIGKILL, and what a resume redoes.

- a Ray Train worker killed mid-epoch: Train's FailureConfig restarts the worker group from the last checkpoint;
- the `python -m oodray.tune` driver killed mid-search: `--resume` finishes it without re-running finished trials;
- an oblivious-cache build killed mid-way: the next build regenerates only the shards that were not recorded.
(A killed AutoAttack task resuming from its state file is in tests/test_evaluate.py:
test_killed_task_resumes_from_its_state_file.)

Processes are found by walking /proc from a process this test started, so other Ray clusters on the machine are never
touched; every wait is bounded. See docs/reliability.md for the guarantees these tests stand behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from oodray.config import resolve_config

pytestmark = [pytest.mark.fault, pytest.mark.ray, pytest.mark.slow]  # the extended tier: `make test-slow`
REPO = Path(__file__).resolve().parents[1]


# --- process helpers ---------------------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (Ray's raylet, workers, actors...), with its command line."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = procs[child][1]
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pids: dict[int, str], timeout: float = 5.0) -> dict[int, str]:
    """Waits for processes orphaned by a kill to go away; SIGKILLs, by pid, those still there (Ray's dashboard and
    runtime-env agents outlive a SIGKILLed driver by minutes). Returns those it had to kill."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = {p: cmd[:80] for p, cmd in pids.items() if _alive(p)}
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def wait_for(cond: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.05) -> Any:
    """Polls `cond` until it returns something truthy; fails (with the process's output) after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}: {_tail(proc)}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {_tail(proc)}" if proc else ""))


def _tail(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return Path(log).read_text()[-3000:] if log and Path(log).exists() else ""


def _as_from_a_terminal() -> None:
    """A command typed at a terminal receives Ctrl-C; one started in the background of a script (`bash .ci/run &`,
    CI runners) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all. The drivers
    these tests signal are started as a user starts them, with SIGINT's default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """A real CLI/driver process with the session's cache, its output in `log`; never attached to another Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, preexec_fn=_as_from_a_terminal)
    proc.log_path = str(log)
    return proc


def kill_hard(proc: subprocess.Popen) -> dict[int, str]:
    """SIGKILLs a driver as an OOM killer or a lost node would; then reaps the Ray processes it leaves behind, so that
    nothing of the killed run can write to storage after this returns."""
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    return reap(below)


@pytest.fixture
def ray_here():
    """A real local Ray in this process, for this test only (no other Ray of ours runs beside it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- a Ray Train worker killed mid-epoch -------------------------------------------------------------------------


def _latest_registered_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (its checkpoint manager snapshot), 0 if none."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def test_killed_train_worker_resumes_from_its_last_checkpoint(ray_here, tmp_path):
    """SIGKILL one of two DDP workers during epoch 2 of 3: FailureConfig restarts the worker group, which resumes
    from the epoch-1 checkpoint and still ends after exactly 3 epochs."""
    from oodray.models.translator import load_translator_checkpoint
    from oodray.train import fit_translator, prepare_run

    # Adaptive regime with 60-step PGD per batch: an epoch takes seconds, so the kill lands inside one.
    cfg = resolve_config("synthetic", overrides=[
        "train.workers=2", "train.cpus_per_worker=0.5", "train.epochs=3", "train.regime=adaptive",
        "attack.steps=60", "attack.shift_fraction=0", "train.proxy_examples=16", "train.max_failures=2"])
    loop = prepare_run(cfg)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = fit_translator(cfg, loop, storage=str(tmp_path), name="run")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    t0 = time.time()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    run_dir = tmp_path / "run"
    epoch_at_kill = wait_for(lambda: _latest_registered_epoch(run_dir), 600, "the first registered checkpoint")
    workers = wait_for(lambda: [p for p, cmd in descendants(os.getpid()).items() if "RayTrainWorker" in cmd], 120,
                       "the RayTrainWorker processes")
    assert thread.is_alive() and epoch_at_kill < 3, "training finished before a worker could be killed"
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive(), "training did not finish within 300 s of the kill"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.error is None
    assert not _alive(victim)
    m = result.metrics
    assert m["epoch"] == 3 and m["world_size"] == 2
    # The restarted group loaded the checkpoint registered before the kill instead of starting over.
    assert m["resumed_from_epoch"] >= epoch_at_kill >= 1, (m["resumed_from_epoch"], epoch_at_kill)
    state = load_translator_checkpoint(result.checkpoint.path)
    assert state["epoch"] == 3 and state["metrics"]["resumed_from_epoch"] == m["resumed_from_epoch"]
    print(f"worker kill at epoch {epoch_at_kill}: resumed from {m['resumed_from_epoch']}, {time.time() - t0:.0f}s")


# --- the oodray.tune driver killed mid-search --------------------------------------------------------------------

TUNE = ["-m", "oodray.tune", "--dataset", "synthetic", "--num-samples", "3", "--epochs", "1", "--max-concurrent", "2",
        "--final-top-k", "0", "--set", "train.max_batches=3", "--set", "train.proxy_examples=16",
        "--set", "train.cpus_per_worker=0.25", "--set", "eval.n_examples=8", "--set", "eval.threat_models=[oblivious]",
        "--set", "eval.shifts=false", "--set", "eval.cpus_per_task=0.5",
        "--set", "tune.space={translator.width: [8], translator.blocks: [1], train.regime: [adaptive]}"]


def _trial_statuses(exp: Path) -> dict[str, str]:
    """trial id -> status, from the newest experiment state Tune has written (what `--resume` restores)."""
    files = sorted(exp.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
        return {t["trial_id"]: t["status"] for t in (json.loads(a) for a, _ in state["trial_data"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # caught mid-write; poll again


def _stamps(exp: Path, trial_id: str) -> dict[str, int]:
    files = [*exp.glob(f"train/trial-{trial_id}/checkpoint_*/translator.pt"), *exp.glob(f"*{trial_id}*/result.json")]
    return {str(p.relative_to(exp)): p.stat().st_mtime_ns for p in files}


def test_killed_tune_driver_resumes_without_rerunning_finished_trials(tmp_path):
    """SIGKILL `python -m oodray.tune` once Tune has recorded a finished trial; `--resume` completes the experiment,
    leaves the finished trials' checkpoints and results untouched and tabulates every trial exactly once."""
    t0 = time.time()
    args = [*TUNE, "--storage", str(tmp_path), "--name", "exp"]
    exp = tmp_path / "exp"
    proc = spawn(args, tmp_path / "first.log")
    try:
        statuses = wait_for(lambda: (s := _trial_statuses(exp)) and "TERMINATED" in s.values() and s, 900,
                            "a finished trial in the experiment state", proc, interval=0.2)
        finished = sorted(t for t, s in statuses.items() if s == "TERMINATED")
        stamps = {t: _stamps(exp, t) for t in finished}
        assert all(any(k.endswith("translator.pt") for k in s) for s in stamps.values()), stamps
    finally:
        kill_hard(proc)
    assert proc.returncode == -signal.SIGKILL
    assert len(finished) < 3 and not (exp / "results.csv").exists(), "the search finished before the kill"
    t_kill = time.time() - t0

    resumed = spawn([*args, "--resume"], tmp_path / "resume.log")
    try:
        rc = resumed.wait(timeout=900)
    finally:
        if resumed.poll() is None:
            kill_hard(resumed)
    assert rc == 0, _tail(resumed)
    for t in finished:  # finished trials were not re-run: not one of their files was rewritten
        assert _stamps(exp, t) == stamps[t], t
    final = _trial_statuses(exp)
    assert len(final) == 3 and set(final.values()) == {"TERMINATED"}, final
    table = pd.read_csv(exp / "results.csv")
    rows = table["trial"].tolist()
    assert sorted(rows) == sorted([f"trial-{t}" for t in final] + ["undefended"]), rows
    print(f"tune: killed after {t_kill:.0f}s with {finished} finished; resumed in {time.time() - t0 - t_kill:.0f}s")


# --- an oblivious-cache build killed mid-way ---------------------------------------------------------------------

SMALL_SHARDS = 40  # 400 training images -> 10 shards, so a kill can land between them
CACHE_OVERRIDES = ["attack.attacks=[pgd]", "attack.steps=200"]
CACHE_SCRIPT = f"""
import ray, oodray.cache as cache
from oodray.classifier import get_classifier
from oodray.config import resolve_config
cache.SHARD_SIZE = {SMALL_SHARDS}
cfg = resolve_config("synthetic", overrides={CACHE_OVERRIDES!r})
_, cpath = get_classifier(cfg)
ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
print("building", cache.cache_dir(cfg, cpath), flush=True)
cache.build_oblivious_cache(cfg, cpath)
print("finished", flush=True)
"""


def _read_all(reader) -> torch.Tensor:
    return torch.stack([reader[i] for i in range(len(reader))])


def test_killed_cache_build_regenerates_only_unrecorded_shards(tmp_path, monkeypatch):
    """SIGKILL a process building the oblivious cache after some shards are recorded: the next build keeps those
    shards byte for byte, regenerates only the others, and the result equals an uninterrupted build."""
    import ray

    import oodray.cache as cache
    from oodray.classifier import get_classifier

    monkeypatch.setattr(cache, "SHARD_SIZE", SMALL_SHARDS)
    cfg = resolve_config("synthetic", overrides=CACHE_OVERRIDES)
    _, cpath = get_classifier(cfg)
    d = cache.cache_dir(cfg, cpath)
    n_shards = -(-400 // SMALL_SHARDS)

    def recorded() -> dict[str, Any]:
        try:
            return json.loads((d / "manifest.json").read_text())["shards"]
        except (OSError, ValueError, KeyError):
            return {}

    assert not recorded(), f"{d} already holds a cache"
    t0 = time.time()
    proc = spawn(["-c", CACHE_SCRIPT], tmp_path / "build.log")
    try:
        wait_for(lambda: len(recorded()) >= 2, 600, "two recorded shards", proc, interval=0.01)
    finally:
        kill_hard(proc)
    done = recorded()
    assert 2 <= len(done) < n_shards, f"the build finished ({len(done)} shards) before the kill"
    kept = {sid: (d / f"shard-{sid}.u8").read_bytes() for sid in done}
    t_kill = time.time() - t0

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        _, generated = cache.build_oblivious_cache(cfg, cpath)
        assert generated == n_shards - len(done)
        assert {sid: (d / f"shard-{sid}.u8").read_bytes() for sid in done} == kept
        resumed = _read_all(cache.ObliviousCache(d))
        assert resumed.shape == (400, 1, 8, 8)
        # The uninterrupted answer: the same cache built from nothing in one go.
        d.rename(d.with_name(d.name + "-resumed"))
        _, generated = cache.build_oblivious_cache(cfg, cpath)
        assert generated == n_shards
        assert torch.equal(_read_all(cache.ObliviousCache(d)), resumed)
        print(f"cache: killed after {t_kill:.0f}s with {len(done)}/{n_shards} shards; resumed and rebuilt in "
              f"{time.time() - t0 - t_kill:.0f}s")
    finally:
        ray.shutdown()


# --- two local Rays on one machine -------------------------------------------------------------------------------

STATE_PROBE = """
import ray
from oodray.runtime import init_ray
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def alive(self, actor_id):
        from ray.train.v2._internal.state.util import is_actor_alive  # what Train's PlacementGroupCleaner calls
        return is_actor_alive(actor_id, timeout=10)

p = Probe.remote()
print("alive", ray.get(p.alive.remote(p._actor_id.hex())), flush=True)
"""


def test_state_api_in_workers_finds_its_own_cluster_beside_another_ray(tmp_path):
    """With a second local Ray on the machine (an evaluation beside a search), a worker's address-less state-API call
    must reach its own cluster. Without oodray's worker setup hook it raises 'Found multiple active Ray instances';
    Train's PlacementGroupCleaner then dies, a trial stopped by Tune keeps its placement group, and the next trial
    waits for CPUs forever."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
                              "print('up', flush=True); time.sleep(3600)"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "up"
        proc = subprocess.run([sys.executable, "-c", STATE_PROBE], capture_output=True, text=True, timeout=600,
                              cwd=REPO, env=env)
    finally:
        other.kill()
        other.wait()
    assert proc.returncode == 0 and "alive True" in proc.stdout, proc.stderr[-3000:]


ORPHAN_PROBE = """
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from oodray.runtime import init_ray, release_orphaned_placement_groups
init_ray(num_cpus=2)

@ray.remote(num_cpus=1)
class Worker:
    def ping(self):
        return 1

left = placement_group([{"CPU": 1}])  # what a stopped trial's worker group leaves: reserved, no actor in it
used = placement_group([{"CPU": 1}])
ray.get([left.ready(), used.ready()])
w = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
ray.get(w.ping.remote())
seen = {}
print("first", release_orphaned_placement_groups(seen, grace_s=60, now=0.0), flush=True)
print("early", release_orphaned_placement_groups(seen, grace_s=60, now=59.0), flush=True)
print("late", release_orphaned_placement_groups(seen, grace_s=60, now=61.0), flush=True)
table = ray.util.placement_group_table()
print("states", table[left.id.hex()]["state"], table[used.id.hex()]["state"], flush=True)
print("ids", left.id.hex(), flush=True)
# the CPU it held can be had again: a 1-CPU actor outside any group starts (it could not while the group held it)
ray.get(Worker.remote().ping.remote(), timeout=120)
print("freed", flush=True)
"""


def test_placement_group_left_by_a_stopped_trial_is_released_and_its_cpu_freed():
    """A Tune-stopped trial can leave its worker group's placement group behind (Ray Train's cleaner told to exit,
    then the controller killed before it removed the group); the next trial then waits for CPUs forever. The search's
    callback removes this job's groups that stayed empty for the grace period, and only those."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", ORPHAN_PROBE], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    left = out["ids"]
    assert out["first"] == "[]" and out["early"] == "[]"  # empty, but not for the whole grace period yet
    assert out["late"] == f"['{left}']"  # the empty group only, not the one with a live actor
    assert out["states"] == "REMOVED CREATED"
    assert "freed" in proc.stdout


# --- Ctrl-C / SIGTERM: a prompt stop, exit 130, nothing of ours left running, and a resume equal to no interruption ---

SIGNAL_TUNE = ["-m", "oodray.tune", "--dataset", "synthetic", "--num-samples", "2", "--epochs", "2",
               "--max-concurrent", "1", "--final-top-k", "1", "--set", "train.max_batches=3",
               "--set", "train.proxy_examples=16", "--set", "train.cpus_per_worker=0.5", "--set", "eval.n_examples=16",
               "--set", "eval.threat_models=[oblivious,adaptive]", "--set", "eval.shifts=false",
               "--set", "attack.steps=3000",  # makes the oblivious-cache build last long enough to be interrupted
               "--set", "tune.space={translator.width: [8], translator.blocks: [1], train.regime: [oblivious], "
                        "attack.attacks: [pgd], attack.eps_mix: [eps], attack.steps: [3000]}"]  # steps is searched


def _interrupt(proc: subprocess.Popen, sig: int, timeout: float = 300) -> tuple[int, float, dict[int, str]]:
    """Sends `sig` to the driver alone; returns its exit code, the seconds it took to exit, and the processes it had
    started that were still running 60 s after it exited (they should all have stopped with it)."""
    below = descendants(proc.pid)
    t0 = time.time()
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=timeout)
    return rc, time.time() - t0, reap(below, timeout=60)


def _log_has(proc: subprocess.Popen, text: str) -> bool:
    return text in Path(proc.log_path).read_text()


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["trial", "time s"]).reset_index(drop=True)  # ids and timings differ between runs


def test_ctrl_c_in_each_step_stops_promptly_and_resume_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C (SIGINT) during the oblivious-cache build, SIGTERM during the search and SIGTERM during the final
    AutoAttack (after ray.init, which sets its own SIGTERM handler: sys.exit(15)): each stops the run within seconds
    with exit 130 and a line saying where it stopped and the resume command, leaves no process of its own behind, and
    the resumed experiment's table equals an uninterrupted run's."""
    args = [*SIGNAL_TUNE, "--storage", str(tmp_path / "a"), "--name", "exp"]
    exp = tmp_path / "a" / "exp"
    steps = [("Ray tasks of up to", signal.SIGINT, "the oblivious-cache build", []),
             ("a trial checkpoint", signal.SIGTERM, "the search", ["--resume"]),
             ("final AutoAttack evaluation of", signal.SIGTERM, "the final AutoAttack evaluation", ["--resume"])]
    for k, (when, sig, where, extra) in enumerate(steps):
        proc = spawn([*args, *extra], tmp_path / f"run{k}.log")
        try:
            if when == "a trial checkpoint":
                # The first trial's first checkpoint, which its worker writes straight to storage as it reports; the
                # trial's result.json reaches storage only when Tune syncs, seen after a 20 s search had ended.
                wait_for(lambda: any(exp.glob("train/trial-*/checkpoint_*")), 600, when, proc, 0.2)
            else:
                wait_for(lambda p=proc, w=when: _log_has(p, w), 600, when, proc)
            rc, seconds, left = _interrupt(proc, sig)
        finally:
            if proc.poll() is None:
                kill_hard(proc)
        out = _tail(proc)
        assert rc == 130, out
        last = [ln for ln in out.splitlines() if ln.strip()][-1]  # what a user sees last: where, and how to resume
        assert f"stopped during {where}" in last and "--resume" in last, out
        assert left == {}, f"still running after the driver exited: {left}"
        print(f"{signal.Signals(sig).name} during {where}: exited in {seconds:.1f}s")
    assert not (exp / "results.csv").exists()
    resumed = spawn([*args, "--resume"], tmp_path / "resume.log")
    assert resumed.wait(timeout=900) == 0, _tail(resumed)
    reference = spawn([*SIGNAL_TUNE, "--storage", str(tmp_path / "b"), "--name", "exp"], tmp_path / "reference.log")
    assert reference.wait(timeout=900) == 0, _tail(reference)
    a, b = pd.read_csv(exp / "results.csv"), pd.read_csv(tmp_path / "b" / "exp" / "results.csv")
    pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    assert len(a) == 3  # two trials and the undefended classifier
