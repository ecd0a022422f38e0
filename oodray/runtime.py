"""Where work runs: the Ray that every oodray command starts or joins, the hook its workers run, the device a task uses.

Imports only the standard library, yaml, oodray.errors and oodray.progress at module level (ray and torch when
called: heavy imports), so any module may import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from oodray.errors import OodrayError, RunFailed
from oodray.progress import Progress

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0
# Ray 2.60 raises a bare Exception with this text when its local node's raylet has not registered with the GCS within
# a fixed 30 s (ray/_private/node.py, not configurable): seen on 2 cores at a load average of 30, five searches at once.
RAY_START_TIMEOUT = "timed out during startup"


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
    # Ray Train's controller polls its workers every 2 s by default, so a finished fit waited ~2-4 s to be noticed
    # (measured: 3.6-5.2 s from the last report to fit()'s return at 2 s, 1.5-1.7 s at 0.5 s; docs/benchmarks.md
    # has the command). A value already set wins; Ray propagates it from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # ray.init replaces the driver's SIGTERM handler with sys.exit(15): a SIGTERM outside the search (the cache build,
    # the final AutoAttack) then exited 15 without saying where it stopped or how to resume. The handler the command
    # had (oodray.cli.run's: stop as Ctrl-C does, exit 130) is put back once Ray is up; a default one is left to Ray.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init(ray, num_cpus)
    finally:
        if callable(sigterm) and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)


def _init(ray: Any, num_cpus: int | None) -> None:
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
        except Exception as e:
            if RAY_START_TIMEOUT not in str(e):
                raise
            raise RunFailed(start_timeout_message()) from None
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def start_timeout_message() -> str:
    """The one line for a local Ray that did not start in time: the machine's state, not a bug (nothing ran yet)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"the local Ray did not start: its node did not register within Ray's fixed 30 s (load average {load:.1f} "
            f"on {os.cpu_count()} CPUs); nothing was run, so run the command again when the machine is less loaded")


