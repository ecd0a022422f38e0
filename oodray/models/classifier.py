"""Fixed classifiers by name, with normalisation folded in so every input, eps and clip lives in [0,1] pixels.

Registered: `tiny_cnn` (tests), `small_cnn` (digits, MNIST-likes), `resnet18_cifar` (CIFAR-10); and every
classification model of torchvision's zoo by name (`resnet18`, `resnet50`, ...), with torchvision's pretrained
weights by name (`IMAGENET1K_V2`, read from torchvision's cache under TORCH_HOME, never downloaded) or from a
file. A classifier checkpoint holds the weights, the architecture and dataset metadata and the resolved config,
and is loaded as data (`weights_only=True`).

torchvision is imported by the architectures that need it (heavy import).
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
        self.new_head = 0  # zoo_classifier: the weights' class count when a fresh head replaced theirs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Intermediate activations at `feature_layers` (one forward pass with hooks)."""
        return self.logits_and_features(x)[1]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and the activations at `feature_layers` of one forward pass, for a loss that needs both."""
        modules = dict(self.net.named_modules())
        out: list[torch.Tensor] = []
        handles = [modules[n].register_forward_hook(lambda _m, _i, o: out.append(o)) for n in self.feature_layers]
        try:
            logits = self.net(self.normalize(x))
        finally:
            for h in handles:
                h.remove()
        return logits, out


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


# --- the torchvision zoo ----------------------------------------------------------------------------------------
# Every classification model of `torchvision.models` by its name (resnet18, resnet50, convnext_tiny, vit_b_16, ...),
# optionally with torchvision's pretrained weights by name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) or from a local
# state_dict file. Left out: the two whose training-mode forward returns auxiliary outputs and whose pretrained build
# changes input handling that a checkpoint cannot record (inception_v3, googlenet).
ZOO_EXCLUDED = ("googlenet", "inception_v3")
WEIGHT_NAME = re.compile(r"^(?:[A-Za-z0-9]+_Weights\.)?[A-Z0-9_]+$")  # IMAGENET1K_V2 or ResNet50_Weights.IMAGENET1K_V2


@functools.lru_cache(maxsize=1)
def zoo_names() -> tuple[str, ...]:
    """torchvision's classification architectures that oodray builds by name."""
    import torchvision

    return tuple(n for n in torchvision.models.list_models(module=torchvision.models) if n not in ZOO_EXCLUDED)


def classifier_names() -> list[str]:
    """Every accepted `classifier.arch`: oodray's small registered architectures, then torchvision's zoo."""
    return [*CLASSIFIERS.names(), *zoo_names()]


def check_arch(arch: str) -> None:
    """A one-line `ConfigError` listing what is accepted when `arch` is neither registered nor in the zoo."""
    if arch not in CLASSIFIERS and arch not in zoo_names():
        raise ConfigError(f"unknown classifier architecture '{arch}'; known: {', '.join(CLASSIFIERS.names())}, or a "
                          f"torchvision model: {', '.join(zoo_names())}")


def is_weights_name(weights: str) -> bool:
    """True for a torchvision weights name (IMAGENET1K_V2, DEFAULT, ResNet50_Weights.IMAGENET1K_V2), False for a
    path. A file of that name in the working directory is a path."""
    return bool(WEIGHT_NAME.match(weights)) and not Path(weights).expanduser().exists()


def resolve_weights(arch: str, name: str) -> Any:
    """torchvision's `WeightsEnum` member for `arch` called `name`; an unknown name lists the accepted ones."""
    from torchvision.models import get_model_weights, get_weight

    enum = get_model_weights(arch)
    accepted = [*enum.__members__]
    short = name.rsplit(".", 1)[-1]
    if "." in name:
        try:
            w = get_weight(name)
        except (ValueError, KeyError, AttributeError):
            w = None
        if w is None or type(w) is not enum:
            raise ConfigError(f"classifier.weights={name!r} are not weights of '{arch}'; accepted: "
                              f"{', '.join(accepted)} ({enum.__name__}), or a local weights file")
        return w
    if short not in enum.__members__:
        raise ConfigError(f"classifier.weights={name!r} is not a weights name of '{arch}'; accepted: "
                          f"{', '.join(accepted)}, or a local weights file")
    return enum[short]


def weights_cache_file(weights: Any) -> Path:
    """Where torchvision's `load_state_dict_from_url` keeps `weights`' file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def check_weights(arch: str, weights: str | None) -> None:
    """Refuses, before any work, weights that cannot be loaded: a name unknown for `arch`, a name whose file is not in
    torchvision's cache (nothing is downloaded), weights for an architecture that loads none, or a missing file."""
    if weights is None:
        return
    if arch in CLASSIFIERS:
        takers = [n for n in CLASSIFIERS.names() if "weights" in inspect.signature(CLASSIFIERS.get(n)).parameters]
        raise ConfigError(f"classifier.weights={weights!r} is given but the '{arch}' classifier loads no weights; "
                          f"architectures that do: {', '.join(takers) or 'none registered'}, and every "
                          "torchvision model (e.g. resnet18, resnet50)")
    if is_weights_name(weights):
        w = resolve_weights(arch, weights)
        f = weights_cache_file(w)
        if not f.is_file():
            raise ConfigError(f"classifier.weights={weights}: torchvision's file '{f.name}' is not in its cache "
                              f"'{f.parent}' and nothing is downloaded here; place it there (from {w.url}, checked by "
                              "its sha256 prefix in the name) or set TORCH_HOME to a directory holding "
                              "hub/checkpoints/" + f.name)
    elif not Path(weights).expanduser().is_file():
        from torchvision.models import get_model_weights

        raise ConfigError(f"classifier.weights={weights!r} is neither a torchvision weights name of '{arch}' "
                          f"({', '.join(get_model_weights(arch).__members__)}) nor an existing file")


