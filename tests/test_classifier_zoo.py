"""torchvision classifiers by name: pretrained weights by name from torchvision's cache (never downloaded), weights
files, a new head when the class count differs, and one-line errors (exit 2, before Ray) for what cannot load."""

import pytest
import torch
from conftest import assert_one_line_error, forbid_ray, run_cli

from oodray.config import resolve_config
from oodray.data import DatasetInfo
from oodray.errors import CheckpointError, ConfigError
from oodray.models.classifier import (
    build_classifier,
    classifier_from_state,
    classifier_names,
    resolve_weights,
    save_classifier,
    weights_cache_file,
)

INFO10 = DatasetInfo("x", 10, 3, (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache (TORCH_HOME): nothing can be downloaded here, so files are placed by hand."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _place(arch: str, name: str, seed: int = 0) -> dict:
    """Writes a randomly initialised 1000-class state_dict where torchvision's cache keeps `arch`'s `name` file."""
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch).state_dict()
    f = weights_cache_file(resolve_weights(arch, name))
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, f)
    return state


def test_zoo_names_include_the_common_architectures_and_the_small_ones():
    names = classifier_names()
    assert {"resnet18", "resnet50", "convnext_tiny", "vit_b_16", "tiny_cnn", "small_cnn", "resnet18_cifar"} <= {*names}


