"""Every value is validated once, before Ray starts: one bad value per config key, and one per CLI flag that the config
does not cover, each refused with one line naming it (exit 2) while any start of Ray would fail the test."""

from __future__ import annotations

import importlib
import json

import pytest
from conftest import forbid_ray

from oodray.cli import run
from oodray.config import ExperimentConfig, flatten, resolve_config
from oodray.errors import ConfigError

# key -> (a bad value as the YAML text of `--set key=...`, a word the error must hold besides the key)
BAD_VALUES: dict[str, tuple[str, str]] = {
    "data.name": ("svhn", "unknown dataset"),
    "data.download": ("maybe", "true or false"),
    "data.image_size": ("0", "> 0"),
    "data.val_fraction": ("0.7", "(0, 0.5)"),
    "data.seed": ("-1", ">= 0"),
    "data.loader_workers": ("-1", ">= 0"),
    "data.prefetch_factor": ("0", "> 0"),
    "data.pin_memory": ("sometimes", "true or false"),
    "data.persistent_workers": ("3", "true or false"),
    "classifier.epochs": ("-1", ">= 0"),
    "classifier.lr": ("0", "> 0"),
    "classifier.batch_size": ("0", "> 0"),
    "classifier.weight_decay": ("-0.1", ">= 0"),
    "classifier.adversarial": ("fgsm", "none, pgd, trades"),
    "classifier.adv_eps": ("2.0", "out of range"),
    "classifier.adv_steps": ("0", "> 0"),
    "classifier.trades_beta": ("-1", ">= 0"),
    "classifier.seed": ("-3", ">= 0"),
    "translator.depth": ("0", "> 0"),
    "translator.width": ("0", "> 0"),
    "translator.norm": ("layer", "batch, instance, none"),
    "translator.dropout": ("1.5", "[0, 1)"),
    "translator.blocks": ("0", "> 0"),
    "translator.downsamplings": ("-1", ">= 0"),
    "translator.residual": ("sometimes", "true or false"),
    "translator.gate": ("3", "true or false"),
    "translator.gate_percentile": ("20", "[50, 100)"),
    "loss.pixel": ("-1", ">= 0"),
    "loss.pixel_kind": ("l3", "l1, l2"),
    "loss.consistency": ("-1", ">= 0"),
    "loss.ce": ("-1", ">= 0"),
    "loss.feature": ("-1", ">= 0"),
    "loss.identity": ("-1", ">= 0"),
    "loss.clean_consistency": ("-1", ">= 0"),
    "loss.trades": ("-1", ">= 0"),
    "loss.gan": ("-1", ">= 0"),
    "attack.norm": ("L1", "Linf, L2"),
    "attack.eps": ("0", "out of range"),
    "attack.attacks": ("[cw]", "pgd, fgsm, apgd-ce"),
    "attack.eps_mix": ("[2.0]", "out of range"),
    "attack.steps": ("0", "> 0"),
    "attack.shift_fraction": ("1.5", "[0, 1]"),
    "train.epochs": ("0", "> 0"),
    "classifier.workers": ("-1", ">= 0"),
    "classifier.gpus_per_worker": ("-1", ">= 0"),
    "classifier.cpus_per_worker": ("0", "> 0"),
    "train.lr": ("-1", "> 0"),
    "train.lr_schedule": ("step", "constant, cosine"),
    "train.batch_size": ("0", "> 0"),
    "train.regime": ("online", "oblivious, adaptive"),
    "train.workers": ("0", "> 0"),
    "train.gpus_per_worker": ("-1", ">= 0"),
    "train.cpus_per_worker": ("0", "> 0"),
    "train.seed": ("-1", ">= 0"),
    "train.proxy_examples": ("0", "> 0"),
    "train.proxy_steps": ("0", "> 0"),
    "train.max_failures": ("-1", ">= 0"),
    "train.amp": ("often", "true or false"),
    "train.channels_last": ("sometimes", "true or false"),
    "train.max_batches": ("-1", "> 0"),
    "train.ray_log_level": ("LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    "cache.batch_size": ("0", "> 0"),
    "cache.shards_per_task": ("0", "> 0"),
    "cache.gpus_per_task": ("-1", ">= 0"),
    "cache.cpus_per_task": ("0", "> 0"),
    "eval.threat_models": ("[blackbox]", "oblivious, adaptive, transfer"),
    "eval.norms": ("[L1]", "Linf, L2"),
    "eval.eps": ("[5.0]", "out of range"),
    "eval.n_examples": ("0", "> 0"),
    "eval.version": ("fast", "standard, plus, rand"),
    "eval.shards": ("0", "> 0"),
    "eval.gpus_per_task": ("-1", ">= 0"),
    "eval.cpus_per_task": ("-1", "> 0"),
    "eval.batch_size": ("0", "> 0"),
    "eval.shifts": ("some", "true or false"),
    "eval.seed": ("-2", ">= 0"),
    "tune.num_samples": ("0", "> 0"),
    "tune.objective": ("fastest", "robust, pareto"),
    "tune.max_concurrent": ("0", "> 0"),
    "tune.final_top_k": ("-1", ">= 0"),
    "tune.scheduler": ("pbt", "asha, hyperband, bohb, fifo"),
    "tune.reduction_factor": ("1", ">= 2"),
    "tune.refit_epochs": ("0", "> 0"),
    "tune.grace_period": ("0", "> 0"),
    "tune.min_clean_accuracy_drop": ("2", "[0, 1]"),
}

# Keys whose values the config cannot judge alone (a path, a name resolved by a registry or a file system): their bad
# values are refused by the CLI before Ray starts, in CLI_ROWS below.
CHECKED_BY_THE_CLI = {"name": "name-escapes", "storage": "storage-is-a-file", "cache_dir": "cache-dir-is-a-file",
                      "data.data_dir": "data-dir-empty", "classifier.arch": "classifier-arch",
                      "classifier.weights": "weights-ignored", "translator.arch": "translator-arch",
                      "tune.space": "space-value", "tune.refit_match": "refit-match-missing",
                      "eval.surrogate_arch": "surrogate-arch", "eval.surrogate_weights": "surrogate-weights"}


def test_every_config_key_has_a_bad_value():
    keys = set(flatten(ExperimentConfig().to_dict())) | {"tune.space"}
    assert keys == set(BAD_VALUES) | set(CHECKED_BY_THE_CLI)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_config_value_is_one_line_naming_the_key(key):
    value, word = BAD_VALUES[key]
    with pytest.raises(ConfigError) as err:
        resolve_config("synthetic", overrides=[f"{key}={value}"])
    message = str(err.value)
    assert "\n" not in message
    assert key.split(".")[-1] in message or value in message, message  # names the key, or the bad value itself
    assert word in message, message


def _cli_rows(tmp):
    """(id, cli, argv, words of the error line)."""
    a_file = tmp / "a-file"
    a_file.write_text("x")
    (tmp / "empty").mkdir()
    syn = ["--dataset", "synthetic"]
    store = ["--storage", str(tmp / "s")]
    ev = ["--translator", "identity", "--threat-models", "oblivious", "--out", str(tmp / "o")]
    return [
        ("name-escapes", "train", [*syn, *store, "--name", "../up"], ["'../up'", "relative path"]),
        ("storage-is-a-file", "tune", [*syn, "--storage", str(a_file / "s")], ["not writable", "a-file"]),
        ("cache-dir-is-a-file", "classifier", [*syn, "--cache-dir", str(a_file / "c")], ["not writable", "a-file"]),
        ("data-dir-empty", "evaluate", ["--dataset", "mnist", "--data-dir", str(tmp / "empty"), *ev],
         ["mnist not found", "empty"]),
        ("classifier-arch", "classifier", [*syn, "--arch", "vgg99"], ["unknown classifier architecture 'vgg99'"]),
        ("weights-ignored", "classifier", [*syn, "--set", "classifier.weights=/tmp/r50.pth", "--seed", "7"],
         ["classifier.weights", "loads no weights"]),
        ("translator-arch", "train", [*syn, *store, "--set", "translator.arch=vit"], ["unknown translator 'vit'"]),
        ("space-value", "tune", [*syn, *store, "--set", "tune.space={translator.width: [0, 8]}"],
         ["tune.space", "translator.width", "> 0"]),
        ("surrogate-arch", "evaluate", [*syn, "--translator", "identity", "--threat-models", "transfer", "--out",
                                        str(tmp / "o2"), "--set", "eval.surrogate_arch=vgg99"],
         ["unknown classifier architecture 'vgg99'"]),
        ("surrogate-weights", "evaluate", [*syn, "--translator", "identity", "--threat-models", "transfer", "--out",
                                           str(tmp / "o3"), "--set", "eval.surrogate_arch=resnet18",
                                           "--set", "eval.surrogate_weights=IMAGENET9K_V7"],
         ["IMAGENET9K_V7"]),
        ("refit-match-missing", "tune", [*syn, *store, "--refit-match", str(tmp / "empty")],
         ["tune.refit_match", "no summary.json"]),
        ("space-key", "tune", [*syn, *store, "--set", "tune.space={translator.heads: [2]}"], ["not searched"]),
        ("train-workers-exceed-cpus", "train", [*syn, *store, "--workers", "64"], ["needs 64 CPUs", "has"]),
        ("train-gpus-missing", "train", [*syn, *store, "--gpus-per-worker", "1"], ["GPUs", "cluster has 0"]),
        ("tune-workers-exceed-cpus", "tune", [*syn, *store, "--workers-per-trial", "64"], ["CPUs", "has"]),
        ("eval-cpus-exceed", "evaluate", [*syn, *ev, "--cpus-per-task", "64"], ["needs 64 CPUs"]),
        ("eval-cpus-negative", "evaluate", [*syn, *ev, "--cpus-per-task", "-1"], ["eval.cpus_per_task"]),
        ("eval-eps-text", "evaluate", [*syn, *ev, "--eps", "small"], ["--eps", "comma-separated"]),
        ("eval-norm", "evaluate", [*syn, *ev, "--norm", "L1"], ["eval.norms", "Linf, L2"]),
        ("eval-no-translator", "evaluate", [*syn], ["--checkpoint", "--translator"]),
        ("eval-unknown-translator", "evaluate", [*syn, "--translator", "unet"], ["needs a trained checkpoint"]),
        ("eval-both", "evaluate", [*syn, "--translator", "identity", "--checkpoint", str(a_file)], ["not both"]),
        ("eval-checkpoint-missing", "evaluate", ["--checkpoint", str(tmp / "nope.pt")], ["does not exist"]),
        ("classifier-eps", "classifier", [*syn, "--adversarial", "pgd", "--eps", "3"], ["out of range"]),
        ("tune-resume-nothing", "tune", [*syn, *store, "--resume", "--name", "never"], ["no experiment 'never'"]),
        ("tune-max-concurrent", "tune", [*syn, *store, "--max-concurrent", "0"], ["tune.max_concurrent"]),
        ("tune-final-top-k", "tune", [*syn, *store, "--final-top-k", "-1"], ["tune.final_top_k"]),
        ("tune-num-samples", "tune", [*syn, *store, "--num-samples", "0"], ["tune.num_samples"]),
        ("tune-epochs", "tune", [*syn, *store, "--epochs", "0"], ["train.epochs"]),
        ("train-epochs", "train", [*syn, *store, "--epochs", "0"], ["train.epochs"]),
        ("train-cpus", "train", [*syn, *store, "--cpus-per-worker", "-2"], ["train.cpus_per_worker"]),
        ("config-missing", "train", [*syn, "--config", str(tmp / "nope.yaml")], ["nope.yaml", "does not exist"]),
        ("set-malformed", "classifier", [*syn, "--set", "classifier.epochs"], ["section.key=value"]),
        ("dataset-unknown", "classifier", ["--dataset", "svhn"], ["unknown dataset 'svhn'"]),
        ("results-not-experiment", "results", [str(tmp / "empty")], ["not an oodray experiment"]),
        ("ray-address-dead", "evaluate", [*syn, *ev], ["RAY_ADDRESS=127.0.0.1:9", "no Ray cluster answers"]),
    ]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return {r[0]: r[1:] for r in _cli_rows(tmp_path_factory.mktemp("validation"))}


CLI_ROW_IDS = ["name-escapes", "storage-is-a-file", "cache-dir-is-a-file", "data-dir-empty", "classifier-arch",
               "weights-ignored", "translator-arch", "space-value", "refit-match-missing", "surrogate-arch",
               "surrogate-weights", "space-key",
               "train-workers-exceed-cpus",
               "train-gpus-missing", "tune-workers-exceed-cpus", "eval-cpus-exceed", "eval-cpus-negative",
               "eval-eps-text", "eval-norm", "eval-no-translator", "eval-unknown-translator", "eval-both",
               "eval-checkpoint-missing", "classifier-eps", "tune-resume-nothing", "tune-max-concurrent",
               "tune-final-top-k", "tune-num-samples", "tune-epochs", "train-epochs", "train-cpus", "config-missing",
               "set-malformed", "dataset-unknown", "results-not-experiment", "ray-address-dead"]


def test_the_cli_table_covers_the_keys_the_config_cannot_judge(rows):
    assert set(CHECKED_BY_THE_CLI.values()) <= set(rows) and set(rows) == set(CLI_ROW_IDS)


@pytest.mark.parametrize("row", CLI_ROW_IDS)
def test_bad_cli_value_is_one_line_before_ray(row, rows, monkeypatch, capsys):
    cli, argv, words = rows[row]
    forbid_ray(monkeypatch)
    if row == "ray-address-dead":
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # the discard port: nothing listens there
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    main = importlib.import_module(f"oodray.{cli}").main
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert exit_info.value.code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_bug_raising_valueerror_keeps_its_traceback(capsys):
    """Only oodray's own error types are user errors: any other exception is a bug and is not turned into exit 2."""
    def main(_argv):
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        run(main, [])


def test_a_failed_run_exits_1_with_its_reason(capsys):
    from oodray.errors import RunFailed

    def main(_argv):
        raise RunFailed("2 evaluation task(s) failed")

    with pytest.raises(SystemExit) as exit_info:
        run(main, [])
    assert exit_info.value.code == 1 and "2 evaluation task(s) failed" in capsys.readouterr().err


def test_a_local_ray_that_does_not_start_in_time_is_one_line_not_a_traceback(monkeypatch):
    """Ray 2.60 gives its local node a fixed 30 s to register and raises a bare Exception past it (seen on 2 cores at a
    load average of 30): that is the machine's state, a failed run (exit 1, one line), not a bug. Any other failure
    of ray.init still propagates as it was."""
    import ray

    from oodray.errors import RunFailed
    from oodray.runtime import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def slow_start(*_a, **_k):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", slow_start)
    with pytest.raises(RunFailed) as failed:
        init_ray()
    line = str(failed.value)
    assert "\n" not in line and "did not start" in line and "load average" in line and "again" in line, line

    def broken(*_a, **_k):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        init_ray()


def test_saved_configs_of_earlier_versions_still_load():
    """Tightened validation must not reject the defaults and presets that earlier runs saved."""
    for name in ("digits", "fashion-mnist", "synthetic", "mnist", "cifar10", "imagenet"):
        cfg = resolve_config(name)
        assert ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- cache keys: everything that changes a cached artefact changes its key ---------------------------------------

CLASSIFIER_CHANGES = {
    "data.seed": 1, "data.val_fraction": 0.2, "data.image_size": 64, "classifier.arch": "small_cnn",
    "classifier.epochs": 0, "classifier.lr": 0.5, "classifier.batch_size": 7, "classifier.weight_decay": 0.1,
    "classifier.weights": "/somewhere/else.pth", "classifier.adversarial": "pgd", "classifier.adv_eps": 0.05,
    "classifier.adv_steps": 3, "classifier.trades_beta": 1.0, "classifier.seed": 5, "classifier.workers": 2,
}
WHERE_C_TRAINS = {"classifier.gpus_per_worker": 1.0, "classifier.cpus_per_worker": 4.0}  # same weights: same key


def test_every_classifier_setting_is_in_the_classifier_key():
    """`--epochs 0` once must not make every later default run reuse an untrained classifier (cache poisoning)."""
    from oodray.config import classifier_key

    base = resolve_config("synthetic", overrides=["classifier.adversarial=trades"])  # so adversarial knobs count
    assert {k for k in flatten(base.to_dict()) if k.startswith("classifier.")} <= {*CLASSIFIER_CHANGES,
                                                                                  *WHERE_C_TRAINS}
    for key, value in WHERE_C_TRAINS.items():
        assert classifier_key(base.replace(**{key: value})) == classifier_key(base), key
    keys = {classifier_key(base)}
    for key, value in CLASSIFIER_CHANGES.items():
        changed = classifier_key(base.replace(**{key: value}))
        assert changed not in keys, key
        keys.add(changed)
    assert classifier_key(base) == classifier_key(resolve_config("synthetic", overrides=[
        "classifier.adversarial=trades", "translator.width=4", "train.lr=0.1"]))  # translator/train keys do not count


def test_a_weights_file_is_keyed_by_its_content(tmp_path):
    from oodray.config import classifier_key

    w = tmp_path / "w.pth"
    w.write_bytes(b"one")
    cfg = resolve_config("synthetic", overrides=[f"classifier.weights={w}"])
    first = classifier_key(cfg)
    w.write_bytes(b"two, longer")  # same path, new weights
    assert classifier_key(cfg) != first


def test_every_attack_setting_and_the_weights_are_in_the_oblivious_cache_key(tmp_path):
    import torch

    from oodray.cache import cache_dir
    from oodray.io import save_checkpoint

    def classifier_file(name: str, fill: float) -> str:
        path = tmp_path / name
        save_checkpoint({"state_dict": {"w": torch.full((3,), fill)}, "train_seconds": fill}, path)
        return path

    base = resolve_config("synthetic", overrides=[f"cache_dir={tmp_path}"])
    c1 = classifier_file("c1.pt", 1.0)
    dirs = {cache_dir(base, c1)}
    changes = {"attack.norm": "L2", "attack.eps": 0.05, "attack.attacks": ("fgsm",), "attack.eps_mix": (0.1, 0.05),
               "attack.steps": 3, "train.seed": 4, "data.seed": 2, "data.val_fraction": 0.2, "data.image_size": 64,
               "cache.batch_size": 16}
    for key, value in changes.items():
        d = cache_dir(base.replace(**{key: value}), c1)
        assert d not in dirs, key
        dirs.add(d)
    assert cache_dir(base, classifier_file("c2.pt", 2.0)) not in dirs  # other weights
    same_weights_new_timings = tmp_path / "c3.pt"
    save_checkpoint({"state_dict": {"w": torch.full((3,), 1.0)}, "train_seconds": 99.0}, same_weights_new_timings)
    assert cache_dir(base, same_weights_new_timings) == cache_dir(base, c1)  # a rebuilt identical C keeps its cache


def test_an_imagefolder_root_is_in_the_classifier_and_cache_keys(tmp_path, monkeypatch):
    """Two ImageFolder roots under one dataset name are two datasets: neither C nor the oblivious cache of one is
    reused for the other. The same root spelled another way, or a URI with other options, is the same dataset; an
    in-memory dataset's key does not depend on where its files were read from."""
    import torch

    from oodray.cache import cache_dir
    from oodray.config import classifier_key
    from oodray.io import save_checkpoint

    c1 = tmp_path / "c1.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, c1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def cfg(root: str, name: str = "imagefolder"):
        return resolve_config(name, overrides=[f"data.data_dir={root}", f"cache_dir={tmp_path}"])

    a, b = cfg(str(tmp_path / "a")), cfg(str(tmp_path / "b"))
    assert classifier_key(a) != classifier_key(b) and cache_dir(a, c1) != cache_dir(b, c1)
    monkeypatch.chdir(tmp_path)
    same = cfg("./a/")
    assert classifier_key(same) == classifier_key(a) and cache_dir(same, c1) == cache_dir(a, c1)
    s3 = cfg("s3://bucket/imagenet?region=us-east-1")
    assert classifier_key(cfg("s3://bucket/imagenet/?endpoint_override=host:9000")) == classifier_key(s3)
    assert classifier_key(cfg("s3://bucket/imagenet-v2")) != classifier_key(s3) != classifier_key(a)
    assert classifier_key(cfg(str(tmp_path / "a"), "fashion-mnist")) == classifier_key(cfg(str(tmp_path / "b"),
                                                                                             "fashion-mnist"))
