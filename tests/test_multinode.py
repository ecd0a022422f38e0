"""A real two-node Ray cluster on this machine (two `ray start`s, token authentication on): `python -m oodray.tune`
and `python -m oodray.evaluate` connect to it through RAY_ADDRESS, write into one storage directory that both
nodes see (on one host a plain directory is shared storage), and their work lands on both nodes.

Where work ran is read back from what the code records: `node_id` in every Ray Train epoch's metrics (the trial's
result.json) and in every evaluation shard (`shards[*].node_id` in each attack result JSON).

The cluster is ours alone: a private, short `--temp-dir`, and each `ray start --block` leads its own process group,
which teardown kills. `ray stop` is never used: it kills every Ray process on the machine, including other people's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
NODES_SCRIPT = """
import json, ray
ray.init(log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""
TINY = ["--dataset", "synthetic", "--num-samples", "1", "--epochs", "1", "--final-top-k", "1",
        "--set", "eval.n_examples=16", "--set", "train.max_batches=4", "--set", "train.proxy_examples=16",
        "--set", "train.cpus_per_worker=0.5",
        "--set", "tune.space={translator.width: [8], translator.blocks: [1], attack.steps: [5]}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_started(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"`ray start` did not come up (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kills our `ray start --block`s, every process of their nodes (each leads its own process group) and the
    workers their raylets started (those make process groups of their own), and nothing else on the machine."""
    import psutil

    family = []
    for p in procs:
        try:
            family += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # like `ray stop --force`, for these nodes only
        except ProcessLookupError:
            pass
    for c in family:
        try:
            c.kill()  # psutil checks that the pid still names the same process
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=60)
    for p in procs:
        p.wait(timeout=60)


def test_local_storage_is_refused_on_several_hosts(monkeypatch, tmp_path):
    """`check_storage` (issue #6, bad input): a local --storage path is refused once the cluster spans two hosts;
    several nodes on one host (the cluster below) and URIs are accepted."""
    import ray

    from oodray.errors import OodrayError
    from oodray.tune import check_storage

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"},
             {"Alive": False, "NodeManagerAddress": "10.0.0.3"}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(OodrayError) as err:
        check_storage(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "2 hosts" in msg and "s3://" in msg, msg
    check_storage("s3://bucket/oodray")
    nodes[1]["NodeManagerAddress"] = "10.0.0.1"
    check_storage(str(tmp_path))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (2 CPUs) + worker node (2 CPUs, resource `node2`), token auth with a token of its own."""
    # Unix socket paths under the temp dir must stay short (pytest's tmp paths are too long for them).
    temp = Path(tempfile.mkdtemp(prefix="oodray-ray-", dir="/tmp"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=256000000",
              "--dashboard-agent-listen-port=0"]  # agent's default port 52365 is one per host
    procs: list[subprocess.Popen] = []
    try:
        for role, args in (("head", ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]),
                           ("worker", [f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"node2": 1}'])):
            log = temp / f"{role}.log"
            with open(log, "w") as f:
                procs.append(subprocess.Popen([RAY, "start", *args, *common], stdout=f, stderr=subprocess.STDOUT,
                                              env=env, start_new_session=True))
            _wait_started(procs[-1], log)
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        nodes: list[dict] = []
        deadline = time.time() + 600
        while len(nodes) < 2 and time.time() < deadline:  # the worker registers with the GCS shortly after start
            proc = subprocess.run([sys.executable, "-c", NODES_SCRIPT], capture_output=True, text=True, env=env,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]  # the right token connects
            nodes = json.loads(proc.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2, nodes
        head = next(n["id"] for n in nodes if "node:__internal_head__" in n["resources"])
        worker = next(n["id"] for n in nodes if "node2" in n["resources"])
        assert nodes[0]["resources"]["CPU"] + nodes[1]["resources"]["CPU"] == 4
        yield {"env": env, "head": head, "worker": worker, "storage": tmp_path_factory.mktemp("shared-storage")}
    finally:
        _stop(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _run(env: dict[str, str], *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def _shard_nodes(eval_dir: Path) -> set[str]:
    out = set()
    for f in eval_dir.glob("*-Linf-*.json"):
        out |= {s["node_id"] for s in json.loads(f.read_text())["shards"]}
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_wrong_token_is_refused(cluster):
    env = {**cluster["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen([sys.executable, "-c", "import ray; ray.init()"], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        # The client retries for ~20 s before giving up; the first refusal is enough.
        refused = any("InvalidAuthToken" in line for line in proc.stderr)
    finally:
        proc.kill()
        proc.wait()
    assert refused


@pytest.mark.ray
@pytest.mark.slow
def test_tune_on_two_nodes_writes_shared_storage(cluster):
    storage = cluster["storage"]
    proc = _run(cluster["env"], "oodray.tune", *TINY, "--storage", str(storage), "--name", "two-nodes", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in proc.stderr  # RAY_ADDRESS was used, no local Ray started
    exp = storage / "two-nodes"
    assert (exp / "results.csv").exists() and (exp / "eval" / "undefended" / "summary.json").exists()
    train_nodes = {json.loads(line)["node_id"] for f in exp.glob("*/result.json")
                   for line in f.read_text().splitlines() if line.strip()}
    assert list(exp.glob("train/trial-*/checkpoint_*/translator.pt"))
    eval_nodes = set().union(*(_shard_nodes(d) for d in (exp / "eval").iterdir()))
    nodes = {cluster["head"], cluster["worker"]}
    assert train_nodes and train_nodes <= nodes and eval_nodes <= nodes, (train_nodes, eval_nodes, nodes)
    assert train_nodes | eval_nodes == nodes, (train_nodes, eval_nodes, nodes)


@pytest.mark.ray
@pytest.mark.slow
def test_evaluation_fan_out_uses_both_nodes(cluster):
    out = cluster["storage"] / "eval-identity"
    # 8 one-CPU attack tasks (2 threat models x 4 shards) and the clean task, submitted at once, fill the 2 + 2 CPUs;
    # the clean task takes one, so attack tasks run on both nodes.
    proc = _run(cluster["env"], "oodray.evaluate", "--translator", "identity", "--dataset", "synthetic",
                "--n-examples", "32", "--shards", "4", "--batch-size", "8", "--threat-models", "oblivious,adaptive",
                "--no-shifts", "--cpus-per-task", "1", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for threat in ("oblivious", "adaptive"):
        res = json.loads((out / f"{threat}-Linf-0.1.json").read_text())
        assert res["complete"] and len(res["shards"]) == 4
    assert (out / "clean.json").exists() and (out / "summary.json").exists()
    assert _shard_nodes(out) == {cluster["head"], cluster["worker"]}
