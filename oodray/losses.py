"""The translator objective as named, weighted terms (the weights are what the search tunes).

Terms: `pixel` (L1/L2 of T(x_ood) to the clean image), `consistency` (KL from C(x_clean) to C(T(x_ood))),
`ce` (cross-entropy of C(T(x_ood)) to the label), `feature` (perceptual: C's intermediate features),
`identity` (T(x) ~ x on clean inputs), `clean_consistency` (KL from C(x) to C(T(x)) on clean inputs: what
keeps clean accuracy where the pixel-level identity term is too weak a constraint) and `gan` (LSGAN term against
a PatchGAN discriminator).
A term whose weight is 0 is not computed at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from oodray.config import LOSS_TERMS, LossConfig
from oodray.models.classifier import Classifier

TERMS = LOSS_TERMS


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN, with as many stride-2 layers as the image size allows (up to 3)."""

    def __init__(self, channels: int, image_size: tuple[int, int], width: int = 32) -> None:
        super().__init__()
        n = max(1, min(3, int(math.log2(min(image_size))) - 1))
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """LSGAN: real patches -> 1, translated patches -> 0."""
    return 0.5 * (((disc(real) - 1) ** 2).mean() + (disc(fake.detach()) ** 2).mean())


class TranslatorObjective:
    def __init__(self, cfg: LossConfig, classifier: Classifier, discriminator: nn.Module | None = None) -> None:
        self.weights = cfg.weights()
        self.pixel_kind = cfg.pixel_kind
        self.classifier = classifier
        self.discriminator = discriminator
        if "gan" in self.weights and discriminator is None:
            raise ValueError("loss.gan > 0 needs a discriminator")

    def __call__(self, translator: nn.Module, x_clean: torch.Tensor, x_ood: torch.Tensor, y: torch.Tensor,
                 ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Returns (weighted total, each term's unweighted value, T(x_ood) for the discriminator step)."""
        w, C = self.weights, self.classifier
        t_ood = translator(x_ood)
        terms: dict[str, torch.Tensor] = {}
        # One forward of C per input, shared by every term that reads it (the logits and, for the feature term, the
        # activations of the same pass): C on the clean input (no gradient) and C on T(x_ood).
        p_clean = f_clean = None
        if "consistency" in w or "clean_consistency" in w or "feature" in w:
            with torch.no_grad():
                logits_x, f_clean = self._forward(C, x_clean, "feature" in w)
                p_clean = F.softmax(logits_x, 1)  # the target of both KL terms
        logits = f_ood = None
        if any(k in w for k in ("consistency", "ce", "trades", "feature")):
            logits, f_ood = self._forward(C, t_ood, "feature" in w)
        if "pixel" in w:
            terms["pixel"] = (F.l1_loss if self.pixel_kind == "l1" else F.mse_loss)(t_ood, x_clean)
        if "consistency" in w:
            terms["consistency"] = F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="batchmean")
        if "ce" in w:
            terms["ce"] = F.cross_entropy(logits, y)
        if "feature" in w:
            terms["feature"] = sum(F.mse_loss(a, b) for a, b in zip(f_ood, f_clean)) / len(f_ood)
        if "identity" in w or "clean_consistency" in w or "trades" in w:
            t_clean = translator(x_clean)
            if "identity" in w:
                terms["identity"] = F.l1_loss(t_clean, x_clean)
            logits_clean = C(t_clean) if "clean_consistency" in w or "trades" in w else None
            if "clean_consistency" in w:
                terms["clean_consistency"] = F.kl_div(F.log_softmax(logits_clean, 1), p_clean, reduction="batchmean")
            if "trades" in w:  # TRADES (Zhang et al. 2019) on C(T(.)): the attacked prediction tied to the clean one
                terms["trades"] = F.kl_div(F.log_softmax(logits, 1), F.softmax(logits_clean, 1),
                                           reduction="batchmean")
        if "gan" in w:
            terms["gan"] = ((self.discriminator(t_ood) - 1) ** 2).mean()
        total = sum(w[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}, t_ood

    @staticmethod
    def _forward(C: Classifier, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        return C.logits_and_features(x) if features else (C(x), None)
