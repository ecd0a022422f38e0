"""The experiment config's schema: frozen dataclasses, their validators and the one set of accepted names.

Every accepted name (norms, threat models, regimes, AutoAttack versions, objectives, training attacks, loss terms)
is defined here once; `oodray.attacks` and the CLIs import them. `ExperimentConfig.from_dict` rebuilds a typed,
validated config from a plain dict (how Ray workers get it back on their first line); unknown keys and wrong
types are `ConfigError`s naming the key. Imports only the standard library and oodray.errors (yaml-free); nothing
here touches torch or datasets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodray.errors import ConfigError

NORMS = ("Linf", "L2")
THREAT_MODELS = ("oblivious", "adaptive", "transfer")
REGIMES = ("oblivious", "adaptive")
AA_VERSIONS = ("standard", "plus", "rand")
OBJECTIVES = ("robust", "pareto")
SCHEDULERS = ("asha", "hyperband", "bohb", "fifo")
TRAIN_ATTACKS = ("pgd", "fgsm", "apgd-ce")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # Python logging's, as Ray Train's LoggingConfig takes


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not accepted; choose one of: {', '.join(choices)}")


def check_eps(key: str, eps: float, norm: str) -> None:
    limit = 1.0 if norm == "Linf" else 100.0
    if not (math.isfinite(eps) and 0.0 < eps <= limit):
        raise ConfigError(f"{key}={eps!r} is out of range; {norm} eps must be in (0, {limit:g}] on [0,1] pixels")


def check_cache_path(key: str, value: str | None) -> None:
    """Caches are read lazily, shard by shard, through the file system: an object-store URI cannot hold them."""
    if value and "://" in value:
        raise ConfigError(f"{key}={value!r} is a URI; the cache needs a file-system path, on a cluster one that every "
                          "node mounts (NFS, EFS, Lustre, ...)")


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
    # The training input's DataLoader (results do not depend on these; run names ignore them):
    loader_workers: int | None = None  # decode processes per Train worker; None -> 0 in memory, else its CPUs - 1
    prefetch_factor: int = 2  # batches each decode process prepares ahead
    pin_memory: bool | None = None  # None -> pinned when the worker trains on CUDA
    persistent_workers: bool = True  # keep decode processes across epochs (with loader_workers > 0)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} must be in (0, 0.5)")
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.seed", self.seed, allow_zero=True)
        if self.loader_workers is not None:
            _check_positive("data.loader_workers", self.loader_workers, allow_zero=True)
        _check_positive("data.prefetch_factor", self.prefetch_factor)


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str | None = None  # None -> the dataset's default classifier
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    weights: str | None = None  # torchvision weights name (IMAGENET1K_V2, DEFAULT; from TORCH_HOME) or a local file
    adversarial: str = "none"  # none | pgd (Madry) | trades
    adv_eps: float | None = None  # None -> attack.eps
    adv_steps: int = 7
    trades_beta: float = 6.0
    seed: int = 0
    workers: int = 0  # Ray Train workers (DDP) that train C; 0: in the calling process (small datasets, CPU)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        check_choice("classifier.adversarial", self.adversarial, ("none", "pgd", "trades"))
        _check_positive("classifier.workers", self.workers, allow_zero=True)
        _check_positive("classifier.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        _check_positive("classifier.cpus_per_worker", self.cpus_per_worker)
        _check_positive("classifier.epochs", self.epochs, allow_zero=True)
        _check_positive("classifier.lr", self.lr)
        _check_positive("classifier.batch_size", self.batch_size)
        _check_positive("classifier.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("classifier.adv_steps", self.adv_steps)
        _check_positive("classifier.trades_beta", self.trades_beta, allow_zero=True)
        _check_positive("classifier.seed", self.seed, allow_zero=True)


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
            check_choice("translator.norm", self.norm, ("batch", "instance", "none"))
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"translator.dropout={self.dropout!r} must be in [0, 1)")
        if not 50.0 <= self.gate_percentile < 100.0:
            raise ConfigError(f"translator.gate_percentile={self.gate_percentile!r} must be in [50, 100)")
        for key in ("width", "blocks"):
            if getattr(self, key) is not None:
                _check_positive(f"translator.{key}", getattr(self, key))
        if self.downsamplings is not None:
            _check_positive("translator.downsamplings", self.downsamplings, allow_zero=True)
        if self.depth is not None:
            if self.arch == "bitdepth" and not 1 <= self.depth <= 16:  # the bitdepth baseline's bits per channel
                raise ConfigError(f"translator.depth={self.depth!r} (bits of the bitdepth baseline) must be in 1..16")
            _check_positive("translator.depth", self.depth)


LOSS_TERMS = ("pixel", "consistency", "ce", "feature", "identity", "clean_consistency", "trades", "gan")


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
    trades: float = 0.0  # TRADES-style KL(C(T(x)) || C(T(x_ood))), gradients through both sides
    gan: float = 0.0  # PatchGAN adversarial term

    def __post_init__(self) -> None:
        check_choice("loss.pixel_kind", self.pixel_kind, ("l1", "l2"))
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
        check_choice("attack.norm", self.norm, NORMS)
        check_eps("attack.eps", self.eps, self.norm)
        for a in self.attacks:
            check_choice("attack.attacks", a, TRAIN_ATTACKS)
        if not self.attacks:
            raise ConfigError("attack.attacks is empty; give at least one of: " + ", ".join(TRAIN_ATTACKS))
        for e in self.eps_mix:
            check_eps("attack.eps_mix", e, self.norm)
        _check_positive("attack.steps", self.steps)
        if not 0.0 <= self.shift_fraction <= 1.0:
            raise ConfigError(f"attack.shift_fraction={self.shift_fraction!r} must be in [0, 1]")

    def eps_values(self) -> tuple[float, ...]:
        return self.eps_mix or (self.eps,)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (annealed to 0 over train.epochs, set per epoch)
    batch_size: int = 64  # per worker
    regime: str = "oblivious"  # oblivious (cached attacks on C) | adaptive (on the fly against C(T(.)))
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    proxy_examples: int = 200  # fixed validation subset attacked end to end every epoch
    proxy_steps: int = 10
    max_failures: int = 2  # Ray Train FailureConfig retries
    amp: bool = True  # bf16 autocast, used only on GPU (a no-op on CPU)
    # channels_last memory format for every conv net trained or attacked (translator and classifier training, the
    # oblivious cache, evaluation tasks); only float rounding differs (not in run names). null (default): on CUDA
    # always, on CPU for images up to 64 px, where it is faster, and NCHW above (runtime.use_channels_last)
    channels_last: bool | None = None
    max_batches: int | None = None  # cap on batches per epoch (tests, quick searches)
    # Ray Train's own lines on the console (its worker group's start, every report with its whole metrics dict, every
    # checkpoint written): WARNING shows only its warnings and errors, INFO all of them. Its log files in the Ray
    # session keep every level. Not in run names: it changes no result
    ray_log_level: str = "WARNING"

    def __post_init__(self) -> None:
        check_choice("train.regime", self.regime, REGIMES)
        check_choice("train.ray_log_level", self.ray_log_level, LOG_LEVELS)
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.lr", self.lr)
        _check_positive("train.workers", self.workers)
        _check_positive("train.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        _check_positive("train.cpus_per_worker", self.cpus_per_worker)
        _check_positive("train.proxy_examples", self.proxy_examples)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.proxy_steps", self.proxy_steps)
        _check_positive("train.max_failures", self.max_failures, allow_zero=True)
        _check_positive("train.seed", self.seed, allow_zero=True)
        if self.max_batches is not None:
            _check_positive("train.max_batches", self.max_batches)


@dataclass(frozen=True)
class CacheConfig:
    """How the oblivious cache is built: Ray tasks, each loading C once and generating several shards."""

    batch_size: int | None = None  # images attacked at once; None -> from the image size (oodray.cache)
    shards_per_task: int = 8  # shards one task generates after one load of C
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            _check_positive("cache.batch_size", self.batch_size)
        _check_positive("cache.shards_per_task", self.shards_per_task)
        _check_positive("cache.gpus_per_task", self.gpus_per_task, allow_zero=True)
        _check_positive("cache.cpus_per_task", self.cpus_per_task)


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
    # The "transfer" attacker's surrogate: None -> C's own recipe with classifier.seed + 1. A pretrained C that is not
    # trained (classifier.epochs=0) does not depend on the seed, so it needs another architecture (and weights).
    surrogate_arch: str | None = None
    surrogate_weights: str | None = None

    def __post_init__(self) -> None:
        for t in self.threat_models:
            check_choice("eval.threat_models", t, THREAT_MODELS)
        for n in self.norms:
            check_choice("eval.norms", n, NORMS)
        check_choice("eval.version", self.version, AA_VERSIONS)
        _check_positive("eval.n_examples", self.n_examples)
        _check_positive("eval.shards", self.shards)
        _check_positive("eval.batch_size", self.batch_size)
        _check_positive("eval.cpus_per_task", self.cpus_per_task)
        _check_positive("eval.gpus_per_task", self.gpus_per_task, allow_zero=True)
        _check_positive("eval.seed", self.seed, allow_zero=True)


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 6
    objective: str = "robust"  # robust (TPE on proxy robust acc) | pareto (NSGA-II on robust and clean)
    max_concurrent: int | None = None  # None -> sized from the cluster's resources
    final_top_k: int = 1
    # asha (stops weak trials early) | hyperband (synchronous brackets) | bohb (HyperBand brackets, BOHB's model picks
    # the configurations instead of Optuna; needs `pip install 'oodray[bohb]'`) | fifo (full budgets)
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 3  # ASHA/HyperBand/BOHB: 1/reduction_factor of a rung goes on; 3: docs/benchmarks.md
    min_clean_accuracy_drop: float = 0.05  # robust objective: trials losing more clean accuracy are penalised
    space: dict[str, Any] = field(default_factory=dict)  # narrows/fixes the search space: {"translator.arch": ["unet"]}
    # Refit (oodray.refit): the top final_top_k configurations retrained from scratch before the final AutoAttack, for
    # refit_epochs full epochs, or matched to the training compute of the strongest baseline in refit_match
    # (evaluation directories). Neither set: no refit; the search's own trials are evaluated.
    refit_epochs: int | None = None
    refit_match: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("tune.objective", self.objective, OBJECTIVES)
        check_choice("tune.scheduler", self.scheduler, SCHEDULERS)
        if self.scheduler == "bohb" and self.objective != "robust":
            raise ConfigError(f"tune.scheduler=bohb needs tune.objective=robust (BOHB's model has one objective), got "
                              f"tune.objective={self.objective!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor={self.reduction_factor!r} must be an integer >= 2")
        _check_positive("tune.num_samples", self.num_samples)
        _check_positive("tune.final_top_k", self.final_top_k, allow_zero=True)
        _check_positive("tune.grace_period", self.grace_period)
        if self.max_concurrent is not None:
            _check_positive("tune.max_concurrent", self.max_concurrent)
        if self.refit_epochs is not None:
            _check_positive("tune.refit_epochs", self.refit_epochs)
        if isinstance(self.refit_match, str) or not all(isinstance(d, str) and d for d in self.refit_match):
            raise ConfigError(f"tune.refit_match={self.refit_match!r} must be a list of evaluation directories")
        if not 0.0 <= self.min_clean_accuracy_drop <= 1.0:
            raise ConfigError(f"tune.min_clean_accuracy_drop={self.min_clean_accuracy_drop!r} must be in [0, 1]")


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
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        """Checks that span sections: every evaluated norm/eps and the adversarial-training eps are valid radii."""
        check_cache_path("cache_dir", self.cache_dir)
        for norm in self.eval_norms():
            check_choice("eval.norms", norm, NORMS)
            for eps in self.eval_eps():
                check_eps("eval.eps", eps, norm)
        if self.classifier.adv_eps is not None:
            check_eps("classifier.adv_eps", self.classifier.adv_eps, self.attack.norm)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return _from_dict(cls, d, "")

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys replaced: `cfg.replace(**{"train.lr": 1e-4})`."""
        d = self.to_dict()
        for k, v in dotted.items():
            set_dotted(d, k, v)
        return ExperimentConfig.from_dict(d)

    def resolved_cache_dir(self) -> Path:
        """Where fixed classifiers and oblivious caches live: a file-system path, shared by every node on a cluster."""
        env = os.environ.get("OODRAY_CACHE")
        if not self.cache_dir:
            check_cache_path("OODRAY_CACHE", env)
        return Path(self.cache_dir or env or Path.home() / ".cache" / "oodray").expanduser()

    def eval_norms(self) -> tuple[str, ...]:
        return self.eval.norms or (self.attack.norm,)

    def eval_eps(self) -> tuple[float, ...]:
        return self.eval.eps or (self.attack.eps,)


# --- plumbing ---------------------------------------------------------------------------------------------------


def _to_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v



def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
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


def get_dotted(d: dict[str, Any], key: str) -> Any:
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
        if inner == [bool] and not isinstance(v, bool):
            raise ConfigError(f"config key '{key}' must be true or false, or null (the automatic choice), got {v!r}")
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
