"""The search space of `oodray.tune`, as plain data, and how a trial's sampled parameters become a config.

`SPACE` maps config keys to (kind, choices or range); `CONDITIONAL` keys exist only for their architecture;
`narrowed_space` applies `tune.space` from a YAML; `DefineByRun` is the Optuna define-by-run space and
`config_space` the same space for BOHB (ConfigSpace, imported there); `trial_overrides` maps sampled parameters onto
config keys; `trial_name` is the one name of a trial's Ray Train run directory.
`oodray.tune` (the search) and `oodray.results` (the tables) both import it; it imports only config and errors.
"""

from __future__ import annotations

from typing import Any

from oodray.config import ExperimentConfig
from oodray.errors import ConfigError

# The search space: key -> (kind, choices or (low, high[, log])). Conditional keys live under their architecture.
SPACE: dict[str, tuple[str, Any]] = {
    "translator.arch": ("cat", ["unet", "resnet"]),
    "translator.residual": ("cat", [True, False]),
    "translator.width": ("cat", [8, 16, 32, 64]),
    "translator.norm": ("cat", ["batch", "instance", "none"]),
    "translator.depth": ("int", (1, 3)),  # unet only
    "translator.dropout": ("float", (0.0, 0.3)),  # unet only
    "translator.downsamplings": ("int", (0, 2)),  # resnet only
    "translator.blocks": ("int", (1, 6)),  # resnet only
    "loss.pixel": ("float", (0.0, 2.0)),
    "loss.consistency": ("float", (0.0, 2.0)),
    "loss.ce": ("float", (0.0, 2.0)),
    "loss.feature": ("float", (0.0, 1.0)),
    "loss.identity": ("float", (0.0, 2.0)),
    "loss.clean_consistency": ("float", (0.0, 3.0)),
    "loss.trades": ("float", (0.0, 3.0)),
    "loss.gan": ("cat", [0.0, 0.05]),
    "train.lr": ("float", (1e-4, 3e-3, "log")),
    "train.lr_schedule": ("cat", ["constant", "cosine"]),
    "train.regime": ("cat", ["oblivious", "adaptive"]),
    "attack.attacks": ("cat", ["pgd", "pgd,fgsm"]),
    "attack.eps_mix": ("cat", ["eps", "eps,half"]),
    "attack.steps": ("cat", [5, 10]),  # of the training attacks (each value its own oblivious cache)
}
CONDITIONAL = {"translator.depth": "unet", "translator.dropout": "unet", "translator.downsamplings": "resnet",
               "translator.blocks": "resnet"}


