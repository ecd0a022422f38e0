"""Image-to-image translators T by name: they map OOD inputs back to the data distribution, in [0,1].

Registered: `unet` (pix2pix-style U-Net), `resnet` (CycleGAN-style ResNet generator), `identity` (no defence,
through the same code path), `tiny` (tests), `dae` (MagNet-style denoising auto-encoder baseline) and `bitdepth`
(a non-differentiable input quantisation baseline whose gradient is the identity: BPDA built in).
Every builder's knobs are optional (None keeps the builder's default), so a search can leave any of them unset.
Common options: `residual` (x + delta) or direct output; the output is always clamped to [0,1].
Inputs of any size are padded (replicate) to the multiple the architecture needs and cropped back.

The translator checkpoint format lives here too: `translator.pt` holds T's weights, the optimizer(s), the epoch, the
gate's state and the resolved config (`CHECKPOINT_FORMAT`); `load_translator_checkpoint` validates one and
`latest_checkpoint` finds a run's newest (Ray Train names them `checkpoint_<time>/`).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodray.config.schema import TranslatorConfig
from oodray.errors import CheckpointError, ConfigError
from oodray.io import check_finite, load_checkpoint
from oodray.registry import Registry

TRANSLATORS = Registry("translator")
CHECKPOINT_FORMAT = "oodray.translator/1"
CHECKPOINT_FILE = "translator.pt"


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"translator norm '{kind}' is not accepted; choose batch, instance or none")


class Translator(nn.Module):
    """Wraps a body network: pads to `multiple`, runs it, crops, adds x (residual) and clamps to [0,1]."""

    def __init__(self, body: nn.Module, name: str, residual: bool, multiple: int = 1) -> None:
        super().__init__()
        self.body, self.name, self.residual, self.multiple = body, name, residual, multiple

    def check_input(self, h: int, w: int) -> None:
        """Raises a one-line ConfigError if the architecture cannot take h x w images."""
        if self.multiple > min(h, w):
            raise ConfigError(f"translator '{self.name}' downsamples by {self.multiple}, more than the "
                              f"{h}x{w} images allow; lower its depth/downsamplings to at most "
                              f"{int(math.log2(min(h, w)))}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        out = self.body(xp)[..., :h, :w]
        return (x + out).clamp(0, 1) if self.residual else torch.sigmoid(out)


class IdentityTranslator(nn.Module):
    """T(x) = x: the undefended classifier through the same code path."""

    name = "identity"
    residual = True

    def check_input(self, h: int, w: int) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _UNetBody(nn.Module):
    def __init__(self, channels: int, depth: int, width: int, norm: str, dropout: float) -> None:
        super().__init__()
        chs = [min(width * 2**i, width * 8) for i in range(depth + 1)]
        self.inc = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleList()
        for i in range(depth):
            innermost = i == depth - 1
            self.downs.append(nn.Sequential(
                nn.Conv2d(chs[i], chs[i + 1], 4, stride=2, padding=1),
                nn.Identity() if innermost else _norm(norm, chs[i + 1]),  # 1x1 bottlenecks cannot be normed
                nn.LeakyReLU(0.2)))
        self.ups = nn.ModuleList()
        for i in reversed(range(depth)):
            cin = chs[i + 1] if i == depth - 1 else 2 * chs[i + 1]
            self.ups.append(nn.Sequential(
                nn.ConvTranspose2d(cin, chs[i], 4, stride=2, padding=1), _norm(norm, chs[i]), nn.ReLU(),
                nn.Dropout(dropout) if dropout > 0 else nn.Identity()))
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        h = skips.pop()
        for k, u in enumerate(self.ups):
            h = u(h if k == 0 else torch.cat([h, skips.pop()], 1))
        return self.out(torch.cat([h, skips.pop()], 1))


@TRANSLATORS.register("unet")
def unet(channels: int, depth: int = 2, width: int = 32, norm: str = "batch", dropout: float = 0.0,
         residual: bool = True) -> Translator:
    if depth < 1:
        raise ConfigError(f"translator.depth={depth} must be >= 1")
    return Translator(_UNetBody(channels, depth, width, norm, dropout), "unet", residual, multiple=2**depth)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReplicationPad2d(1), nn.Conv2d(ch, ch, 3), _norm(norm, ch), nn.ReLU(),
            nn.ReplicationPad2d(1), nn.Conv2d(ch, ch, 3), _norm(norm, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@TRANSLATORS.register("resnet")
def resnet(channels: int, downsamplings: int = 2, blocks: int = 6, width: int = 32, norm: str = "instance",
           residual: bool = True) -> Translator:
    if downsamplings < 0 or blocks < 0:
        raise ConfigError(f"translator downsamplings={downsamplings}, blocks={blocks} must be >= 0")
    layers: list[nn.Module] = [nn.ReplicationPad2d(3), nn.Conv2d(channels, width, 7), _norm(norm, width), nn.ReLU()]
    ch = width
    for _ in range(downsamplings):
        layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), _norm(norm, ch * 2), nn.ReLU()]
        ch *= 2
    layers += [_ResBlock(ch, norm) for _ in range(blocks)]
    for _ in range(downsamplings):
        layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1), _norm(norm, ch // 2),
                   nn.ReLU()]
        ch //= 2
    layers += [nn.ReplicationPad2d(3), nn.Conv2d(ch, channels, 7)]
    # Every downsampled map must stay >= 2 pixels so that instance norm has statistics to compute.
    return Translator(nn.Sequential(*layers), "resnet", residual, multiple=2 ** (downsamplings + 1))


@TRANSLATORS.register("tiny")
def tiny(channels: int, width: int = 8, residual: bool = True) -> Translator:
    body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1))
    return Translator(body, "tiny", residual)


@TRANSLATORS.register("dae")
def dae(channels: int, width: int = 32, residual: bool = False) -> Translator:
    """MagNet's reformer: a small conv auto-encoder trained on clean + noisy inputs only."""
    body = nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(width, width, 3, padding=1), nn.Sigmoid(), nn.Upsample(scale_factor=2),
        nn.Conv2d(width, width, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(width, channels, 3, padding=1))
    return Translator(body, "dae", residual, multiple=2)


