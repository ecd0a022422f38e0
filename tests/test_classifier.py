import json
import pickle

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from oodray.classifier import classifier_path, get_classifier, split_accuracy
from oodray.config import resolve_config
from oodray.data import load_dataset
from oodray.errors import CheckpointError
from oodray.models.classifier import CLASSIFIERS, build_classifier, load_classifier


def test_digits_classifier_trains_caches_and_reloads():
    cfg = resolve_config("digits")
    splits = load_dataset(cfg.data)
    model, path = get_classifier(cfg, splits)
    acc = split_accuracy(model, splits.test)
    assert acc >= 0.95, acc
    assert path == classifier_path(cfg) and (path.parent / "config.json").exists()
    again, _ = get_classifier(cfg)  # from cache: identical weights
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert all(not p.requires_grad for p in again.parameters()) and not again.training


@pytest.mark.parametrize("arch", CLASSIFIERS.names())
def test_every_classifier_takes_its_inputs(arch):
    from oodray.data import DatasetInfo

    size, ch = {"resnet50": (64, 3), "resnet18_cifar": (32, 3)}.get(arch, (28, 1))
    info = DatasetInfo("x", 10, ch, (size, size), (0.5,) * ch, (0.25,) * ch)
    m = build_classifier(arch, info).eval()
    out = m(torch.rand(2, ch, size, size))
    assert out.shape == (2, 10)
    feats = m.features(torch.rand(2, ch, size, size))
    assert len(feats) == len(m.feature_layers) and all(f.ndim in (2, 4) and f.shape[0] == 2 for f in feats)


def test_mismatched_and_corrupt_checkpoints(tmp_path):
    cfg = resolve_config("synthetic")
    _, path = get_classifier(cfg)
    with pytest.raises(CheckpointError, match="for dataset 'synthetic', not 'digits'"):
        load_classifier(path, expect_dataset="digits")
    with pytest.raises(CheckpointError, match="is a 'tiny_cnn', not 'small_cnn'"):
        load_classifier(path, expect_arch="small_cnn")
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_classifier(bad)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/oodray-pwned",))


def test_pickle_carrying_code_is_refused_without_running(tmp_path):
    import os

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "oodray.classifier/1", "x": _Boom()}))
    if os.path.exists("/tmp/oodray-pwned"):
        os.remove("/tmp/oodray-pwned")
    with pytest.raises(CheckpointError, match="refused to unpickle|corrupt"):
        load_classifier(evil)
    assert not os.path.exists("/tmp/oodray-pwned")


def test_cli_trains_synthetic_and_reports_accuracy():
    proc = run_cli("oodray.classifier", "--dataset", "synthetic")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean test accuracy" in proc.stdout and "classifier:" in proc.stdout


@pytest.mark.parametrize("args, needles", [
    (["--dataset", "nope"], ["unknown dataset 'nope'", "digits"]),
    (["--dataset", "synthetic", "--arch", "vgg"], ["unknown classifier architecture 'vgg'", "small_cnn"]),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], ["/nonexistent/dir"]),
    (["--dataset", "mnist"], ["mnist not found"]),
    (["--dataset", "cifar10", "--data-dir", "/tmp"], ["cifar10 not found"]),
    (["--dataset", "synthetic", "--set", "classifier.lr=-1"], ["classifier.lr"]),
    (["--dataset", "synthetic", "--adversarial", "pgd", "--eps", "2"], ["eps"]),
    (["--dataset", "imagenet", "--set", "classifier.weights=null", "--epochs", "1"], ["imagenet needs --data-dir"]),
])
def test_cli_bad_inputs_exit_2(args, needles):
    assert_one_line_error(run_cli("oodray.classifier", *args), *needles)


def test_cli_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # unwritable even for root
    proc = run_cli("oodray.classifier", "--dataset", "synthetic", "--seed", "7", "--cache-dir", str(blocker / "c"))
    assert_one_line_error(proc, "not writable", str(blocker))


def test_interrupted_classifier_training_resumes_to_the_same_weights(monkeypatch, tmp_path):
    """An in-process (adversarial) training killed after an epoch resumes from that epoch and ends with exactly the
    weights and compute of an uninterrupted run; a corrupt progress file is a one-line error naming it."""
    import oodray.fixed_classifier as fc

    over = ["classifier.epochs=3", "classifier.adversarial=pgd", "classifier.adv_steps=2", "classifier.seed=5"]
    whole, whole_path = get_classifier(resolve_config("synthetic", overrides=[*over, f"cache_dir={tmp_path / 'a'}"]))
    cfg = resolve_config("synthetic", overrides=[*over, f"cache_dir={tmp_path / 'b'}"])
    progress = classifier_path(cfg).parent / fc.PROGRESS
    real_save = fc.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # as a kill right after the first epoch's state is written

    monkeypatch.setattr(fc, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        get_classifier(cfg)
    monkeypatch.setattr(fc, "save_checkpoint", real_save)
    assert progress.exists() and not classifier_path(cfg).exists()
    resumed, path = get_classifier(cfg)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not progress.exists()  # removed once the classifier is saved
    m0, m1 = (json.loads((p.parent / "metrics.json").read_text()) for p in (whole_path, path))
    assert m1["compute_examples"] == m0["compute_examples"] > 0  # the first epoch counted once, not lost or twice
    assert m1["compute_passes"] == m0["compute_passes"] == 3 * m0["compute_examples"]  # PGD-2: 3 passes each

    path.unlink()
    progress.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"training '.*{progress.name}'.*start this training over"):
        get_classifier(cfg)
    proc = run_cli("oodray.classifier", "--dataset", "synthetic", "--epochs", "3", "--adversarial", "pgd",
                   "--set", "classifier.adv_steps=2", "--seed", "5", "--cache-dir", str(tmp_path / "b"))
    assert_one_line_error(proc, str(progress), "delete it")
