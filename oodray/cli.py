"""Shared CLI plumbing: common flags, config resolution, and the one-line error / exit-code-2 contract."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from oodray.config import ExperimentConfig, resolve_config
from oodray.errors import OodrayError


def add_config_args(p: argparse.ArgumentParser, dataset_default: str | None = None) -> None:
    p.add_argument("--dataset", default=dataset_default, help="dataset name (default: the config's, else digits)")
    p.add_argument("--config", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--data-dir", help="where datasets live (data.data_dir)")
    p.add_argument("--cache-dir", help="where fixed classifiers and attack caches live (default ~/.cache/oodray)")


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


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs a CLI main: user errors print one line and exit 2, no traceback."""
    try:
        code = main(argv)
    except (OodrayError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (resume with the same command)", file=sys.stderr)
        sys.exit(130)
    finally:
        from oodray.locks import release_all

        release_all()  # #15: the run locks a command took (oodray.locks.hold) end with it
    sys.exit(code or 0)
