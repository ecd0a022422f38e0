"""Training-time attacks: PGD, FGSM, APGD-CE (pyautoattack's `APGDAttack`) and per-sample mixtures of them.

Every attack works in [0,1] pixel space on a model that takes [0,1] NCHW images and returns logits, runs the model
in eval mode with its parameters frozen and restores both afterwards, so an attack never changes BatchNorm
statistics, train/eval flags or any parameter's ``.grad``. `attack_specs(cfg)` turns a config's `attack` section
into the mixture that training and the oblivious cache use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pyautoattack.autopgd_base import APGDAttack
from torch import Tensor, nn

from oodray.attacks.common import (
    AA_LOGGER,
    ATTACKS,
    _attack_mode,
    _check_batch,
    _check_int,
    _check_step_size,
    _expand,
    _forked_rng,
    _input_grad,
    _l2,
    _project,
    _random_start,
    validate_eps,
)
from oodray.config.schema import ExperimentConfig
from oodray.errors import ConfigError


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy; returns the last iterate, detached, in eps and [0,1].

    Linf takes sign steps, L2 per-sample unit-gradient steps; the default step size is 2.5 * eps / steps
    (Madry et al.), so the iterate can cross the ball. The random start draws from `generator` (global RNG if
    None).
    """
    eps = validate_eps(eps, norm)
    steps = _check_int("steps", steps, 1)
    step_size = 2.5 * eps / steps if step_size is None else _check_step_size(step_size)
    _check_batch(x, y)
    x = x.detach().clone()
    with _attack_mode(model):
        x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y)
            if norm == "Linf":
                x_adv = x_adv + step_size * grad.sign()
            else:
                x_adv = x_adv + step_size * grad / _expand(_l2(grad).clamp_min(1e-12), grad)
            x_adv = _project(x, x_adv, eps, norm)
    return x_adv.detach()


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "Linf") -> Tensor:
    """One gradient step of size eps from x (Linf: sign of the gradient; L2: the unit gradient), in [0,1]."""
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=eps, random_start=False)


def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 100,
    seed: int = 0,
    best_loss: bool = True,
) -> Tensor:
    """APGD on the cross-entropy (pyautoattack's ``APGDAttack``, one restart), seeded by `seed`.

    With ``best_loss=True`` (what training wants) every sample comes back as its highest-loss iterate. With
    ``False`` it is pyautoattack's default: an adversarial point where one was found, else the clean input,
    which is what counting robust accuracy wants but would train on clean images for every sample not fooled.
    """
    eps = validate_eps(eps, norm)
    steps = _check_int("steps", steps, 1)
    seed = _check_int("seed", seed, 0)
    _check_batch(x, y)
    attack = APGDAttack(model, n_iter=steps, norm=norm, eps=eps, loss="ce", seed=seed, n_restarts=1,
                        device=x.device, logger=logging.getLogger(AA_LOGGER))
    with _attack_mode(model), _forked_rng():
        torch.manual_seed(seed)  # perturb(best_loss=True) does not seed its random start itself
        x_adv = attack.perturb(x.detach(), y.detach(), best_loss=bool(best_loss))
    return x_adv.detach().to(x.dtype)


@dataclass(frozen=True)
class AttackSpec:
    """One training-time attack: name in ATTACKS, norm in NORMS, eps, steps (pgd, apgd-ce), pgd's step size."""

    name: str
    norm: str = "Linf"
    eps: float = 0.3
    steps: int = 10
    step_size: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ConfigError(f"unknown attack {self.name!r}; expected one of: {', '.join(ATTACKS)}")
        object.__setattr__(self, "eps", validate_eps(self.eps, self.norm))
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1))
        if self.step_size is not None:
            if self.name != "pgd":
                raise ConfigError(f"step_size is only used by pgd, got step_size={self.step_size!r} "
                                 f"for {self.name!r}; leave it None")
            object.__setattr__(self, "step_size", _check_step_size(self.step_size))


def run_attack(
    spec: AttackSpec,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> Tensor:
    """Run `spec` on (x, y): pgd draws its random start from `generator`, apgd-ce is seeded by `seed`."""
    if not isinstance(spec, AttackSpec):
        raise ValueError(f"spec must be an AttackSpec, got {type(spec).__name__}")
    if spec.name == "pgd":
        return pgd(model, x, y, eps=spec.eps, norm=spec.norm, steps=spec.steps, step_size=spec.step_size,
                   generator=generator)
    if spec.name == "fgsm":
        return fgsm(model, x, y, eps=spec.eps, norm=spec.norm)
    return apgd_ce(model, x, y, eps=spec.eps, norm=spec.norm, steps=spec.steps, seed=seed)


def assign_specs(n: int, n_specs: int, *, generator: torch.Generator | None) -> Tensor:
    """The spec index (0..n_specs-1) of each of n samples, uniformly at random; a CPU int64 tensor.

    ``mixed_attack`` makes exactly this draw first, so the same seed reproduces its assignment.
    """
    n = _check_int("n", n, 0)
    n_specs = _check_int("n_specs", n_specs, 1)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(n_specs, (n,), generator=generator, device=device).cpu()


def mixed_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    specs: Sequence[AttackSpec],
    *,
    generator: torch.Generator | None,
) -> Tensor:
    """Attack each sample with one of `specs` (drawn by ``assign_specs``); the output keeps the input order.

    Samples that drew the same spec are attacked together; pgd random starts and apgd-ce seeds come from
    `generator` after the assignment, so a seeded generator reproduces the whole batch.
    """
    specs = tuple(specs)
    if not specs or not all(isinstance(s, AttackSpec) for s in specs):
        raise ValueError(f"specs must be a non-empty sequence of AttackSpec, got {specs!r}")
    _check_batch(x, y)
    assignment = assign_specs(x.shape[0], len(specs), generator=generator)
    device = generator.device if generator is not None else torch.device("cpu")
    out = x.detach().clone()
    for k, spec in enumerate(specs):
        members = (assignment == k).nonzero().flatten().to(x.device)
        if members.numel() == 0:
            continue
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
        out[members] = run_attack(spec, model, x[members], y[members], generator=generator, seed=seed)
    return out


def attack_specs(cfg: ExperimentConfig) -> list[AttackSpec]:
    """The training mixture of a config: every attack in `attack.attacks` at every eps in `attack.eps_values()`."""
    return [AttackSpec(name=a, norm=cfg.attack.norm, eps=e, steps=cfg.attack.steps)
            for a in cfg.attack.attacks for e in cfg.attack.eps_values()]
