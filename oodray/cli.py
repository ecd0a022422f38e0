"""Shared CLI plumbing: common flags, config resolution, and the one exit policy of every `python -m oodray.*` command.

Exit policy (`run`): oodray's own errors (`OodrayError`: bad names, paths, values, files) print one line and exit 2;
a run that failed on valid input (`RunFailed`) prints one line with its reason and exits 1; Ctrl-C exits 130 with
finished work kept; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from oodray.config import ExperimentConfig, resolve_config
from oodray.errors import Interrupted, OodrayError, RunFailed
from oodray.locks import release_all
from oodray.progress import set_quiet


def add_config_args(p: argparse.ArgumentParser, dataset_default: str | None = None) -> None:
    p.add_argument("--dataset", default=dataset_default, help="dataset name (default: the config's, else digits)")
    p.add_argument("--config", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--data-dir", help="where datasets live (data.data_dir)")
    p.add_argument("--cache-dir", help="where fixed classifiers and attack caches live (default ~/.cache/oodray)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> ExperimentConfig:
    layer: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        layer.setdefault("data", {})["data_dir"] = args.data_dir
    if getattr(args, "cache_dir", None):
        layer["cache_dir"] = args.cache_dir
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            layer.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        elif values is not None:
            layer[section] = values
    return resolve_config(args.dataset, args.config, args.overrides, layer)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    set_quiet(quiet)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its INFO lines repeat the settings per object
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


_command = {"ours": False}  # whether the command `run` runs connected to a Ray of its own (see end_ray)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a CLI main under the exit policy above. SIGTERM stops it as Ctrl-C does (finished work kept, exit 130)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    _command["ours"] = not _ray_connected()  # a Ray it connects to is its own to stop; a caller's stays
    try:
        code = main(argv)
    except OodrayError as e:
        end_ray()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        end_ray()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        end_ray()
        print(str(e) if isinstance(e, Interrupted) else "interrupted; finished work is kept (resume with the same "
              "command)", file=sys.stderr)
        sys.exit(130)
    finally:
        _command["ours"] = False
        signal.signal(signal.SIGTERM, previous)
        release_all()  # the run locks a command took (oodray.locks.hold) end with it
    sys.exit(code or 0)


def end_ray() -> None:
    """Called before a command's last lines: by `run` before its error or interrupt line, and by a command whose work
    is done before the lines that end it (its table, where its results are). Disconnects from the Ray this command
    connected to, so that no worker log line that Ray relays late comes after them (seen: an AutoAttack shard's line
    after a search's last line). A command run in-process (from a test or a notebook, not through `run`) leaves the
    caller's Ray connected."""
    _stop_ray(_command["ours"])


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a command that did not use Ray is not connected
    return ray is not None and ray.is_initialized()


def _stop_ray(ours: bool) -> None:
    """Disconnects this process from the Ray it connected to (`ours`: it was not connected before the command ran)
    before the command's last line: Ray relays its workers' logs to the driver while it shuts down (seen: 70 lines of
    a Train controller's traceback after an interrupted search's resume line), and the line that says what happened
    and how to resume must come last. Ray is shut down at exit anyway; this only brings it forward. A Ray the caller
    had connected (a command run in-process, e.g. from a test or a notebook) is left as it was."""
    if not ours or not _ray_connected():
        return
    import ray

    try:
        ray.shutdown()
    except BaseException as err:  # noqa: BLE001 - a second Ctrl-C here too: the exit and its line matter more
        logging.getLogger(__name__).debug("ray.shutdown() before exiting failed: %r", err)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")
