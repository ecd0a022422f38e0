"""Experiment configuration: frozen dataclasses resolved once, in one direction.

Resolution order: defaults < dataset preset < YAML file (`experiments/*.yaml`) < CLI dotted overrides
(`--set train.lr=3e-4`). Unknown keys and wrong types are `ConfigError`s naming the key. The resolved config is
saved next to every output (`save_config`) and rebuilt from a plain dict with `ExperimentConfig.from_dict`, which
is how Ray workers get it back on their first line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oodray.errors import ConfigError

NORMS = ("Linf", "L2")
THREAT_MODELS = ("oblivious", "adaptive", "transfer")
REGIMES = ("oblivious", "adaptive")
AA_VERSIONS = ("standard", "plus", "rand")
OBJECTIVES = ("robust", "pareto")
TRAIN_ATTACKS = ("pgd", "fgsm", "apgd-ce")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not accepted; choose one of: {', '.join(choices)}")


def _check_eps(key: str, eps: float, norm: str) -> None:
    limit = 1.0 if norm == "Linf" else 100.0
    if not (math.isfinite(eps) and 0.0 < eps <= limit):
        raise ConfigError(f"{key}={eps!r} is out of range; {norm} eps must be in (0, {limit:g}] on [0,1] pixels")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None  # where the user keeps datasets; None -> the dataset's default places
    download: bool = False  # torchvision downloads only when explicitly allowed
    image_size: int = 224  # ImageNet resize/crop resolution
    val_fraction: float = 0.1  # part of the training split held out for validation (seeded)
    seed: int = 0  # split and evaluation-subset seed

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} must be in (0, 0.5)")
        _check_positive("data.image_size", self.image_size)


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str | None = None  # None -> the dataset's default classifier
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    weights: str | None = None  # local weights file (ImageNet ResNet-50)
    adversarial: str = "none"  # none | pgd (Madry) | trades
    adv_eps: float | None = None  # None -> attack.eps
    adv_steps: int = 7
    trades_beta: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("classifier.adversarial", self.adversarial, ("none", "pgd", "trades"))
        _check_positive("classifier.epochs", self.epochs, allow_zero=True)
        _check_positive("classifier.lr", self.lr)
        _check_positive("classifier.batch_size", self.batch_size)


@dataclass(frozen=True)
class TranslatorConfig:
    arch: str = "unet"  # unet | resnet | identity | tiny | dae
    depth: int | None = None  # unet: number of downsamplings
    width: int | None = None  # base channel width
    norm: str | None = None  # batch | instance | none
    dropout: float | None = None  # unet
    blocks: int | None = None  # resnet: residual blocks
    downsamplings: int | None = None  # resnet
    residual: bool = True  # output x + delta (True) or the direct output
    gate: bool = False  # translate only inputs an OOD detector flags (Mahalanobis on C's features)
    gate_percentile: float = 95.0  # threshold = this percentile of clean validation scores

    def __post_init__(self) -> None:
        if self.norm is not None:
            _check_choice("translator.norm", self.norm, ("batch", "instance", "none"))
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"translator.dropout={self.dropout!r} must be in [0, 1)")
        if not 50.0 <= self.gate_percentile < 100.0:
            raise ConfigError(f"translator.gate_percentile={self.gate_percentile!r} must be in [50, 100)")


LOSS_TERMS = ("pixel", "consistency", "ce", "feature", "identity", "clean_consistency", "gan")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the translator objective's named terms; a zero weight removes the term."""

    pixel: float = 1.0  # |T(x_ood) - x_clean|
    pixel_kind: str = "l1"  # l1 | l2
    consistency: float = 1.0  # KL(C(x_clean) || C(T(x_ood)))
    ce: float = 0.0  # CE(C(T(x_ood)), y)
    feature: float = 0.0  # perceptual: C's intermediate features of T(x_ood) vs x_clean
    identity: float = 1.0  # |T(x) - x| on clean inputs
    clean_consistency: float = 1.0  # KL(C(x) || C(T(x))) on clean inputs: keeps clean accuracy
    gan: float = 0.0  # PatchGAN adversarial term

    def __post_init__(self) -> None:
        _check_choice("loss.pixel_kind", self.pixel_kind, ("l1", "l2"))
        for name in LOSS_TERMS:
            _check_positive(f"loss.{name}", getattr(self, name), allow_zero=True)
        if self.weights() == {}:
            raise ConfigError(f"every loss weight is 0; at least one of {'/'.join(LOSS_TERMS)} must be > 0")

    def weights(self) -> dict[str, float]:
        return {n: float(getattr(self, n)) for n in LOSS_TERMS if getattr(self, n) > 0}