def task_device(gpus: float, cpus: float) -> Any:
    """The torch device of a Ray task or worker granted `gpus` and `cpus`; also sizes torch's CPU threads to them."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


# The largest image side at which `train.channels_last: null` (the default) picks channels_last on CPU. Measured with
# benchmarks/layout.py, 1 thread, channels_last vs NCHW (translator step / PGD on C / PGD on C(T)): Fashion-MNIST 28 px
# 1.45x / 1.63x / 1.41x; cifar10's preset at 32 px 1.07x / 1.06x / 1.07x; the imagenet preset at 64 px 1.03x / 1.80x /
# 1.05x, at 112 px 0.98x / 1.07x / 0.96x, at 224 px 0.89x / 1.09x / 0.93x (docs/benchmarks.md).
CPU_CHANNELS_LAST_MAX_SIDE = 64


def use_channels_last(setting: bool | None, device: Any, image_size: tuple[int, ...]) -> bool:
    """Whether conv nets run in channels_last memory format: `setting` (`train.channels_last`) when true or false;
    when null (the default), always on CUDA (cuDNN's fast path under bf16), and on CPU for images of side up to
    CPU_CHANNELS_LAST_MAX_SIDE, where it is faster; larger images stay NCHW there, where channels_last is slower."""
    if setting is not None:
        return setting
    import torch

    return torch.device(device).type == "cuda" or max(image_size) <= CPU_CHANNELS_LAST_MAX_SIDE


def fast_layout(model: Any, enabled: bool) -> Any:
    """The model in channels_last memory format when `enabled` (see `use_channels_last`). Only float rounding changes,
    not what is computed."""
    import torch

    return model.to(memory_format=torch.channels_last) if enabled else model


def amp_autocast(device: Any, enabled: bool) -> Any:
    """bf16 autocast on CUDA when `enabled` (train.amp); a disabled context on CPU, whose results stay bit-identical."""
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_logging(level: str) -> dict[str, Any]:
    """The RunConfig arguments that put Ray Train's console lines at `level` (`train.ray_log_level`): its
    `LoggingConfig`, whose log files in the Ray session keep every level. Nothing on a Ray without it (alpha in 2.60;
    oodray accepts Ray from 2.50), where Ray Train's console stays as that version has it."""
    import ray.train

    config = getattr(ray.train, "LoggingConfig", None)
    return {"logging_config": config(log_level=level)} if config is not None else {}


def quiet_train_reports(level: str) -> None:
    """On a Ray Train worker: the same level for the line Ray Train 2.60 logs at every `ray.train.report` (the whole
    metrics dict, some 2,000 characters per epoch). It comes from a logger named by its source file
    (ray/train/v2/_internal/execution/context.py), which the `ray.train` filter of `train_logging` does not reach.
    Where a Ray version has no such module, nothing changes."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(level)


def init_ray_for(cpus: float, gpus: float, what: str, *,
                 bundles: list[dict[str, float]] | None = None) -> None:
    """`init_ray` for work that needs `cpus` and `gpus` at once, as `bundles` (one per worker or task, each placed on
    one node; default one bundle of everything). Refused before a local Ray starts when this machine cannot hold
    it; on a joined cluster, `ensure_cluster_can_hold` refuses what no node type can ever hold and waits (with
    progress) for nodes its autoscaler launches."""
    import ray

    if not ray.is_initialized():
        check_resources(cpus, gpus, what)
    init_ray()
    ensure_cluster_can_hold(bundles or [{"CPU": cpus, "GPU": gpus}], what)  # also a local Ray started earlier


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


def release_orphaned_placement_groups(first_seen: dict[str, float], grace_s: float, now: float) -> list[str]:
    """Removes this job's placement groups that have held their resources with no live actor in them for `grace_s`
    seconds (since the first call that saw them empty); returns the ids removed. `first_seen` is the caller's
    memory between calls (id -> `now` when first seen empty).

    Why: when Tune stops a trial (ASHA), Ray Train 2.60's controller first tells its `PlacementGroupCleaner` to exit
    without cleaning, then removes its worker group's placement group; Tune kills the trial, and with it the
    controller, in between often enough (seen on 2 CPUs: the 4th trial of an ASHA search) that the group stays,
    holding a worker's CPUs. The next trial's worker group then waits for CPUs that never free up: every 600 s
    its start times out and is retried, and the search hangs. Only this job's groups are looked at (never another
    user's on a shared cluster), and only ones that stayed empty for the whole grace period: a worker group's
    actors are placed within seconds of its group being created, and Tune's trial groups hold the trial's actor.
    Needs Ray's state API (the dashboard): without it this raises, and the caller decides."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # not a search for GCS processes (see pin_ray_address)
    job = ray.get_runtime_context().get_job_id()
    limit = 10_000  # the state API's maximum
    groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True, limit=limit,
                                   raise_on_missing_output=False)
    actors = list_actors(address=address, filters=[("state", "!=", "DEAD")], detail=True, limit=limit,
                         raise_on_missing_output=False)
    if len(groups) >= limit or len(actors) >= limit:
        return []  # a truncated list could make a group in use look empty: remove nothing
    mine = {g.placement_group_id for g in groups if g.creator_job_id == job}
    empty = mine - {a.placement_group_id for a in actors if a.placement_group_id}
    for pg in set(first_seen) - empty:
        del first_seen[pg]
    removed = []
    for pg in sorted(empty):
        if now - first_seen.setdefault(pg, now) >= grace_s:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
            del first_seen[pg]
            removed.append(pg)
    return removed


