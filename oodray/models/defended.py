"""The defended model that every attacker sees: [0,1] image -> translator T -> fixed classifier C -> logits.

With a gate (SSD-style Mahalanobis OOD score on C's features, threshold = a percentile of clean validation
scores), inputs judged in-distribution skip T: `y = C(x) if score(x) <= tau else C(T(x))`. The hard routing is
not differentiable, so the gate's mask is straight-through: the forward pass routes hard, the backward pass uses
a sigmoid relaxation of (score - tau). The gate-aware attacker therefore gets a gradient that also pushes inputs
under the threshold (BPDA for the gate), and attacks on this module are end to end.

`build_defended` / `load_defended` rebuild C(T(.)) from a translator checkpoint's state (or a baseline translator
named by the config), with the gate's saved state (`gate_state` / `gate_from_state`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from oodray.config.schema import ExperimentConfig
from oodray.errors import CheckpointError
from oodray.models.classifier import Classifier
from oodray.models.translator import build_translator


def penultimate(classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
    """C's deepest feature map, globally average-pooled to one vector per image."""
    f = classifier.features(x)[-1]
    return f.mean(dim=(2, 3)) if f.ndim == 4 else f.flatten(1)


class MahalanobisGate(nn.Module):
    """OOD score = Mahalanobis distance of C's features to the clean training features: to the nearest class mean
    with a shared covariance when labels are given (Lee et al. 2018), else to one global mean (SSD with k=1)."""

    def __init__(self, dim: int, n_means: int = 1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_means, dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("tau", torch.tensor(0.0))
        self.register_buffer("temperature", torch.tensor(1.0))

    @classmethod
    @torch.no_grad()
    def fit(cls, classifier: Classifier, x_train: torch.Tensor, x_val: torch.Tensor, percentile: float = 95.0,
            y_train: torch.Tensor | None = None) -> MahalanobisGate:
        f = torch.cat([penultimate(classifier, x_train[i:i + 512]) for i in range(0, len(x_train), 512)]).double()
        groups = [f] if y_train is None else [f[y_train == c] for c in torch.unique(y_train)]
        means = torch.stack([g.mean(0) for g in groups])
        centred = torch.cat([g - m for g, m in zip(groups, means)])
        cov = centred.T @ centred / max(1, len(centred) - 1) + 1e-3 * torch.eye(f.shape[1], dtype=f.dtype)
        gate = cls(f.shape[1], len(groups))
        gate.mean.copy_(means.float())
        gate.precision.copy_(torch.linalg.inv(cov).float())
        val_scores = torch.cat([gate.score(classifier, x_val[i:i + 512]) for i in range(0, len(x_val), 512)])
        gate.tau.fill_(float(np.percentile(val_scores.numpy(), percentile)))
        gate.temperature.fill_(max(float(val_scores.std()), 1e-3) / 4)
        return gate

    def score(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        d = penultimate(classifier, x).unsqueeze(1) - self.mean.unsqueeze(0)  # N x K x D
        m = torch.einsum("nkd,de,nke->nk", d, self.precision, d)
        return m.min(dim=1).values.clamp_min(0).sqrt()

    @torch.no_grad()
    def flags(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        return self.score(classifier, x) > self.tau


class DefendedModel(nn.Module):
    """C(T(x)), optionally gated. The classifier stays frozen; only T is ever trained."""

    def __init__(self, classifier: Classifier, translator: nn.Module, gate: MahalanobisGate | None = None) -> None:
        super().__init__()
        self.classifier, self.translator, self.gate = classifier, translator, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        translated = self.classifier(self.translator(x))
        if self.gate is None:
            return translated
        s = self.gate.score(self.classifier, x)
        hard = (s > self.gate.tau).to(x.dtype)
        soft = torch.sigmoid((s - self.gate.tau) / self.gate.temperature)
        m = (hard + (soft - soft.detach())).view(-1, 1)
        return m * translated + (1 - m) * self.classifier(x)

    @torch.no_grad()
    def flag_rate(self, x: torch.Tensor) -> float | None:
        """Share of inputs the gate sends through T (None when ungated: T sees every input)."""
        if self.gate is None:
            return None
        return float(self.gate.flags(self.classifier, x).float().mean())


def gate_state(gate: MahalanobisGate | None) -> dict[str, torch.Tensor] | None:
    return None if gate is None else {k: v.detach().cpu() for k, v in gate.state_dict().items()}


def gate_from_state(state: dict[str, torch.Tensor]) -> MahalanobisGate:
    gate = MahalanobisGate(state["mean"].shape[-1], state["mean"].shape[0])
    gate.load_state_dict(state)
    return gate


def load_defended(state: dict[str, Any], classifier: Classifier, path: str = "<memory>") -> DefendedModel:
    """Rebuilds C(T(.)) (with its gate) from a translator checkpoint's state and the fixed classifier."""
    cfg = ExperimentConfig.from_dict(state["config"])
    t = build_translator(cfg.translator, classifier.info.channels)
    try:
        t.load_state_dict(state["translator"])
    except RuntimeError as e:
        raise CheckpointError(f"translator checkpoint '{path}' does not fit a '{cfg.translator.arch}' translator "
                              f"({str(e).splitlines()[0]})") from None
    gate = gate_from_state(state["gate"]) if state.get("gate") else None
    return DefendedModel(classifier, t.eval(), gate).eval()


def build_defended(cfg: ExperimentConfig, classifier: Classifier, translator_state: dict[str, Any] | None,
                   ) -> DefendedModel:
    """C(T(.)) from a translator checkpoint's state, or the baseline translator (identity, bitdepth) of the config."""
    if translator_state is not None:
        return load_defended(translator_state, classifier, translator_state.get("path", "<memory>"))
    return DefendedModel(classifier, build_translator(cfg.translator, classifier.info.channels)).eval()
