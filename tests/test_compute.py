"""Compute accounting (oodray.compute) checked against what the training code actually runs: forward passes with
gradients through the model being trained, counted per example by a hook, equal the passes the accounting records
(PGD-k adversarial training: k + 1 per example)."""

import json

import pytest
import torch

from oodray.attacks import attack_specs
from oodray.compute import Compute, attack_passes, classifier_step_passes, defence_compute, translator_step_passes
from oodray.config import classifier_key, resolve_config
from oodray.data import load_dataset
from oodray.fixed_classifier import train_classifier
from oodray.losses import TranslatorObjective
from oodray.models.classifier import build_classifier
from oodray.models.translator import build_translator
from oodray.train import train_step


class PassCounter:
    """Counts examples through a module's forward while gradients are on (a training or attack pass)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_pre_hook(self)

    def __call__(self, _module, args) -> None:
        if torch.is_grad_enabled():
            self.n += args[0].shape[0]


@pytest.mark.parametrize("adversarial,steps", [("none", 1), ("pgd", 3), ("trades", 2)])
def test_classifier_passes_match_the_training_loop(monkeypatch, adversarial, steps):
    cfg = resolve_config("synthetic", overrides=["classifier.epochs=1", f"classifier.adversarial={adversarial}",
                                                 f"classifier.adv_steps={steps}", "classifier.batch_size=100"])
    splits = load_dataset(cfg.data)
    counters = []

    def counted(*a, **k):
        model = build_classifier(*a, **k)
        counters.append(PassCounter(model))
        return model

    monkeypatch.setattr("oodray.fixed_classifier.build_classifier", counted)
    compute = Compute()
    train_classifier(cfg, splits, compute)
    n = len(splits.train)
    assert compute.examples == n
    assert compute.passes == counters[0].n == n * classifier_step_passes(adversarial, steps)
    if adversarial == "pgd":
        assert compute.passes == n * (steps + 1)  # PGD-k adversarial training: k + 1 passes per example
    assert compute.wall_seconds > 0


@pytest.mark.parametrize("regime,terms", [("adaptive", {"loss.identity": 1.0}), ("adaptive", {}),
                                          ("oblivious", {"loss.clean_consistency": 0.5})])
def test_translator_step_passes_match_train_step(regime, terms):
    over = {"train.regime": regime, "attack.steps": 4, "attack.attacks": "[pgd]", "loss.identity": 0.0,
            "loss.clean_consistency": 0.0, "loss.gan": 0.0, **terms}
    cfg = resolve_config("synthetic", overrides=[f"{k}={v}" for k, v in over.items()])
    splits = load_dataset(cfg.data)
    classifier = build_classifier(cfg.classifier.arch, splits.info)
    classifier.eval()
    translator = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    counter = PassCounter(translator)
    opt = torch.optim.Adam(translator.parameters())
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    train_step(cfg, translator, classifier, None, TranslatorObjective(cfg.loss, classifier), (opt, None), None,
               (x, x.clone(), y), torch.Generator().manual_seed(0), False)
    expected = translator_step_passes(regime, attack_specs(cfg), tuple(cfg.loss.weights()))
    assert counter.n == 16 * expected
    assert expected == (4 if regime == "adaptive" else 0) + 1 + (1 if terms else 0)


def test_attack_passes_is_the_mean_over_the_mixture():
    cfg = resolve_config("synthetic", overrides=["attack.attacks=[pgd, fgsm]", "attack.steps=7"])
    assert attack_passes(attack_specs(cfg)) == (7 + 1) / 2


def test_defence_compute_totals_and_derives_older_classifiers():
    c_state = {"metrics": {"compute_passes": 1000.0, "compute_examples": 1000, "compute_wall_seconds": 2.0}}
    t_state = {"metrics": {"compute_passes": 300.0, "compute_examples": 150, "compute_wall_seconds": 1.0,
                           "cache_passes": 50.0}}
    assert defence_compute(c_state, t_state)["passes"] == 1350.0
    assert defence_compute(c_state, None)["passes"] == 1000.0
    old = {"metrics": {"train_seconds": 3.0}, "config": {"classifier": {"epochs": 2, "adversarial": "pgd",
                                                                        "adv_steps": 7}}}
    derived = defence_compute(old, None, classifier_train_examples=100)
    assert derived["passes"] == 2 * 100 * 8 and derived["classifier_compute_derived"]
    assert defence_compute(old, None)["passes"] is None  # unknown stays unknown, never 0


def test_refit_budget_matches_the_strongest_baseline(tmp_path):
    """The refit budget buys the translator what the strongest baseline spent, less C's and the cache's passes."""
    from oodray.refit import refit_budget

    cfg = resolve_config("synthetic", overrides=["train.regime=adaptive", "attack.steps=4", "attack.attacks=[pgd]",
                                                 "loss.identity=0", "loss.clean_consistency=0", "loss.gan=0",
                                                 f"cache_dir={tmp_path / 'cache'}", "train.batch_size=50"])
    cdir = tmp_path / "cache" / "classifiers" / classifier_key(cfg)
    cdir.mkdir(parents=True)
    (cdir / "metrics.json").write_text(json.dumps({"compute_passes": 4000.0}))
    for name, robust, passes in (("weak", 0.1, 9e9), ("strong", 0.5, 4000.0 + 400 * 5 * 3)):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "label": name, "robust": {"adaptive/Linf/0.1": robust}, "training_compute": {"passes": passes},
            "clean_accuracy_classifier": 0.9, "clean_accuracy_defended": 0.9}))
    matched = cfg.replace(**{"tune.refit_match": [str(tmp_path / "weak"), str(tmp_path / "strong")]})
    b = refit_budget(matched, matched, n_train=400)
    assert b.passes == 400 * 5 * 3 and b.epochs == 3 and b.max_batches is None and "'strong'" in b.why
    half = matched.replace(**{"tune.refit_match": [str(tmp_path / "strong")]})
    (tmp_path / "strong" / "summary.json").write_text(json.dumps({
        "label": "strong", "robust": {"adaptive/Linf/0.1": 0.5}, "training_compute": {"passes": 4000.0 + 400 * 5 * 1.5},
        "clean_accuracy_classifier": 0.9, "clean_accuracy_defended": 0.9}))
    b = refit_budget(half, half, n_train=400)
    assert (b.epochs, b.max_batches) == (2, 6)  # 1.5 epochs of 8 batches of 50: 2 epochs of 6 batches
    assert refit_budget(cfg.replace(**{"tune.refit_epochs": 5}), cfg, 400).epochs == 5


def test_a_refit_trained_to_its_budget_is_kept_and_any_other_is_fitted(tmp_path):
    """A resumed search or `oodray.refit` re-run keeps a refit whose newest checkpoint holds its whole budget under
    the same config (no Ray Train worker group started for it); one short of it, or of another config, is fitted."""
    from oodray.io import save_checkpoint
    from oodray.models.translator import CHECKPOINT_FILE, CHECKPOINT_FORMAT
    from oodray.refit import finished_refit

    cfg = resolve_config("synthetic", overrides=["train.epochs=2", "translator.arch=tiny"])
    net = build_translator(cfg.translator, 1, (8, 8))
    run = tmp_path / "refit-trial-1"
    assert finished_refit(run, cfg) is None  # never started

    def checkpoint(name: str, epoch: int) -> None:
        (run / name).mkdir(parents=True)
        save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": cfg.to_dict(),
                         "translator": net.state_dict()}, run / name / CHECKPOINT_FILE)

    checkpoint("checkpoint_000000", 1)
    assert finished_refit(run, cfg) is None  # one epoch of two: Ray Train resumes it
    checkpoint("checkpoint_000001", 2)
    assert finished_refit(run, cfg) == run / "checkpoint_000001" / CHECKPOINT_FILE
    assert finished_refit(run, cfg.replace(**{"train.epochs": 3})) is None  # a larger budget under the same name
    assert finished_refit(run, cfg.replace(**{"train.lr": 0.5})) is None  # not this config's run
    (run / "checkpoint_000002").mkdir()
    (run / "checkpoint_000002" / CHECKPOINT_FILE).write_bytes(b"cut short")  # a newer one never completed
    assert finished_refit(run, cfg) == run / "checkpoint_000001" / CHECKPOINT_FILE
