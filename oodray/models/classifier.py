"""Fixed classifiers by name, with normalisation folded in so every input, eps and clip lives in [0,1] pixels.

Registered: `tiny_cnn` (tests), `small_cnn` (digits, MNIST-likes), `resnet18_cifar` (CIFAR-10) and `resnet50`
(ImageNet, torchvision's architecture; weights from a local file). A classifier checkpoint holds the weights,
the architecture and dataset metadata and the resolved config, and is loaded as data (`weights_only=True`).

torchvision is imported by the architectures that need it (heavy import).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodray.data import DatasetInfo
from oodray.errors import CheckpointError, ConfigError
from oodray.io import check_finite, load_checkpoint, save_checkpoint
from oodray.registry import Registry

CLASSIFIERS = Registry("classifier architecture")
FORMAT = "oodray.classifier/1"


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """[0,1] images -> logits. `feature_layers` name the modules whose outputs the perceptual loss compares."""

    def __init__(self, net: nn.Module, info: DatasetInfo, arch: str, feature_layers: list[str]) -> None:
        super().__init__()
        self.normalize = Normalize(info.mean, info.std)
        self.net = net
        self.arch = arch
        self.info = info
        self.feature_layers = feature_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Intermediate activations at `feature_layers` (one forward pass with hooks)."""
        modules = dict(self.net.named_modules())
        out: list[torch.Tensor] = []
        handles = [modules[n].register_forward_hook(lambda _m, _i, o: out.append(o)) for n in self.feature_layers]
        try:
            self.net(self.normalize(x))
        finally:
            for h in handles:
                h.remove()
        return out


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the fixed classifier is never trained by the translator."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@CLASSIFIERS.register("tiny_cnn")
def tiny_cnn(info: DatasetInfo) -> Classifier:
    net = nn.Sequential(
        nn.Conv2d(info.channels, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, info.num_classes),
    )
    return Classifier(net, info, "tiny_cnn", ["1"])


@CLASSIFIERS.register("small_cnn")
def small_cnn(info: DatasetInfo) -> Classifier:
    """Two 3x3 conv layers with max-pooling and two linear layers; works on any input of at least 4x4."""
    c = info.channels
    net = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(4), nn.Flatten(),
        nn.Linear(64 * 16, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, info.num_classes),
    )
    return Classifier(net, info, "small_cnn", ["1", "4", "9"])


@CLASSIFIERS.register("resnet18_cifar")
def resnet18_cifar(info: DatasetInfo) -> Classifier:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool)."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=info.num_classes)
    net.conv1 = nn.Conv2d(info.channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return Classifier(net, info, "resnet18_cifar", ["layer1", "layer2", "layer3"])


@CLASSIFIERS.register("resnet50")
def resnet50(info: DatasetInfo, weights: str | None = None) -> Classifier:
    """torchvision ResNet-50; `weights` is a local state_dict file (torchvision's IMAGENET1K weights file works)."""
    import torchvision

    net = torchvision.models.resnet50(num_classes=info.num_classes)
    if weights:
        state = load_checkpoint(weights, what="ResNet-50 weights file")
        state = state.get("state_dict", state)
        check_finite(state, "ResNet-50 weights file", weights)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights file '{weights}' does not fit ResNet-50 with {info.num_classes} "
                                  f"classes ({str(e).splitlines()[0]})") from None
    return Classifier(net, info, "resnet50", ["layer1", "layer2", "layer3"])


def build_classifier(arch: str, info: DatasetInfo, weights: str | None = None) -> Classifier:
    """C by name; `weights` only for architectures that load them (never silently ignored)."""
    builder = CLASSIFIERS.get(arch)
    if weights is None:
        return builder(info)
    takers = [n for n in CLASSIFIERS.names() if "weights" in inspect.signature(CLASSIFIERS.get(n)).parameters]
    if arch not in takers:
        raise ConfigError(f"classifier.weights={weights!r} is given but the '{arch}' classifier loads no weights; "
                          f"architectures that do: {', '.join(takers)}")
    return builder(info, weights=weights)


def save_classifier(model: Classifier, path: str | Path, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    return save_checkpoint({
        "format": FORMAT,
        "arch": model.arch,
        "info": {"name": model.info.name, "num_classes": model.info.num_classes, "channels": model.info.channels,
                 "image_size": list(model.info.image_size), "mean": list(model.info.mean),
                 "std": list(model.info.std)},
        "state_dict": model.state_dict(),
        "config": config,
        "metrics": metrics,
    }, path)


def classifier_from_state(ckpt: dict[str, Any], path: str = "<memory>") -> Classifier:
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an oodray classifier checkpoint (format {ckpt.get('format')!r})")
    i = ckpt["info"]
    info = DatasetInfo(i["name"], i["num_classes"], i["channels"], tuple(i["image_size"]), tuple(i["mean"]),
                       tuple(i["std"]))
    model = build_classifier(ckpt["arch"], info)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"classifier checkpoint '{path}' does not fit {ckpt['arch']} "
                              f"({str(e).splitlines()[0]})") from None
    return freeze(model)


def load_classifier(path: str | Path, expect_dataset: str | None = None, expect_arch: str | None = None,
                    ) -> tuple[Classifier, dict[str, Any]]:
    """Loads a frozen classifier; a checkpoint for another dataset/architecture is a `CheckpointError`."""
    ckpt = load_checkpoint(path, what="classifier checkpoint")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an oodray classifier checkpoint")
    if expect_dataset and ckpt["info"]["name"] != expect_dataset:
        raise CheckpointError(f"classifier checkpoint '{path}' is for dataset '{ckpt['info']['name']}', "
                              f"not '{expect_dataset}'")
    if expect_arch and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"classifier checkpoint '{path}' is a '{ckpt['arch']}', not '{expect_arch}'")
    check_finite(ckpt.get("state_dict") or {}, "classifier checkpoint", path)
    return classifier_from_state(ckpt, str(path)), ckpt