def narrowed_space(narrow: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Applies `tune.space` from the YAML: a list narrows a choice, a scalar fixes it, {low, high} a range."""
    space = dict(SPACE)
    for key, v in narrow.items():
        if key not in SPACE:
            raise ConfigError(f"tune.space key '{key}' is not searched; known: {', '.join(SPACE)}")
        kind, _ = SPACE[key]
        if isinstance(v, list):
            if not v:
                raise ConfigError(f"tune.space narrows '{key}' to nothing (empty list)")
            space[key] = ("cat", v)
        elif isinstance(v, dict):
            if not {"low", "high"} <= set(v) or v["low"] > v["high"]:
                raise ConfigError(f"tune.space '{key}' range needs low <= high, got {v}")
            space[key] = (kind if kind != "cat" else "float", (v["low"], v["high"], *(["log"] if v.get("log") else [])))
        else:
            space[key] = ("fixed", v)
    return space


class DefineByRun:
    """Optuna define-by-run space (picklable, so Tune can checkpoint the searcher): conditional parameters are
    only suggested for their architecture, and downsampling depths are capped by the image size."""

    def __init__(self, space: dict[str, tuple[str, Any]], max_depth: int) -> None:
        self.space, self.max_depth = space, max_depth

    def _pick(self, trial: Any, key: str, fixed: dict[str, Any]) -> Any:
        kind, arg = self.space[key]
        if kind == "fixed":
            fixed[key] = arg
            return arg
        if kind == "cat":
            return trial.suggest_categorical(key, arg)
        low, high, *log = arg
        low, high = _depth_cap(key, low, high, self.max_depth)
        if kind == "int":
            return trial.suggest_int(key, int(low), int(high))
        return trial.suggest_float(key, float(low), float(high), log=bool(log))

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        fixed: dict[str, Any] = {}
        arch = self._pick(trial, "translator.arch", fixed)
        for key in self.space:
            if key == "translator.arch" or (key in CONDITIONAL and CONDITIONAL[key] != arch):
                continue
            self._pick(trial, key, fixed)
        return fixed or None


def _depth_cap(key: str, low: Any, high: Any, max_depth: int) -> tuple[Any, Any]:
    """Downsampling depths fit the image: a U-Net of depth d halves it d times, a ResNet translator one time fewer."""
    if key in ("translator.depth", "translator.downsamplings"):
        high = min(high, max_depth - (1 if key == "translator.downsamplings" else 0))
        low = min(low, high)
    return low, high


def config_space(space: dict[str, tuple[str, Any]], max_depth: int, seed: int) -> tuple[Any, dict[str, Any]]:
    """The space as a ConfigSpace for BOHB (`tune.scheduler=bohb`): the same keys, ranges and depth caps as
    `DefineByRun`, each conditional key active only under its architecture. Returns (space, fixed values); the fixed
    ones go to the Tuner's `param_space`, since ConfigSpace constants are strings or numbers only."""
    import ConfigSpace as CS

    kind, arg = space["translator.arch"]
    archs = [arg] if kind == "fixed" else list(arg)
    cs, fixed, made = CS.ConfigurationSpace(seed=seed), {}, {}
    for key, (kind, arg) in space.items():
        if key in CONDITIONAL and CONDITIONAL[key] not in archs:  # never applies (as DefineByRun never asks)
            continue
        if kind == "fixed":
            fixed[key] = arg
        elif kind == "cat":
            made[key] = CS.CategoricalHyperparameter(key, list(arg))
        else:
            low, high, *log = arg
            low, high = _depth_cap(key, low, high, max_depth)
            if kind == "int":
                made[key] = (CS.Constant(key, int(low)) if low == high
                             else CS.UniformIntegerHyperparameter(key, int(low), int(high)))
            else:
                made[key] = (CS.Constant(key, float(low)) if low == high
                             else CS.UniformFloatHyperparameter(key, float(low), float(high), log=bool(log)))
    cs.add(list(made.values()))
    if "translator.arch" in made and len(archs) > 1:
        cs.add([CS.EqualsCondition(made[key], made["translator.arch"], owner)
                for key, owner in CONDITIONAL.items() if key in made])
    return cs, fixed


def validate_space(base: ExperimentConfig, space: dict[str, tuple[str, Any]]) -> None:
    """Every value the search can sample must make a valid config: checked once, before Ray starts, so that a bad
    `tune.space` value is one line instead of every trial failing inside Ray."""
    for key, (kind, arg) in space.items():
        values = [arg] if kind == "fixed" else list(arg) if kind == "cat" else [arg[0], arg[1]]
        for v in values:
            try:
                base.replace(**trial_overrides({key: int(v) if kind == "int" else v}, base))
            except (ConfigError, TypeError, ValueError) as e:
                raise ConfigError(f"tune.space '{key}' value {v!r} is not accepted: {e}") from None


def trial_overrides(params: dict[str, Any], base: ExperimentConfig) -> dict[str, Any]:
    """Maps sampled parameters onto config keys (mixtures expand to tuples, conditional keys are reset)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k not in SPACE:
            continue
        v = v.item() if hasattr(v, "item") else v  # BOHB samples numpy scalars (np.str_, np.int64, np.bool_)
        if k == "attack.attacks":
            v = tuple(str(v).split(","))
        elif k == "attack.eps_mix":
            v = (base.attack.eps,) if v == "eps" else (base.attack.eps, base.attack.eps / 2)
        out[k] = v
    arch = out.get("translator.arch", base.translator.arch)
    for k, a in CONDITIONAL.items():
        if a != arch:
            out[k] = None
    return out


def trial_name(trial_id: str) -> str:
    """The Ray Train run (and evaluation) directory name of a Tune trial: deterministic, so a restored trial resumes."""
    return f"trial-{trial_id}"
