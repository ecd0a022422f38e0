"""Where work runs: the Ray that every oodray command starts or joins, the hook its workers run, the device a task uses.

Imports only the standard library and oodray.errors at module level (ray and torch when called: heavy imports), so
any module may import it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from oodray.errors import OodrayError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0


def pin_ray_address() -> None:
    """Worker setup hook: points RAY_ADDRESS at the worker's own cluster.

    Ray's state API, when called with no address, looks for running GCS processes and fails when it finds two. That
    happens when two local Rays share a machine, e.g. an evaluation beside a search. Ray Train's
    `PlacementGroupCleaner` calls it. When it fails, a trial that Tune stops keeps its worker group's placement group
    forever, and the next trial waits for CPUs that never free up.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(num_cpus: int | None = None) -> None:
    """Connects to RAY_ADDRESS when set, else starts a local Ray bound to 127.0.0.1 (token auth stays on)."""
    import ray

    if ray.is_initialized():
        return
    # Under load (or while a stopped trial's workers are torn down) 60 s is too short for a worker group to start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if os.environ.get("RAY_ADDRESS"):
        _check_reachable(os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        hook = f"{pin_ray_address.__module__}.{pin_ray_address.__qualname__}"
        # Ray binds every port (GCS, raylet, object manager, workers, agents, metrics) to all interfaces unless the
        # node IP is loopback. ray.init rewrites _node_ip_address=127.0.0.1 to the host's address; Ray's single-host
        # mode (its default on macOS/Windows) makes the node IP 127.0.0.1. Set for this start only, so that a later
        # `ray start` of a multi-node cluster on this machine is unaffected.
        from ray._private import ray_constants

        cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False,
                     runtime_env={"worker_process_setup_hook": hook})
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def task_device(gpus: float, cpus: float) -> Any:
    """The torch device of a Ray task or worker granted `gpus` and `cpus`; also sizes torch's CPU threads to them."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def init_ray_for(cpus: float, gpus: float, what: str) -> None:
    """`init_ray` for work that needs `cpus` and `gpus` at once: refused before a local Ray starts when this machine
    cannot hold it; on a joined cluster, checked against its resources once connected (warns: nodes may join)."""
    import ray

    if not ray.is_initialized():
        check_resources(cpus, gpus, what)
    init_ray()
    if os.environ.get("RAY_ADDRESS"):
        check_resources(cpus, gpus, what, available=ray.cluster_resources())


def _check_reachable(address: str) -> None:
    """A `host:port` RAY_ADDRESS where nothing listens is one line now, not a connection retried for minutes."""
    if "://" in address or address == "auto" or ":" not in address:
        return  # ray://, auto and other forms are Ray's to resolve
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise OodrayError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e}); start it (ray start --head) "
                          "or unset RAY_ADDRESS to run on a local Ray") from None


def local_resources() -> dict[str, float] | None:
    """The CPUs and GPUs a local Ray started by `init_ray` would have; None when RAY_ADDRESS names a cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(cpus: float, gpus: float, what: str, available: dict[str, float] | None = None) -> None:
    """Refuses, before anything waits for it, a request that the cluster can never satisfy ("needs 4 CPUs, the
    cluster has 2"). Checked against the local machine before a local Ray starts (`available=None`), or against a
    joined cluster's current resources, where an autoscaler may still add nodes: then it only warns."""
    joined = available is not None
    have = available if joined else local_resources()
    if have is None:
        return  # a cluster not joined yet: checked again once connected
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > have.get(kind, 0.0) + 1e-9:
            line = (f"{what} needs {need:g} {kind}s but the {'cluster' if joined else 'local Ray cluster'} has "
                    f"{have.get(kind, 0.0):g}")
            if joined:
                log.warning("%s now; waiting for the autoscaler to add nodes (Ctrl-C to stop)", line)
            else:
                raise OodrayError(f"{line}; lower the request or run on a cluster (RAY_ADDRESS)")