def local_resources() -> dict[str, float] | None:
    """The CPUs and GPUs a local Ray started by `init_ray` would have; None when RAY_ADDRESS names a cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(cpus: float, gpus: float, what: str) -> None:
    """Refuses, before a local Ray starts, a request that this machine can never satisfy ("needs 4 CPUs, the local
    Ray cluster has 2"). A joined cluster (RAY_ADDRESS) is checked once connected: `ensure_cluster_can_hold`."""
    have = local_resources()
    if have is None:
        return  # a cluster not joined yet: checked again once connected
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > have.get(kind, 0.0) + 1e-9:
            raise OodrayError(f"{what} needs {need:g} {kind}s but the local Ray cluster has {have.get(kind, 0.0):g}; "
                              "lower the request or run on a cluster (RAY_ADDRESS)")


# --- autoscaling clusters -------------------------------------------------------------------------------------------
# A cluster as `ray up clusters/gpu.yaml` starts it is a head with CPU 0 and GPU 0; its GPU nodes exist only once the
# autoscaler launches them. So a request is checked against the node types the autoscaler can launch, read from
# (1) the cluster config in the GCS (`ray._private.state.state.get_cluster_config()`, which Ray Data and Train V2 read;
# no autoscaler of Ray 2.60 writes it yet), else (2) the autoscaling config the head's `ray start
# --autoscaling-config` reads (`~/ray_bootstrap_config.yaml` where `ray up` puts it, or OODRAY_AUTOSCALING_CONFIG).

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` writes the config its head's autoscaler reads
NODE_WAIT_S = 1800.0  # default wait for the autoscaler's nodes (OODRAY_NODE_WAIT_S); a cloud launch takes minutes
POLL_S = 5.0


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler can launch: its resources (None: not stated, e.g. filled in by the provider at
    launch) and how many it may launch (None: no limit)."""

    name: str
    resources: dict[str, float] | None
    max_count: int | None


def autoscaler_node_types() -> list[NodeType] | None:
    """The worker node types this cluster's autoscaler can launch; None when no autoscaler config is found."""
    types = _gcs_node_types()
    if types is not None:
        return types
    path = Path(os.environ.get("OODRAY_AUTOSCALING_CONFIG") or BOOTSTRAP_CONFIG).expanduser()
    return node_types_from_config(path) if path.is_file() else None


def _gcs_node_types() -> list[NodeType] | None:
    try:
        from ray._private.state import state

        cfg = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - a private API: any failure means "not available"
        log.debug("no cluster config in the GCS (%s)", e)
        return None
    if cfg is None or not cfg.node_group_configs:
        return None
    return [NodeType(g.name or f"group{i}", dict(g.resources), None if g.max_count == -1 else int(g.max_count))
            for i, g in enumerate(cfg.node_group_configs)]


def node_types_from_config(path: Path) -> list[NodeType]:
    """Worker node types of a cluster-launcher YAML (`available_node_types`, less the head's type); each type's
    `max_workers` is capped by the cluster's `max_workers`."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise OodrayError(f"autoscaling config '{path}' cannot be read ({str(e).splitlines()[0]})") from None
    cap = cfg.get("max_workers")
    out = []
    for name, t in (cfg.get("available_node_types") or {}).items():
        if name == cfg.get("head_node_type"):
            continue
        most = t.get("max_workers", cap)
        most = min(x for x in (most, cap) if x is not None) if most is not None or cap is not None else None
        res = t.get("resources")
        out.append(NodeType(name, {k: float(v) for k, v in res.items()} if isinstance(res, dict) else None, most))
    return out


def autoscaler_running() -> bool:
    """True when an autoscaler that can launch nodes serves this cluster. Every `ray start --head` runs Ray's
    monitor, which publishes a status in the GCS key-value store; without an autoscaling config it uses a read-only
    node provider, whose node types are the nodes themselves ("node_<id>", as seen on Ray 2.60), while a launching
    autoscaler names its types (gpu_1x, ...). The v2 autoscaler reports a versioned state to the GCS instead."""
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        if any(v != f"node_{k}" for k, v in (report.get("node_type_mapping") or {}).items()):
            return True
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
        return reply.autoscaling_state.autoscaler_state_version > 0
    except Exception as e:  # noqa: BLE001 - private APIs: unknown means "no autoscaler seen"
        log.debug("could not ask for an autoscaler (%s)", e)
        return False


def _positive(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if v > 0}


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in _positive(bundle).items())


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in _positive(b).items():
            out[k] = out.get(k, 0.0) + v
    return out


def fits_now(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Every bundle fits on some node, and the nodes together hold all of them (a bound, not a bin packing)."""
    have = _total(nodes)
    return all(any(_fits(b, n) for n in nodes) for b in bundles) and _fits(_total(bundles), have)


def never_fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]], types: list[NodeType]) -> str | None:
    """Why no cluster these node types can grow into holds `bundles` (None when one may): a bundle no node or type
    holds, or more of a resource than the nodes plus every launchable node have. Errs towards None."""
    if any(t.resources is None for t in types):
        return None
    launchable = [t for t in types if t.max_count != 0]
    for b in bundles:
        if not any(_fits(b, n) for n in nodes) and not any(_fits(b, t.resources or {}) for t in launchable):
            return f"one needs {_fmt(_positive(b))}, more than any node or node type has"
    need = _total(bundles)
    for k, v in need.items():
        most = sum(n.get(k, 0.0) for n in nodes)
        for t in launchable:
            per = (t.resources or {}).get(k, 0.0)
            if per > 0 and t.max_count is None:
                most = math.inf
            else:
                most += per * (t.max_count or 0)
        if v > most + 1e-9:
            return f"together they need {v:g} {k}, and the cluster can grow to {most:g}"
    return None


def cluster_capacity() -> dict[str, float]:
    """The resources this cluster can grow to: its nodes' totals plus every node its autoscaler can still launch
    (inf for a type without a limit); the nodes' totals alone when no node types are known."""
    import ray

    have = {k: float(v) for k, v in ray.cluster_resources().items()}
    for t in (autoscaler_node_types() or []) if os.environ.get("RAY_ADDRESS") else []:
        for k, v in (t.resources or {}).items():
            have[k] = have.get(k, 0.0) + (math.inf if t.max_count is None and v > 0 else v * (t.max_count or 0))
    return have


def _have(nodes: list[dict[str, float]], bundles: list[dict[str, float]]) -> str:
    """The cluster's totals of the resources asked for (CPU and GPU always)."""
    have = _total(nodes)
    return _fmt({k: have.get(k, 0.0) for k in {"CPU", "GPU", *_total(bundles)}})


def _span(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()) if v > 0 or k in ("CPU", "GPU")) or "nothing"


def _types_line(types: list[NodeType]) -> str:
    return "; ".join(f"{t.name}: {_fmt(t.resources) if t.resources is not None else '?'} x "
                     f"{'unlimited' if t.max_count is None else t.max_count}" for t in types) or "none"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def ensure_cluster_can_hold(bundles: list[dict[str, float]], what: str, *, timeout_s: float | None = None,
                            poll_s: float = POLL_S) -> None:
    """On a joined cluster: returns at once when its nodes hold `bundles`; refuses with one line (an `OodrayError`,
    exit 2) what no node and no launchable node type can ever hold, or anything more than a cluster without an
    autoscaler has; otherwise asks the autoscaler for the bundles and waits, with progress, until nodes hold them
    (`RunFailed` after `timeout_s`, default OODRAY_NODE_WAIT_S or 30 min)."""
    nodes = _alive_nodes()
    if fits_now(bundles, nodes):
        return
    types = autoscaler_node_types()
    per = f"{len(bundles)} x {_fmt(_positive(bundles[0]))}" if len(bundles) > 1 else _fmt(_positive(bundles[0]))
    if types is not None:
        why = never_fits(bundles, nodes, types)
        if why is not None:
            raise OodrayError(f"{what} needs {per}; no node of this cluster and no node type its autoscaler can "
                              f"launch can hold it ({why}; launchable: {_types_line(types)}); lower the request or "
                              "add a node type that has it")
    elif not autoscaler_running():
        raise OodrayError(f"{what} needs {per} but the cluster has {_have(nodes, bundles)} and no autoscaler to add "
                          "nodes; lower the request or join nodes that have it (ray start --address=...)")
    _wait_for_nodes(bundles, what, per, types, timeout_s, poll_s)


def _wait_for_nodes(bundles: list[dict[str, float]], what: str, per: str, types: list[NodeType] | None,
                    timeout_s: float | None, poll_s: float) -> None:
    from ray.autoscaler.sdk import request_resources

    timeout_s = float(os.environ.get("OODRAY_NODE_WAIT_S", NODE_WAIT_S)) if timeout_s is None else timeout_s
    key = "GPU" if _total(bundles).get("GPU") else "CPU"
    need = _total(bundles)[key]
    log.info("%s needs %s; asking the autoscaler for nodes (launchable: %s) and waiting up to %s", what, per,
             _types_line(types) if types is not None else "not readable here", _span(timeout_s))
    request_resources(bundles=[_positive(b) for b in bundles])
    t0, bar = time.monotonic(), Progress(f"waiting for the autoscaler's nodes ({key})", math.ceil(need), key)
    try:
        while True:
            nodes = _alive_nodes()
            have = min(need, _total(nodes).get(key, 0.0))
            if math.floor(have) > bar.done:
                bar.update(math.floor(have) - bar.done)
            if fits_now(bundles, nodes):
                log.info("the cluster now holds %s (%.0fs)", per, time.monotonic() - t0)
                return
            if time.monotonic() - t0 > timeout_s:
                raise RunFailed(f"{what}: waited {_span(timeout_s)} for the autoscaler to add nodes holding "
                                f"{per}, and the cluster has {_have(nodes, bundles)}; `ray status` shows why (cloud "
                                "quota or capacity); nothing was started (OODRAY_NODE_WAIT_S sets the wait)")
            time.sleep(poll_s)
    finally:
        bar.close()
        request_resources(bundles=[])  # a standing request would keep the nodes alive after this run
