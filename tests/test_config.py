import json
from pathlib import Path

import pytest

from oodray.config import LOSS_TERMS, ExperimentConfig, parse_override, resolve_config, save_config
from oodray.errors import ConfigError


def test_round_trip_through_plain_dict():
    cfg = resolve_config("digits", overrides=["train.lr=3e-4", "attack.attacks=[pgd, fgsm]"])
    again = ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.attack.attacks == ("pgd", "fgsm") and again.train.lr == 3e-4


def test_resolution_order_preset_yaml_override(tmp_path):
    y = tmp_path / "x.yaml"
    y.write_text("train:\n  lr: 0.002\n  epochs: 7\nattack:\n  eps: 0.15\n")
    cfg = resolve_config("digits", y, ["train.epochs=9"])
    assert cfg.classifier.arch == "small_cnn"  # preset
    assert cfg.attack.eps == 0.15 and cfg.train.lr == 0.002  # YAML over preset
    assert cfg.train.epochs == 9  # override over YAML
    assert resolve_config("fashion-mnist").attack.eps == 0.1


def test_saved_config_is_the_resolved_one(tmp_path):
    cfg = resolve_config("synthetic", overrides=["loss.ce=0.5"])
    path = save_config(cfg, tmp_path)
    assert ExperimentConfig.from_dict(json.loads(path.read_text())) == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lrr"),
    ("nosection.x=1", "nosection"),
    ("train.lr=abc", "train.lr"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.amp=3", "train.amp"),
    ("attack.eps=0", "attack.eps"),
    ("attack.eps=1.5", "attack.eps"),
    ("attack.norm=L3", "L3"),
    ("loss.pixel=-1", "loss.pixel"),
    ("translator.norm=group", "group"),
    ("train.regime=sometimes", "sometimes"),
    ("attack.attacks=[cw]", "cw"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config("digits", overrides=[override])


def test_unknown_dataset_lists_known():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*digits"):
        resolve_config("nope")


def test_all_zero_loss_is_refused():
    zeros = [f"loss.{k}=0" for k in LOSS_TERMS]
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        resolve_config("digits", overrides=zeros)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config("digits", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config("digits", tmp_path / "missing.yaml")
    typed = tmp_path / "typed.yaml"
    typed.write_text("train:\n  workers: two\n")
    with pytest.raises(ConfigError, match="train.workers"):
        resolve_config("digits", typed)


def test_parse_override():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_fashion_mnist_yaml_resolves_to_the_preset():
    """experiments/fashion-mnist.yaml restates the threat model; `--dataset fashion-mnist` must run the same thing."""
    yaml_path = Path(__file__).resolve().parents[1] / "experiments" / "fashion-mnist.yaml"
    assert resolve_config(yaml_path=yaml_path) == resolve_config("fashion-mnist")
