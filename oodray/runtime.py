"""Where work runs: the Ray that every oodray command starts or joins, the hook its workers run, the device a task uses.

Imports only the standard library at module level (ray and torch when called), so any module may import it.
"""

from __future__ import annotations

import os
from typing import Any


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
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        hook = f"{pin_ray_address.__module__}.{pin_ray_address.__qualname__}"
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": hook})


def task_device(gpus: float, cpus: float) -> Any:
    """The torch device of a Ray task or worker granted `gpus` and `cpus`; also sizes torch's CPU threads to them."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
