"""The fixed classifier C that translators defend: trained once (plain or adversarial: PGD-AT, TRADES), cached, frozen.

The classifier is saved under `<cache>/classifiers/<classifier_key>/` (`classifier.pt` + `config.json` +
`metrics.json`) and re-used by every later run with the same key. Training is plain single-process PyTorch: C is
trained once and frozen; distribution is for translators and evaluation. `python -m oodray.classifier` is the CLI.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from oodray.attacks import pgd
from oodray.config import ExperimentConfig, classifier_key, save_config
from oodray.data import Splits, load_dataset
from oodray.errors import ConfigError
from oodray.io import atomic_write_text, ensure_writable_dir
from oodray.metrics import accuracy
from oodray.models.classifier import (
    CLASSIFIERS,
    Classifier,
    build_classifier,
    check_arch,
    check_weights,
    freeze,
    load_classifier,
    save_classifier,
)

log = logging.getLogger(__name__)


def classifier_path(cfg: ExperimentConfig) -> Path:
    return cfg.resolved_cache_dir() / "classifiers" / classifier_key(cfg) / "classifier.pt"


def train_classifier(cfg: ExperimentConfig, splits: Splits) -> Classifier:
    """Adam on cross-entropy; with `classifier.adversarial` = pgd (Madry) or trades, on PGD examples."""
    c = cfg.classifier
    torch.manual_seed(c.seed)
    model = build_classifier(c.arch, splits.info, c.weights)
    if c.epochs == 0 and model.new_head:
        raise ConfigError(f"classifier.weights={c.weights} has {model.new_head} classes and "
                          f"'{splits.info.name}' has {splits.info.num_classes}: the new head is random until trained; "
                          "fine-tune it with classifier.epochs > 0 (e.g. --epochs 5)")
    if c.epochs == 0:
        return freeze(model)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
    g = torch.Generator().manual_seed(c.seed)
    loader = DataLoader(splits.train, batch_size=c.batch_size, shuffle=True, generator=g, drop_last=False)
    eps = c.adv_eps or cfg.attack.eps
    for epoch in range(c.epochs):
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for x, y in loader:
            if c.adversarial == "none":
                loss = F.cross_entropy(model(x), y)
            else:
                loss = _adversarial_loss(model, x, y, c.adversarial, eps, cfg.attack.norm, c.adv_steps,
                                         c.trades_beta, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        sched.step()
        model.eval()
        log.info("classifier epoch %d/%d loss %.4f val acc %.4f (%.1fs)", epoch + 1, c.epochs, total / n,
                 accuracy(model, splits.val), time.time() - t0)
    return freeze(model)


def _adversarial_loss(model: Classifier, x: torch.Tensor, y: torch.Tensor, kind: str, eps: float, norm: str,
                      steps: int, beta: float, g: torch.Generator) -> torch.Tensor:
    model.eval()  # craft with fixed dropout/BN, as in Madry et al.'s reference code
    if kind == "pgd":
        x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=steps, generator=g)
        model.train()
        return F.cross_entropy(model(x_adv), y)
    # TRADES: CE on clean + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL term.
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        if norm == "Linf":
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
        else:
            gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = x_adv.detach() + step * grad / gn - x
            dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x_adv = (x + d * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)).clamp(0, 1)
    model.train()
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1),
                                                        reduction="batchmean")


def check_classifier_config(cfg: ExperimentConfig) -> None:
    """Refuses a classifier that cannot be built or would be meaningless, before any data is read or Ray starts: an
    unknown architecture or weights name, weights not in torchvision's cache, and a torchvision architecture with
    random weights that is not trained (`classifier.epochs=0` without `classifier.weights`)."""
    c = cfg.classifier
    check_arch(c.arch)
    check_weights(c.arch, c.weights)
    if c.epochs == 0 and not c.weights and c.arch not in CLASSIFIERS:
        raise ConfigError(f"classifier.epochs=0 keeps {c.arch}'s random weights; give pretrained ones "
                          "(--set classifier.weights=IMAGENET1K_V2, another torchvision weights name, or a file) "
                          "or train it (classifier.epochs > 0)")


def get_classifier(cfg: ExperimentConfig, splits: Splits | None = None, *, train: bool = True,
                   force: bool = False) -> tuple[Classifier, Path]:
    """The cached fixed classifier for this config, trained (and cached) first if missing."""
    check_arch(cfg.classifier.arch)  # an unknown name fails here, before data is read or Ray starts
    path = classifier_path(cfg)
    if path.exists() and not force:
        model, _ = load_classifier(path, expect_dataset=cfg.data.name, expect_arch=cfg.classifier.arch)
        return model, path
    if not train:
        raise ConfigError(f"no fixed classifier at '{path}'; train it with: python -m oodray.classifier "
                          f"--dataset {cfg.data.name}")
    check_classifier_config(cfg)
    ensure_writable_dir(path.parent, "classifier cache directory")
    splits = splits or load_dataset(cfg.data)
    t0 = time.time()
    model = train_classifier(cfg, splits)
    train_s = time.time() - t0
    test_acc = accuracy(model, splits.test)
    metrics = {"test_accuracy": test_acc, "val_accuracy": accuracy(model, splits.val),
               "train_seconds": round(train_s, 1), "test_examples": len(splits.test)}
    save_classifier(model, path, cfg.to_dict(), metrics)
    save_config(cfg, path.parent)
    atomic_write_text(path.parent / "metrics.json", json.dumps(metrics, indent=2))
    log.info("saved fixed classifier to %s (test acc %.4f)", path, test_acc)
    return model, path
