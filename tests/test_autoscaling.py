"""Resource checks that understand autoscaling: node types the autoscaler can launch count, a request no node type
can ever hold is one line and exit 2 (quickly, not a hang), and one that launchable nodes can hold is waited for
with progress until the nodes join.

The node-type arithmetic is tested on clusters/gpu.yaml's own node types; the rest on a real Ray cluster of our own
(`ray start --head`, token auth, 2 CPUs, no GPU), where a worker node that declares a GPU joins mid-wait.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error
from test_multinode import RAY, _free_port, _wait_started

from oodray.errors import OodrayError
from oodray.runtime import NodeType, fits_now, never_fits, node_types_from_config

GPU_YAML = ROOT / "clusters" / "gpu.yaml"
HEAD = [{"CPU": 0.0}]  # gpu.yaml's head, as `ray up` starts it


def _stop(procs: list[subprocess.Popen], temp: Path) -> None:
    """Kills our nodes: each `ray start --block`'s process group, then every process whose command line names our
    private temp dir (the workers the raylets started, in process groups of their own); nothing else."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(3):
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(temp).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(1)
    for p in procs:
        p.wait(timeout=60)


def _workers(n: int, cpu: float = 1.0, gpu: float = 1.0) -> list[dict[str, float]]:
    return [{"CPU": cpu, "GPU": gpu}] * n


def test_gpu_yaml_node_types_are_read_without_the_head():
    types = node_types_from_config(GPU_YAML)
    assert {t.name: (t.resources, t.max_count) for t in types} == {
        "gpu_1x": ({"CPU": 4.0, "GPU": 1.0}, 8), "gpu_8x": ({"CPU": 96.0, "GPU": 8.0}, 1)}


@pytest.mark.parametrize("bundles, refused", [
    (_workers(1), None),  # one g5 will do
    (_workers(8), None),  # the p4d, or 8 g5s
    (_workers(16), None),  # 8 g5s + the p4d
    (_workers(17), "together they need 17 GPU, and the cluster can grow to 16"),
    ([{"CPU": 8, "GPU": 8}], None),  # only the p4d holds this bundle
    ([{"CPU": 8, "GPU": 9}], "one needs 8 CPU, 9 GPU, more than any node or node type has"),
    ([{"CPU": 1, "TPU": 1}], "one needs 1 CPU, 1 TPU, more than any node or node type has"),
])
def test_launchable_node_types_decide_what_can_ever_run(bundles, refused):
    types = node_types_from_config(GPU_YAML)
    assert not fits_now(bundles, HEAD)  # nothing runs on the fresh cluster: waiting or refusing are the choices
    assert never_fits(bundles, HEAD, types) == refused


def test_types_without_stated_resources_or_limits():
    unknown = [NodeType("cpu", {"CPU": 8.0}, 2), NodeType("auto", None, 4)]
    assert never_fits(_workers(1), HEAD, unknown) is None  # resources filled in at launch: cannot refuse
    unlimited = [NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, None)]
    assert never_fits(_workers(1000), HEAD, unlimited) is None
    none_left = [NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 0)]
    assert never_fits(_workers(1), HEAD, none_left) is not None
    # nodes already there count, per node: two 1-GPU nodes do not hold a 2-GPU bundle
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert fits_now(_workers(2), nodes) and not fits_now([{"CPU": 1, "GPU": 2}], nodes)
    assert never_fits([{"CPU": 1, "GPU": 2}], nodes, []) is not None


@pytest.fixture(scope="module")
def head():
    """A real Ray head of our own (2 CPUs, no GPU, no autoscaler), token auth; killed whatever happens."""
    temp = Path(tempfile.mkdtemp(prefix="oodray-as-", dir="/tmp"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=128000000",
              "--dashboard-agent-listen-port=0"]
    procs: list[subprocess.Popen] = []
    try:
        log = temp / "head.log"
        with open(log, "w") as f:
            procs.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                                           "--include-dashboard=false", *common], stdout=f,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_started(procs[-1], log)
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        env["OODRAY_AUTOSCALING_CONFIG"] = str(temp / "no-autoscaler.yaml")  # never this machine's own file
        env["OODRAY_NODE_WAIT_S"] = "120"  # a wrong wait fails the test in 2 minutes, not 30
        yield {"env": env, "temp": temp, "port": port, "procs": procs, "common": common}
    finally:
        _stop(procs, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)


