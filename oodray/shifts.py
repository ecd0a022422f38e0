"""Natural distribution shifts: named, graded corruptions of [0,1] NCHW image batches.

Each shift has five severities (1 = mild, 5 = strong), in the spirit of CIFAR-10-C / ImageNet-C but cheap
enough to apply on the fly. Everything is deterministic except ``noise``, which draws from the given
``generator``.
Blur radii are given in pixels for images up to 32 px and grow linearly with the image side above that, so a
severity means roughly the same visual damage on 8x8 digits, 32x32 CIFAR and 224x224 ImageNet.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

SHIFTS: tuple[str, ...] = ("darker", "brighter", "contrast", "sharpen", "blur", "noise")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# One value per severity 1..5.
_GAMMA = (1.5, 2.0, 2.5, 3.0, 4.0)  # darker: x**g, brighter: x**(1/g)
_CONTRAST = (0.7, 0.5, 0.4, 0.3, 0.2)  # factor on the deviation from each image's mean
_SHARPEN = (0.5, 1.0, 1.5, 2.0, 3.0)  # unsharp-mask amount
_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # CIFAR-10-C's Gaussian-blur sigmas, in pixels at <= 32 px
_NOISE_STD = (0.04, 0.08, 0.12, 0.16, 0.2)
_SHARPEN_SIGMA = 1.0  # blur whose difference from the image is added back by `sharpen`
_REFERENCE_SIDE = 32


def _check_name(name: str) -> None:
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; expected one of: {', '.join(SHIFTS)}")


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"images must be a float tensor of shape (N, C, H, W), got {shape}")


def _scaled_sigma(sigma: float, x: Tensor) -> float:
    side = min(x.shape[-2:])
    return sigma * max(1.0, side / _REFERENCE_SIDE)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of an NCHW batch with replicate padding (edges do not darken).

    The kernel radius is ceil(3 sigma), capped at the image side: replicate padding beyond that only repeats
    the edge pixel, so a wider kernel would cost time without changing what the blur can see.
    """
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma!r}")
    radius = max(1, min(math.ceil(3.0 * sigma), max(x.shape[-2:])))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def apply_shift(x: Tensor, name: str, severity: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Apply shift `name` at `severity` (1..5) to a [0,1] NCHW batch; same shape, dtype and device, in [0,1].

    Only ``noise`` is random: it draws from `generator` (on the generator's device, then moved to `x`'s), so a
    seeded generator gives identical output; with ``None`` it uses torch's global RNG.
    """
    _check_name(name)
    _check_severity(severity)
    _check_images(x)
    level = int(severity) - 1
    x = x.clamp(0.0, 1.0)
    if name == "darker":
        out = x.pow(_GAMMA[level])
    elif name == "brighter":
        out = x.pow(1.0 / _GAMMA[level])
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + (x - mean) * _CONTRAST[level]
    elif name == "sharpen":
        blurred = gaussian_blur(x, _scaled_sigma(_SHARPEN_SIGMA, x))
        out = x + _SHARPEN[level] * (x - blurred)
    elif name == "blur":
        out = gaussian_blur(x, _scaled_sigma(_BLUR_SIGMA[level], x))
    else:  # noise
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        out = x + _NOISE_STD[level] * noise
    return out.clamp(0.0, 1.0)


def random_shifts(
    x: Tensor,
    *,
    generator: torch.Generator | None,
    names: Sequence[str] = SHIFTS,
    severities: Sequence[int] = SEVERITIES,
) -> Tensor:
    """Give every sample of `x` its own (shift, severity), drawn uniformly from `names` x `severities`.

    The choices, and then the noise, come from `generator` in a fixed order, so a seeded generator reproduces
    the batch exactly. Samples that drew the same pair are shifted together; the output keeps the input order.
    """
    _check_images(x)
    names, severities = tuple(names), tuple(severities)
    if not names or not severities:
        raise ValueError(f"names and severities must be non-empty, got {names!r} and {severities!r}")
    for name in names:
        _check_name(name)
    for severity in severities:
        _check_severity(severity)
    device = generator.device if generator is not None else torch.device("cpu")
    name_idx = torch.randint(len(names), (x.shape[0],), generator=generator, device=device).cpu()
    severity_idx = torch.randint(len(severities), (x.shape[0],), generator=generator, device=device).cpu()
    out = torch.empty_like(x)
    for i, name in enumerate(names):
        for j, severity in enumerate(severities):
            members = ((name_idx == i) & (severity_idx == j)).nonzero().flatten().to(x.device)
            if members.numel():
                out[members] = apply_shift(x[members], name, severity, generator=generator)
    return out
