"""Experiment configuration: frozen dataclasses resolved once, in one direction.

Resolution order: defaults < dataset preset < YAML file (`experiments/*.yaml`) < CLI flags < dotted overrides
(`--set train.lr=3e-4`). The resolved config is saved next to every output (`save_config`) and rebuilt from a plain
dict with `ExperimentConfig.from_dict`, which is how Ray workers get it back on their first line.

- `schema`: the dataclasses, validators and accepted names (imports nothing of oodray but errors);
- `keys`: names derived from a config (run names, the classifier's cache key);
- `presets`: per-dataset presets (plain data);
- `resolve`: resolution for a new experiment and for an existing checkpoint, YAML, overrides, `save_config`.
"""

from oodray.config.keys import classifier_key, config_hash, data_identity
from oodray.config.presets import PRESETS
from oodray.config.resolve import (
    config_for_checkpoint,
    load_yaml,
    parse_override,
    resolve_config,
    save_config,
)
from oodray.config.schema import (
    AA_VERSIONS,
    LOSS_TERMS,
    NORMS,
    OBJECTIVES,
    REGIMES,
    SCHEDULERS,
    THREAT_MODELS,
    TRAIN_ATTACKS,
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    TrainConfig,
    TranslatorConfig,
    TuneConfig,
    check_eps,
    flatten,
)

_check_eps = check_eps  # the name earlier versions exported

__all__ = [
    "AA_VERSIONS", "LOSS_TERMS", "NORMS", "OBJECTIVES", "PRESETS", "REGIMES", "SCHEDULERS", "THREAT_MODELS",
    "TRAIN_ATTACKS",
    "AttackConfig", "ClassifierConfig", "DataConfig", "EvalConfig", "ExperimentConfig", "LossConfig", "TrainConfig",
    "TranslatorConfig", "TuneConfig", "check_eps", "classifier_key", "config_for_checkpoint", "config_hash",
    "data_identity",
    "flatten", "load_yaml", "parse_override", "resolve_config", "save_config",
]