def test_weights_by_name_load_from_the_cache_with_a_new_head(torch_home):
    state = _place("resnet18", "IMAGENET1K_V1")
    assert weights_cache_file(resolve_weights("resnet18", "IMAGENET1K_V1")).parent == torch_home / "hub" / "checkpoints"
    torch.manual_seed(5)
    m = build_classifier("resnet18", INFO10, "IMAGENET1K_V1")
    assert torch.equal(m.net.conv1.weight, state["conv1.weight"])  # the cached file's weights, not fresh ones
    assert torch.equal(m.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert m.net.fc.out_features == 10 and not torch.equal(m.net.fc.weight, state["fc.weight"][:10])
    assert m(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    torch.manual_seed(5)
    d = build_classifier("resnet18", INFO10, "DEFAULT")  # DEFAULT and the full enum name resolve to the same file
    f = build_classifier("resnet18", INFO10, "ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(d.net.conv1.weight, f.net.conv1.weight) and torch.equal(d.net.fc.weight, m.net.fc.weight)
    # 1000 classes: torchvision's head is kept as it is
    keep = build_classifier("resnet18", DatasetInfo("x", 1000, 3, (64, 64), (0.5,) * 3, (0.25,) * 3), "IMAGENET1K_V1")
    assert torch.equal(keep.net.fc.weight, state["fc.weight"])


def test_a_zoo_checkpoint_round_trips(tmp_path, torch_home):
    _place("resnet18", "IMAGENET1K_V1")
    m = build_classifier("resnet18", INFO10, "IMAGENET1K_V1").eval()
    save_classifier(m, tmp_path / "c.pt", {}, {})
    back = classifier_from_state(torch.load(tmp_path / "c.pt", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(m(x), back(x)) and back.feature_layers == ["layer1", "layer2", "layer3"]


def test_weights_file_with_another_class_count_gets_a_new_head(tmp_path):
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    m = build_classifier("resnet18", INFO10, str(tmp_path / "r18.pth"))
    assert torch.equal(m.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"]) and m.net.fc.out_features == 10
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="does not fit resnet18"):
        build_classifier("resnet18", INFO10, str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("arch, weights, needles", [
    ("resnet18", "IMAGENET1K_V2", ["not a weights name of 'resnet18'", "IMAGENET1K_V1, DEFAULT"]),
    ("resnet18", "ResNet50_Weights.IMAGENET1K_V2", ["are not weights of 'resnet18'"]),
    ("resnet50", "IMAGENET1K_V2", ["resnet50-11ad3fa6.pth", "is not in its cache", "hub/checkpoints",
                                   "nothing is downloaded"]),
    ("resnet18", "/no/such/file.pth", ["neither a torchvision weights name", "IMAGENET1K_V1"]),
    ("tiny_cnn", "IMAGENET1K_V1", ["loads no weights"]),
    ("resnet5O", None, ["unknown classifier architecture 'resnet5O'", "resnet50", "small_cnn"]),
])
def test_what_cannot_load_is_one_config_error(torch_home, arch, weights, needles):
    with pytest.raises(ConfigError) as e:
        build_classifier(arch, INFO10, weights)
    for n in needles:
        assert n in str(e.value) and "\n" not in str(e.value), (n, str(e.value))


def test_grayscale_data_is_refused_by_torchvision_models():
    with pytest.raises(ConfigError, match="3-channel"):
        build_classifier("resnet18", DatasetInfo("x", 10, 1, (28, 28), (0.5,), (0.25,)))


def test_random_untrained_zoo_classifier_is_refused(monkeypatch):
    from oodray.fixed_classifier import get_classifier

    forbid_ray(monkeypatch)
    cfg = resolve_config("synthetic", overrides=["classifier.arch=resnet18", "classifier.epochs=0"])
    with pytest.raises(ConfigError, match="random weights"):
        get_classifier(cfg)


@pytest.mark.parametrize("extra, needles", [
    (["--set", "classifier.weights=IMAGENET1K_V2", "--arch", "resnet50"], ["resnet50-11ad3fa6.pth", "TORCH_HOME"]),
    (["--set", "classifier.weights=NOPE", "--arch", "resnet50"], ["IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"]),
    (["--arch", "resnet5O"], ["unknown classifier architecture", "resnet50"]),
])
def test_cli_refuses_weights_it_cannot_load(torch_home, extra, needles):
    # imagenet without --data-dir would fail on the data: the classifier check comes first
    assert_one_line_error(run_cli("oodray.classifier", "--dataset", "imagenet", *extra), *needles)


def test_a_new_head_must_be_fine_tuned(tmp_path, torch_home, monkeypatch):
    """epochs=0 on weights with another class count would leave a random head: refused, naming both counts."""
    from PIL import Image

    from oodray.fixed_classifier import get_classifier

    forbid_ray(monkeypatch)
    for split in ("train", "val"):
        for k in range(3):
            (tmp_path / "data" / split / f"c{k}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (80 * k, 40 * i, 0)).save(tmp_path / "data" / split / f"c{k}" / f"{i}.png")
    _place("resnet18", "IMAGENET1K_V1")
    cfg = resolve_config("imagenet", overrides=[f"data.data_dir={tmp_path / 'data'}", "data.image_size=32",
                                                "classifier.arch=resnet18", "classifier.weights=IMAGENET1K_V1",
                                                f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="has 1000 classes and 'imagenet' has 3.*classifier.epochs > 0"):
        get_classifier(cfg)


def _image_folder(root, classes: int = 3, per_class: int = 8, size: int = 24) -> None:
    """train/ and val/ with class-dependent colours, as ImageFolder reads them."""
    from PIL import Image

    for split in ("train", "val"):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(per_class):
                colour = tuple(int(v) for v in ((k * 90 + i * 3) % 256, (255 - k * 90) % 256, i * 20 % 256))
                Image.new("RGB", (size, size), colour).save(root / split / f"c{k}" / f"{i}.png")


def test_fine_tuning_through_ray_train(tmp_path, torch_home):
    """`oodray.classifier --workers 2`: a pretrained ResNet-18 (weights by name) gets a new 3-class head and is
    fine-tuned by two Ray Train (DDP) workers; the cached C holds the trained weights and the workers' metrics."""
    import json

    state = _place("resnet18", "IMAGENET1K_V1")
    _image_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    proc = run_cli("oodray.classifier", "--dataset", "imagenet", "--data-dir", str(tmp_path / "data"),
                   "--arch", "resnet18", "--set", "classifier.weights=IMAGENET1K_V1", "--epochs", "2",
                   "--workers", "2", "--set", "classifier.cpus_per_worker=0.5", "--set", "classifier.batch_size=8",
                   "--set", "data.image_size=16", "--set", "data.val_fraction=0.25", "--cache-dir", str(cache),
                   "--set", f"storage={tmp_path / 'runs'}", "--set", "eval.threat_models=[oblivious]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clean test accuracy" in proc.stdout
    (cdir,) = (cache / "classifiers").iterdir()
    metrics = json.loads((cdir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["test_examples"] == 24 and 0 <= metrics["test_accuracy"] <= 1
    saved = torch.load(cdir / "classifier.pt", weights_only=True)
    assert saved["state_dict"]["net.fc.weight"].shape == (3, 512)
    assert not torch.equal(saved["state_dict"]["net.conv1.weight"], state["conv1.weight"])  # fine-tuned, not frozen
    assert any(p.name.startswith("classifier-") for p in (tmp_path / "runs").iterdir())  # the Ray Train run
