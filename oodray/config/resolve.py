"""Config resolution, in one direction: defaults < dataset preset < YAML file < CLI flags < dotted overrides.

`resolve_config` builds a new experiment's config; `config_for_checkpoint` resolves the config of an evaluation of
an existing translator checkpoint (the checkpoint's config with eval settings layered on top). `save_config` writes
the resolved config beside an output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from oodray.config.keys import classifier_key
from oodray.config.presets import PRESETS
from oodray.config.schema import DataConfig, ExperimentConfig, flatten, get_dotted, set_dotted
from oodray.errors import ConfigError


def resolve_config(
    dataset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """defaults < preset[dataset] < YAML < `extra` (CLI flags) < dotted overrides; validated once."""
    file_cfg: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    override_cfg: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(override_cfg, key, value)
    name = (
        get_dotted(override_cfg, "data.name") or dataset or get_dotted(file_cfg, "data.name") or DataConfig.name
    )
    from oodray.data import DATASETS  # deferred: it imports torch; reading a config must not

    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(DATASETS.names())}")
    merged: dict[str, Any] = {}
    for layer in (PRESETS.get(name, {}), file_cfg, extra or {}, override_cfg):
        _deep_merge(merged, layer)
    set_dotted(merged, "data.name", name)
    return ExperimentConfig.from_dict(merged)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                          ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(d).__name__}")
    return d


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); values are read as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def save_config(cfg: ExperimentConfig, directory: str | Path, filename: str = "config.json") -> Path:
    """Writes the resolved config beside an output (atomically)."""
    from oodray.io import atomic_write_text  # deferred: io imports torch, and reading a config must not

    path = Path(directory) / filename
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    return path



def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "space":
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)  # never alias a layer (e.g. PRESETS) that later layers would mutate



def config_for_checkpoint(state: dict[str, Any], *, dataset: str | None, yaml_path: str | None,
                          overrides: list[str], layer: dict[str, Any]) -> ExperimentConfig:
    """An evaluation's config for an existing translator checkpoint: the checkpoint's resolved config with the
    YAML's eval section, the CLI's eval flags (`layer`) and dotted overrides on top. Dataset, classifier and
    translator must stay the checkpoint's."""
    base = ExperimentConfig.from_dict(state["config"])
    if dataset and dataset != base.data.name:
        raise ConfigError(f"--dataset {dataset} disagrees with the checkpoint, which was trained on "
                          f"'{base.data.name}'")
    dotted: dict[str, Any] = {}
    if yaml_path:
        dotted.update(flatten({"eval": load_yaml(yaml_path).get("eval") or {}}, drop_none=True))
    dotted.update(flatten(layer, drop_none=True))
    dotted.update(dict(parse_override(o) for o in overrides))
    cfg = base.replace(**dotted)
    if classifier_key(cfg) != classifier_key(base) or cfg.data.name != base.data.name:
        raise ConfigError(f"the requested classifier '{classifier_key(cfg)}' disagrees with the checkpoint's "
                          f"'{classifier_key(base)}' (the translator was trained in front of that one)")
    if cfg.translator != base.translator:
        raise ConfigError("translator.* comes from the checkpoint and cannot be overridden")
    return cfg
