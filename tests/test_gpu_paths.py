"""GPU-only code paths (bf16 autocast, channels_last) leave CPU results bit-identical; the transfer surrogate is never
C itself."""

import copy

import pytest
import torch

from oodray.config import resolve_config
from oodray.data import load_dataset, stack
from oodray.errors import ConfigError
from oodray.fixed_classifier import get_classifier, surrogate_config
from oodray.losses import TranslatorObjective
from oodray.models.translator import build_translator
from oodray.runtime import amp_autocast, fast_layout
from oodray.train import train_step


def _steps(use_amp: bool, layout: bool) -> tuple[list[dict], dict]:
    """Three train steps of a tiny translator on synthetic data, from the same seed, in the regime asked for."""
    cfg = resolve_config("synthetic", overrides=["translator.arch=unet", "translator.depth=1", "translator.width=8",
                                                 "attack.steps=2", "train.regime=adaptive"])
    splits = load_dataset(cfg.data)
    classifier, _ = get_classifier(cfg, splits)
    classifier = copy.deepcopy(classifier)
    torch.manual_seed(0)
    translator = build_translator(cfg.translator, 1, (8, 8))
    cpu = torch.device("cpu")
    if layout:
        classifier, translator = fast_layout(classifier, cpu), fast_layout(translator, cpu)
    opt = torch.optim.Adam(translator.parameters(), lr=1e-2)
    objective = TranslatorObjective(cfg.loss, classifier, None)
    x, y = stack(splits.train, range(32))
    g = torch.Generator().manual_seed(3)
    terms = []
    for _ in range(3):
        terms.append(train_step(cfg, translator, classifier, None, objective, (opt, None), None, (x, x, y), g,
                                use_amp))
    if use_amp:  # the comparison can see a precision change: bf16 autocast really applied on CPU moves the loss
        probe = copy.deepcopy(translator)  # its BatchNorm statistics move with every forward in train mode
        with torch.no_grad():
            full = objective(probe, x, x, y)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = objective(probe, x, x, y)[0]
        assert float(full) != float(half)
    return terms, translator.state_dict()


def test_amp_and_channels_last_leave_cpu_training_bit_identical():
    base_terms, base_state = _steps(use_amp=False, layout=False)
    terms, state = _steps(use_amp=True, layout=True)
    assert terms == base_terms
    assert all(torch.equal(base_state[k], state[k]) for k in base_state)


def test_gpu_helpers_are_no_ops_on_cpu():
    conv = torch.nn.Conv2d(3, 4, 3)
    assert fast_layout(conv, torch.device("cpu")).weight.is_contiguous()
    with amp_autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
        assert (conv(torch.rand(1, 3, 8, 8))).dtype == torch.float32


def test_the_transfer_surrogate_is_another_model():
    cfg = resolve_config("synthetic")
    s = surrogate_config(cfg)
    assert s.classifier.seed == cfg.classifier.seed + 1 and s.classifier.arch == cfg.classifier.arch
    # untrained random weights are drawn from the seed: a different surrogate, accepted
    assert surrogate_config(cfg.replace(**{"classifier.epochs": 0})).classifier.seed == 1
    pretrained = resolve_config("imagenet", overrides=["eval.surrogate_arch=null", "eval.surrogate_weights=null"])
    assert pretrained.classifier.epochs == 0 and pretrained.classifier.weights == "IMAGENET1K_V2"
    with pytest.raises(ConfigError, match="surrogate would be C itself.*eval.surrogate_arch"):
        surrogate_config(pretrained)
    other = surrogate_config(resolve_config("imagenet"))  # the preset names torchvision's ResNet-18
    assert (other.classifier.arch, other.classifier.weights) == ("resnet18", "IMAGENET1K_V1")
    tuned = surrogate_config(pretrained.replace(**{"classifier.epochs": 2}))  # fine-tuned from another seed
    assert tuned.classifier.seed == 1 and tuned.classifier.arch == "resnet50"