def _feature_layers(arch: str, net: nn.Module) -> list[str]:
    """Three module names at ~1/4, 1/2 and 3/4 depth, for the perceptual loss and the OOD gate."""
    names = {n for n, _ in net.named_modules()}
    for group in (["layer1", "layer2", "layer3"], ["trunk_output.block1", "trunk_output.block2",
                                                   "trunk_output.block3"], ["stage2", "stage3", "stage4"]):
        if all(n in names for n in group):
            return group
    for seq in ("features", "encoder.layers", "blocks"):  # vgg/mobilenet/efficientnet/convnext/swin, vit, maxvit
        mod = dict(net.named_modules()).get(seq)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 3:
            kids = [n for n, _ in mod.named_children()]
            return [f"{seq}.{kids[i]}" for i in sorted({len(kids) // 4, len(kids) // 2, 3 * len(kids) // 4})]
    raise ConfigError(f"classifier architecture '{arch}': no feature layers found for the perceptual loss")


def _head(net: nn.Module) -> tuple[str, nn.Module]:
    """The classification head: the last Linear (a 1x1 Conv2d for SqueezeNet)."""
    mods = list(net.named_modules())
    for kind in (nn.Linear, nn.Conv2d):
        found = [(n, m) for n, m in mods if isinstance(m, kind)]
        if found and (kind is nn.Linear or "classifier" in found[-1][0]):
            return found[-1]
    raise ConfigError("no classification head found")  # every zoo model has one; kept as a guard


def _new_head(net: nn.Module, num_classes: int) -> nn.Module:
    """Replaces the head by a freshly initialised one with `num_classes` outputs (seeded by the caller's RNG)."""
    name, old = _head(net)
    new: nn.Module = (nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
                      if isinstance(old, nn.Linear) else nn.Conv2d(old.in_channels, num_classes, old.kernel_size))
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], new)
    return net


def zoo_classifier(arch: str, info: DatasetInfo, weights: str | None = None) -> Classifier:
    """A torchvision model by name. With pretrained weights (a torchvision name or a file), the net is built at the
    weights' class count, loaded, and given a new head when the dataset has another number of classes."""
    import torchvision

    if info.channels != 3:
        raise ConfigError(f"classifier '{arch}' (torchvision) takes 3-channel images; dataset '{info.name}' has "
                          f"{info.channels}: use small_cnn, or a 3-channel dataset")
    check_weights(arch, weights)
    if weights is None:
        net = torchvision.models.get_model(arch, num_classes=info.num_classes)
    elif is_weights_name(weights):
        w = resolve_weights(arch, weights)
        try:
            net = torchvision.models.get_model(arch, weights=w, progress=False)  # from the cache checked above
        except Exception as e:  # noqa: BLE001 - a damaged cached file surfaces as many exception types
            raise CheckpointError(f"torchvision's cached weights '{weights_cache_file(w)}' for {arch} cannot be "
                                  f"loaded ({str(e).strip().splitlines()[0][:160] if str(e).strip() else e!r}); "
                                  "delete the file and place a good copy") from None
        check_finite(net.state_dict(), f"torchvision's cached {w} weights", weights_cache_file(w))
    else:
        state = load_checkpoint(weights, what=f"{arch} weights file")
        state = state.get("state_dict", state)
        check_finite(state, f"{arch} weights file", weights)
        head, _ = _head(torchvision.models.get_model(arch, num_classes=info.num_classes))
        n = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else info.num_classes
        net = torchvision.models.get_model(arch, num_classes=int(n))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights file '{weights}' does not fit {arch} "
                                  f"({str(e).strip().splitlines()[0][:160]})") from None
    pretrained_classes = _head(net)[1].weight.shape[0]
    if pretrained_classes != info.num_classes:
        net = _new_head(net, info.num_classes)
    model = Classifier(net, info, arch, _feature_layers(arch, net))
    if weights is not None and pretrained_classes != info.num_classes:
        model.new_head = pretrained_classes  # a random head on pretrained weights: meaningful once fine-tuned
    return model


def build_classifier(arch: str, info: DatasetInfo, weights: str | None = None) -> Classifier:
    """C by name: oodray's registered architectures, else torchvision's zoo; `weights` only for architectures that
    load them (never silently ignored)."""
    check_arch(arch)
    if arch not in CLASSIFIERS:
        return zoo_classifier(arch, info, weights)
    check_weights(arch, weights)
    return CLASSIFIERS.get(arch)(info)


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