class BitDepth(nn.Module):
    """Quantises pixels to 2**bits levels; backward is the identity (BPDA: the honest attacker's gradient)."""

    residual = False

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ConfigError(f"bitdepth bits={bits} must be in 1..8")
        self.name, self.levels = "bitdepth", 2**bits - 1

    def check_input(self, h: int, w: int) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * self.levels) / self.levels
        return x + (q - x).detach()


@TRANSLATORS.register("bitdepth")
def bitdepth(channels: int, depth: int = 3) -> nn.Module:
    return BitDepth(depth)  # `depth` doubles as the bit depth so the config needs no extra key


@TRANSLATORS.register("identity")
def identity(channels: int) -> nn.Module:
    return IdentityTranslator()


def build_translator(cfg: TranslatorConfig, channels: int, image_size: tuple[int, int] | None = None) -> nn.Module:
    """Builds T from its config; with `image_size`, checks up front that the architecture can take it."""
    knobs = {"depth": cfg.depth, "width": cfg.width, "norm": cfg.norm, "dropout": cfg.dropout,
             "blocks": cfg.blocks, "downsamplings": cfg.downsamplings, "residual": cfg.residual}
    builder = TRANSLATORS.get(cfg.arch)
    accepted = set(inspect.signature(builder).parameters)
    model = builder(channels=channels, **{k: v for k, v in knobs.items() if v is not None and k in accepted})
    if image_size is not None:
        model.check_input(*image_size)
    return model


def is_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A Ray Train run's checkpoint directories, oldest first (Ray names them `checkpoint_<time>`)."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest checkpoint file of a run (Ray's own index decides what a resume loads: `train.resume_checkpoint`)."""
    found = [d / CHECKPOINT_FILE for d in checkpoint_dirs(run_dir) if (d / CHECKPOINT_FILE).is_file()]
    return str(found[-1]) if found else None


def load_translator_checkpoint(path: str | Path) -> dict[str, Any]:
    """A translator checkpoint file, or a Ray checkpoint directory holding one; validated, loaded as data."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    state = load_checkpoint(p, what="translator checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{p}' is not an oodray translator checkpoint (format {state.get('format')!r})")
    if not (isinstance(state.get("translator"), dict) and isinstance(state.get("config"), dict)
            and type(state.get("epoch")) is int):
        raise CheckpointError(f"translator checkpoint '{p}' lacks its weights, config or integer epoch")
    check_finite(state["translator"], "translator checkpoint", p)
    return state