@dataclass(frozen=True)
class AttackConfig:
    """The threat model (norm, eps) and the OOD inputs the translator learns from."""

    norm: str = "Linf"
    eps: float = 0.3
    attacks: tuple[str, ...] = ("pgd",)  # mixed per batch
    eps_mix: tuple[float, ...] = ()  # extra training eps values mixed per batch (empty -> eps only)
    steps: int = 10
    shift_fraction: float = 0.25  # part of each batch replaced by natural shifts (darker, blur, ...)

    def __post_init__(self) -> None:
        _check_choice("attack.norm", self.norm, NORMS)
        _check_eps("attack.eps", self.eps, self.norm)
        for a in self.attacks:
            _check_choice("attack.attacks", a, TRAIN_ATTACKS)
        if not self.attacks:
            raise ConfigError("attack.attacks is empty; give at least one of: " + ", ".join(TRAIN_ATTACKS))
        for e in self.eps_mix:
            _check_eps("attack.eps_mix", e, self.norm)
        _check_positive("attack.steps", self.steps)
        if not 0.0 <= self.shift_fraction <= 1.0:
            raise ConfigError(f"attack.shift_fraction={self.shift_fraction!r} must be in [0, 1]")

    def eps_values(self) -> tuple[float, ...]:
        return self.eps_mix or (self.eps,)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64  # per worker
    regime: str = "oblivious"  # oblivious (cached attacks on C) | adaptive (on the fly against C(T(.)))
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    proxy_examples: int = 200  # fixed validation subset attacked end to end every epoch
    proxy_steps: int = 10
    max_failures: int = 2  # Ray Train FailureConfig retries
    amp: bool = True  # mixed precision, used only on GPU
    max_batches: int | None = None  # cap on batches per epoch (tests, quick searches)

    def __post_init__(self) -> None:
        _check_choice("train.regime", self.regime, REGIMES)
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.lr", self.lr)
        _check_positive("train.workers", self.workers)
        _check_positive("train.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        _check_positive("train.cpus_per_worker", self.cpus_per_worker)
        _check_positive("train.proxy_examples", self.proxy_examples)


@dataclass(frozen=True)
class EvalConfig:
    threat_models: tuple[str, ...] = ("oblivious", "adaptive", "transfer")
    norms: tuple[str, ...] = ()  # empty -> attack.norm
    eps: tuple[float, ...] = ()  # empty -> attack.eps
    n_examples: int = 500
    version: str = "standard"
    shards: int = 2
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0
    batch_size: int = 250
    shifts: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for t in self.threat_models:
            _check_choice("eval.threat_models", t, THREAT_MODELS)
        for n in self.norms:
            _check_choice("eval.norms", n, NORMS)
        _check_choice("eval.version", self.version, AA_VERSIONS)
        _check_positive("eval.n_examples", self.n_examples)
        _check_positive("eval.shards", self.shards)


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 6
    objective: str = "robust"  # robust (TPE on proxy robust acc) | pareto (NSGA-II on robust and clean)
    max_concurrent: int | None = None  # None -> sized from the cluster's resources
    final_top_k: int = 1
    scheduler: str = "asha"  # asha (stops weak trials early) | fifo (every trial runs its full budget)
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    min_clean_accuracy_drop: float = 0.05  # robust objective: trials losing more clean accuracy are penalised
    space: dict[str, Any] = field(default_factory=dict)  # narrows/fixes the search space: {"translator.arch": ["unet"]}

    def __post_init__(self) -> None:
        _check_choice("tune.objective", self.objective, OBJECTIVES)
        _check_choice("tune.scheduler", self.scheduler, ("asha", "fifo"))
        _check_positive("tune.num_samples", self.num_samples)
        _check_positive("tune.final_top_k", self.final_top_k, allow_zero=True)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str | None = None  # None -> derived deterministically from the config
    storage: str = "runs"  # local path, shared path or s3://, gs:// URI
    cache_dir: str | None = None  # None -> $OODRAY_CACHE or ~/.cache/oodray
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return _from_dict(cls, d, "")

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys replaced: `cfg.replace(**{"train.lr": 1e-4})`."""
        d = self.to_dict()
        for k, v in dotted.items():
            _set_dotted(d, k, v)
        return ExperimentConfig.from_dict(d)

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or os.environ.get("OODRAY_CACHE") or Path.home() / ".cache" / "oodray")

    def eval_norms(self) -> tuple[str, ...]:
        return self.eval.norms or (self.attack.norm,)

    def eval_eps(self) -> tuple[float, ...]:
        return self.eval.eps or (self.attack.eps,)


# Dataset presets: each names the dataset's standard threat model and affordable training budgets.
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "classifier": {"arch": "tiny_cnn", "epochs": 30, "lr": 0.01},
        "translator": {"arch": "tiny"},
        "attack": {"eps": 0.1, "steps": 5},
        "train": {"epochs": 1, "batch_size": 32, "proxy_examples": 32, "proxy_steps": 3},
        "eval": {"n_examples": 32, "shards": 2},
    },
    "digits": {
        "classifier": {"arch": "small_cnn", "epochs": 30, "batch_size": 64},
        "translator": {"arch": "unet", "depth": 2, "width": 16},
        "attack": {"eps": 0.2, "steps": 10},
        "train": {"epochs": 3, "batch_size": 64, "proxy_examples": 180},
        "eval": {"n_examples": 200, "shards": 2},
        "tune": {"num_samples": 4, "final_top_k": 1},
    },
    # Sized for a 2-core CPU machine (search + final AutoAttack: 84 min there): 60 batches of 128 per epoch,
    # U-Nets of width 8-16, PGD only; a GPU cluster lifts max_batches and widens the space.
    "fashion-mnist": {
        "classifier": {"arch": "small_cnn", "epochs": 8},
        "translator": {"arch": "unet", "depth": 2, "width": 16},
        "attack": {"eps": 0.1, "steps": 10},
        "train": {"epochs": 4, "batch_size": 128, "proxy_examples": 500, "max_batches": 60},
        "eval": {"n_examples": 1000, "shards": 2},
        "tune": {"num_samples": 6, "final_top_k": 1,
                 "space": {"translator.arch": ["unet"], "translator.width": [8, 16], "attack.attacks": ["pgd"],
                           "attack.eps_mix": ["eps"]}},
    },
    "mnist": {
        "classifier": {"arch": "small_cnn", "epochs": 8},
        "translator": {"arch": "unet", "depth": 2, "width": 32},
        "attack": {"eps": 0.3, "steps": 20},
        "train": {"epochs": 10, "batch_size": 128, "proxy_examples": 500},
        "eval": {"n_examples": 1000},
    },
    "cifar10": {
        "classifier": {"arch": "resnet18_cifar", "epochs": 60, "lr": 1e-3, "batch_size": 256},
        "translator": {"arch": "unet", "depth": 3, "width": 64},
        "attack": {"eps": 8 / 255, "steps": 10},
        "train": {"epochs": 30, "batch_size": 128, "proxy_examples": 1000},
        "eval": {"n_examples": 1000, "norms": ["Linf"], "eps": [8 / 255]},
    },
    "imagenet": {
        "classifier": {"arch": "resnet50", "epochs": 0},
        "translator": {"arch": "resnet", "downsamplings": 2, "blocks": 6, "width": 64},
        "attack": {"eps": 4 / 255, "steps": 5},
        "train": {"epochs": 10, "batch_size": 64, "proxy_examples": 500, "proxy_steps": 5},
        "eval": {"n_examples": 5000, "shards": 16},
    },
}


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
        _set_dotted(override_cfg, key, value)
    name = (
        _get_dotted(override_cfg, "data.name") or dataset or _get_dotted(file_cfg, "data.name") or DataConfig.name
    )
    from oodray.data import DATASETS  # late import: config stays importable without torch

    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; known: {', '.join(DATASETS.names())}")
    merged: dict[str, Any] = {}
    for layer in (PRESETS.get(name, {}), file_cfg, extra or {}, override_cfg):
        _deep_merge(merged, layer)
    _set_dotted(merged, "data.name", name)
    return ExperimentConfig.from_dict(merged)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:  # #15: a one-line error naming the file, not the codec's message alone
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
    from oodray.io import atomic_write_text

    path = Path(directory) / filename
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    return path


# --- plumbing ---------------------------------------------------------------------------------------------------


def _to_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "space":
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)  # never alias a layer (e.g. PRESETS) that later layers would mutate


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{key}': '{p}' is not a section")
        d = nxt
    d[parts[-1]] = value


def flatten(d: dict[str, Any], prefix: str = "", *, drop_none: bool = False) -> dict[str, Any]:
    """Nested config dict -> {"section.key": value}; with drop_none, unset (None) values are left out."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}.", drop_none=drop_none))
        elif v is not None or not drop_none:
            out[f"{prefix}{k}"] = v
    return out


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{prefix}{k}'; known in this section: {', '.join(sorted(fields))}")
        kwargs[k] = _coerce(hints[k], v, f"{prefix}{k}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, v, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, key)
    if origin is tuple:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            v = [x.strip() for x in v.split(",")] if isinstance(v, str) else [v]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {v!r}")
        return tuple(_coerce(args[0], x, key) for x in v)
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {v!r}")
        return dict(v)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(f"config key '{key}' must be true or false, got {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ConfigError(f"config key '{key}' must be an integer, got {v!r}")
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ConfigError(f"config key '{key}' must be a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
    if tp is Any:
        return v
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")
