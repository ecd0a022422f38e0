"""What every attack shares: validation of its arguments, the attack mode (eval, frozen, flags restored), the RNG
shield against pyautoattack's reseeding, and the projections onto the Linf / L2 ball in [0,1] pixel space.

Accepted names come from `oodray.config.schema` (one set for config and attacks). Bad user values (norm, eps, steps,
version) are `ConfigError`s (also `ValueError`s); a wrongly shaped batch is a `ValueError`: a bug in the caller.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodray.config.schema import AA_VERSIONS as AUTOATTACK_VERSIONS
from oodray.config.schema import NORMS
from oodray.config.schema import TRAIN_ATTACKS as ATTACKS
from oodray.errors import ConfigError

_EPS_MAX = {"Linf": 1.0, "L2": 100.0}
AA_LOGGER = "auto-attack"  # pyautoattack's logger: progress at DEBUG, its checks at WARNING

__all__ = ["ATTACKS", "AUTOATTACK_VERSIONS", "NORMS", "validate_eps"]


def validate_eps(eps: float, norm: str) -> float:
    """Return `eps` as a float if it is a valid radius for `norm` (Linf: 0 < eps <= 1; L2: 0 < eps <= 100)."""
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; expected one of: {', '.join(NORMS)}")
    upper = _EPS_MAX[norm]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (
        math.isfinite(eps) and 0.0 < eps <= upper
    ):
        raise ConfigError(f"{norm} eps must be a finite number in (0, {upper:g}], got {eps!r}")
    return float(eps)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_step_size(step_size: float) -> float:
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not (
        math.isfinite(step_size) and step_size > 0
    ):
        raise ConfigError(f"step_size must be a finite number > 0 or None, got {step_size!r}")
    return float(step_size)


def _check_batch(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor of shape (N, ...), got {shape}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of shape ({x.shape[0]},) matching x, got {shape}")


def _check_version(version: str) -> None:
    if version not in AUTOATTACK_VERSIONS:
        choices = ", ".join(AUTOATTACK_VERSIONS)
        raise ConfigError(f"unknown AutoAttack version {version!r}; expected one of: {choices}")



@contextlib.contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack; every module's own flag comes back."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for module, training in modes:
            module.training = training


def _forked_rng() -> contextlib.AbstractContextManager:
    """Shield torch's global RNG from pyautoattack, which calls torch.manual_seed(seed) in every perturb()."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


def _l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")  # sum: a sample's step does not depend on N
    return torch.autograd.grad(loss, x)[0]


def _project(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project x_adv onto the eps-ball around x, then into [0,1] (which only shrinks the perturbation)."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * _expand((eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0), delta)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    if norm == "Linf":
        delta = (2 * torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype) - 1) * eps
    else:  # a uniformly random direction, at a uniformly random radius in [0, eps]
        direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        radius = eps * torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype)
        delta = direction * _expand(radius / _l2(direction).clamp_min(1e-12), direction)
    return _project(x, x + delta.to(x.device), eps, norm)


# Images attacked at once where no batch size is given: this many float values per batch (64 images of 3x224x224).
# PGD on ResNet-50 at 224 px took ~100 MiB per image on CPU (issue 14), so ~6.4 GiB per batch; 8x8 or 28x28 images
# get hundreds per batch.
VALUES_PER_BATCH = 64 * 3 * 224 * 224


def memory_batch(shape: tuple[int, ...], cap: int) -> int:
    """How many images of `shape` (C, H, W) to attack at once: as many as fit `VALUES_PER_BATCH`, at most `cap`."""
    values = 1
    for s in shape:
        values *= int(s)
    return max(1, min(int(cap), VALUES_PER_BATCH // max(1, values)))
