"""bf16 autocast (GPU only) leaves CPU results bit-identical; channels_last (CPU and GPU) changes only rounding; the
transfer surrogate is never C itself."""

import copy

import pytest
import torch

from oodray.config import resolve_config
from oodray.data import load_dataset, stack
from oodray.errors import ConfigError
from oodray.evaluate.tasks import _models
from oodray.fixed_classifier import get_classifier, surrogate_config
from oodray.io import load_checkpoint
from oodray.losses import TranslatorObjective
from oodray.models.translator import build_translator
from oodray.runtime import amp_autocast, fast_layout, use_channels_last
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
    if layout:
        classifier, translator = fast_layout(classifier, True), fast_layout(translator, True)
        assert translator.training  # the layout keeps the mode
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


def test_amp_leaves_cpu_training_bit_identical():
    base_terms, base_state = _steps(use_amp=False, layout=False)
    terms, state = _steps(use_amp=True, layout=False)
    assert terms == base_terms
    assert all(torch.equal(base_state[k], state[k]) for k in base_state)


def test_channels_last_changes_only_rounding():
    base_terms, _ = _steps(use_amp=False, layout=False)
    terms, state = _steps(use_amp=False, layout=True)
    # the first step sees the same inputs: equal up to rounding (later steps drift apart, as any rounding change
    # does once PGD's sign steps and Adam amplify it)
    assert terms[0].keys() == base_terms[0].keys()
    assert all(terms[0][k] == pytest.approx(base_terms[0][k], rel=1e-5, abs=1e-7) for k in terms[0])
    conv_weights = [k for k, v in state.items() if v.dim() == 4]
    assert conv_weights and all(state[k].is_contiguous(memory_format=torch.channels_last) for k in conv_weights)
    # one objective and its gradient, from the same weights and inputs, in both layouts
    cfg = resolve_config("synthetic", overrides=["translator.arch=unet", "translator.depth=1", "translator.width=8"])
    splits = load_dataset(cfg.data)
    classifier, _ = get_classifier(cfg, splits)
    torch.manual_seed(0)
    translator = build_translator(cfg.translator, 1, (8, 8))
    x, y = stack(splits.train, range(32))
    grads = []
    for layout in (False, True):
        c, t = fast_layout(copy.deepcopy(classifier), layout), fast_layout(copy.deepcopy(translator), layout)
        loss = TranslatorObjective(cfg.loss, c, None)(t, x, (x + 0.05).clamp(0, 1), y)[0]
        grads.append(torch.autograd.grad(loss, list(t.parameters())))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(*grads))  # BN-cancelled biases: ~0


def test_layout_and_autocast_helpers():
    conv = torch.nn.Conv2d(3, 4, 3)
    assert fast_layout(conv, False).weight.is_contiguous()
    assert fast_layout(conv, True).weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast_layout(torch.nn.Conv2d(3, 4, 3), True).weight.is_contiguous()  # really converted
    with amp_autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
        assert (conv(torch.rand(1, 3, 8, 8))).dtype == torch.float32


def test_the_default_layout_follows_the_device_and_the_image_size():
    """`train.channels_last: null` (the default): channels_last on CUDA, and on CPU up to 64 px, where it measured
    faster; NCHW for larger images on CPU (the imagenet preset at 112 and 224 px was slower in channels_last)."""
    assert resolve_config("synthetic").train.channels_last is None
    assert use_channels_last(None, "cpu", (28, 28)) and use_channels_last(None, "cpu", (64, 64))
    assert not use_channels_last(None, "cpu", (112, 112)) and not use_channels_last(None, "cpu", torch.Size([224, 224]))
    assert use_channels_last(None, "cuda", (224, 224)) and use_channels_last(None, torch.device("cuda", 1), (224, 224))
    assert use_channels_last(True, "cpu", (224, 224)) and not use_channels_last(False, "cuda", (8, 8))  # as set
    # an evaluation task applies it to C and C(T) (and reports it, for the transfer surrogate)
    cfg = resolve_config("synthetic")
    _, path = get_classifier(cfg, load_dataset(cfg.data))
    state = load_checkpoint(path, what="classifier checkpoint")
    for size, setting, expected in (((8, 8), None, True), ((224, 224), None, False), ((224, 224), True, True)):
        _, defended, layout = _models(cfg.replace(**{"train.channels_last": setting}), state, None,
                                      torch.device("cpu"), size)
        convs = [m.weight for m in defended.modules()  # those whose two layouts differ: > 1 input channel, k > 1
                 if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight.shape[2:].numel() > 1]
        assert layout == expected and convs
        assert all(w.is_contiguous(memory_format=torch.channels_last) == expected for w in convs)


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


def test_the_layout_leaves_run_names_alone():
    """A run started before `train.channels_last` existed (or with the other layout) resumes under its own name."""
    from oodray.config import config_hash

    cfg = resolve_config("digits")
    assert config_hash(cfg) == "05e2289b21"  # digits' defaults, hashed by the code before the key existed
    assert config_hash(cfg.replace(**{"train.channels_last": False})) == config_hash(cfg)
    assert config_hash(cfg.replace(**{"train.amp": False})) != config_hash(cfg)  # amp still names a run
    with pytest.raises(ConfigError, match="train.channels_last"):
        cfg.replace(**{"train.channels_last": "sometimes"})


def test_the_console_level_leaves_run_names_alone():
    """`train.ray_log_level` only changes what the console shows: a run resumes under its name at any level."""
    from oodray.config import config_hash

    cfg = resolve_config("digits")
    assert cfg.train.ray_log_level == "WARNING"
    assert config_hash(cfg.replace(**{"train.ray_log_level": "INFO"})) == config_hash(cfg) == "05e2289b21"


def test_ray_train_logging_on_a_ray_with_and_without_its_logging_config(monkeypatch):
    """Ray Train's LoggingConfig is alpha in Ray 2.60 and absent from older Rays that oodray accepts (>= 2.50): the
    RunConfig then gets no logging argument rather than one it would refuse."""
    import ray.train

    from oodray.runtime import train_logging

    got = train_logging("ERROR")
    assert list(got) == ["logging_config"] and got["logging_config"].log_level == "ERROR"
    monkeypatch.delattr(ray.train, "LoggingConfig")
    assert train_logging("ERROR") == {}