def test_gpus_on_a_cluster_without_gpus_or_autoscaler_exit_2(head, tmp_path):
    """The hang of issue 14: `oodray.train --gpus-per-worker 1` joined to a cluster without GPUs."""
    proc = _cli(head["env"], "oodray.train", "--dataset", "synthetic", "--gpus-per-worker", "1",
                "--storage", str(tmp_path))
    assert_one_line_error(proc, "needs 1 CPU, 1 GPU", "cluster has 2 CPU", "no autoscaler")


def test_more_gpus_than_the_autoscaler_can_launch_exit_2(head, tmp_path):
    env = {**head["env"], "OODRAY_AUTOSCALING_CONFIG": str(GPU_YAML)}
    proc = _cli(env, "oodray.train", "--dataset", "synthetic", "--workers", "17", "--gpus-per-worker", "1",
                "--cpus-per-worker", "0.1", "--storage", str(tmp_path))
    assert_one_line_error(proc, "17 x 0.1 CPU, 1 GPU", "can grow to 16", "gpu_1x: 4 CPU, 1 GPU x 8")
    proc = _cli(env, "oodray.evaluate", "--translator", "identity", "--dataset", "synthetic", "--gpus-per-task", "9",
                "--out", str(tmp_path / "eval"))
    assert_one_line_error(proc, "9 GPU, more than any node or node type has")


WAIT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
from ray.core.generated import autoscaler_pb2
from oodray.runtime import ensure_cluster_can_hold, init_ray
from oodray.errors import RunFailed
import ray
init_ray()
# "gcs": what an autoscaler that reports its config to the GCS would write; "yaml": an empty config there, so the
# node types come from OODRAY_AUTOSCALING_CONFIG
groups = [autoscaler_pb2.NodeGroupConfig(name="gpu_group", resources={"CPU": 1, "GPU": 1}, max_count=1)]
cfg = autoscaler_pb2.ClusterConfig(node_group_configs=groups if sys.argv[1] == "gcs" else [])
ray._private.worker.global_worker.gcs_client.report_cluster_config(cfg.SerializeToString())
try:
    ensure_cluster_can_hold([{"CPU": 1, "GPU": 1}], "a task", timeout_s=float(sys.argv[2]), poll_s=0.5)
    print("held", ray.cluster_resources().get("GPU"), flush=True)
except RunFailed as e:
    print("failed:", e, flush=True)
"""


def test_launchable_gpus_are_waited_for_until_a_node_joins(head):
    """Node types come from the GCS's cluster config; the wait asks the autoscaler, shows progress, and returns
    once a node with a GPU joins (here by hand: the fake cluster has no cloud to launch one)."""
    env = head["env"]
    waiter = subprocess.Popen([sys.executable, "-c", WAIT_SCRIPT, "gcs", "300"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out: list[str] = []
    try:
        for line in waiter.stdout:
            out.append(line)
            if "asking the autoscaler" in line:
                break
        assert "(launchable: gpu_group: 1 CPU, 1 GPU x 1)" in "".join(out), "".join(out)[-3000:]  # from the GCS
        log = head["temp"] / "gpu-node.log"
        with open(log, "w") as f:
            head["procs"].append(subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{head['port']}", "--num-cpus=1", "--num-gpus=1",
                 *head["common"]], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_started(head["procs"][-1], log)
        rest, _ = waiter.communicate(timeout=300)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    text = "".join(out) + rest
    assert "held 1.0" in text, text[-3000:]
    assert "waiting for the autoscaler's nodes (GPU): 1/1 GPU (100%)" in text, text[-3000:]


def test_a_wait_that_never_ends_is_a_clear_error(head):
    env = {**head["env"], "OODRAY_AUTOSCALING_CONFIG": str(GPU_YAML)}
    # a GPU node from the previous test may be there: this wants 4 GPUs on one node, which only gpu_8x has
    proc = subprocess.run([sys.executable, "-c", WAIT_SCRIPT.replace('{"CPU": 1, "GPU": 1}', '{"CPU": 1, "GPU": 4}'),
                           "yaml", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert "failed: a task: waited 2s for the autoscaler to add nodes holding 1 CPU, 4 GPU" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_8x" in proc.stdout  # the node types it was waiting for are named


def test_local_refusal_is_unchanged_before_ray(monkeypatch):
    from conftest import forbid_ray

    from oodray.runtime import init_ray_for

    forbid_ray(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(OodrayError, match="needs 1 GPUs but the local Ray cluster has 0"):
        init_ray_for(1, 1, "x")
