"""Attacks, the only package that imports the attack library (``pyautoattack``).

- `common`: argument validation, attack mode, RNG shield, projections;
- `gradient`: PGD, FGSM, APGD-CE, `AttackSpec`, per-sample mixtures, `attack_specs(cfg)` (training and the cache);
- `autoattack`: the resumable AutoAttack wrapper and the settings each version runs (evaluation).
"""

from oodray.attacks.autoattack import AutoAttackResult, autoattack, autoattack_settings
from oodray.attacks.common import ATTACKS, AUTOATTACK_VERSIONS, NORMS, validate_eps
from oodray.attacks.gradient import AttackSpec, apgd_ce, assign_specs, attack_specs, fgsm, mixed_attack, pgd, run_attack

__all__ = ["ATTACKS", "AUTOATTACK_VERSIONS", "NORMS", "AttackSpec", "AutoAttackResult", "apgd_ce", "assign_specs",
           "attack_specs", "autoattack", "autoattack_settings", "fgsm", "mixed_attack", "pgd", "run_attack",
           "validate_eps"]
