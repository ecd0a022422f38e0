"""The proxy metrics (oodray/metrics.py): attacked in bounded batches, with the results of one batch."""

from __future__ import annotations

import pytest
import torch

from oodray.attacks import pgd
from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.data import eval_subset, load_dataset, stack
from oodray.metrics import proxy_batch_size, proxy_counts, proxy_from_counts, proxy_metrics
from oodray.models.defended import DefendedModel, MahalanobisGate
from oodray.models.translator import build_translator


def test_pgd_in_batches_draws_the_random_starts_of_one_batch():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x, y = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 10
    g = torch.Generator().manual_seed(5)
    whole = pgd(model, x, y, eps=0.1, steps=3, generator=g)
    g = torch.Generator().manual_seed(5)
    parts = torch.cat([pgd(model, x[i:i + 7], y[i:i + 7], eps=0.1, steps=3, generator=g) for i in range(0, 50, 7)])
    assert torch.allclose(parts, whole, atol=1e-6)
    assert not torch.allclose(whole, x, atol=1e-3)


def _proxy_case(gate: bool):
    """Synthetic data's C behind an untrained tiny translator (gated or not) and 64 validation images."""
    cfg = resolve_config("synthetic", overrides=["attack.eps=0.15"])
    classifier, _ = get_classifier(cfg)
    splits = load_dataset(cfg.data)
    torch.manual_seed(0)
    translator = build_translator(cfg.translator, splits.info.channels, splits.info.image_size).eval()
    g = None
    if gate:
        x_tr, y_tr = stack(splits.train)
        g = MahalanobisGate.fit(classifier, x_tr, stack(splits.val)[0], 90.0, y_train=y_tr)
    return (cfg, DefendedModel(classifier, translator, g), *eval_subset(splits.val, 64, cfg.data.seed))


@pytest.mark.parametrize("gate", [False, True])
def test_proxy_metrics_in_batches_equal_one_batch(gate):
    cfg, defended, x, y = _proxy_case(gate)
    whole = proxy_metrics(cfg, defended, x, y, batch_size=64)
    chunked = proxy_metrics(cfg, defended, x, y, batch_size=9)
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], abs=1e-9), k
    assert whole["robust_accuracy"] < whole["clean_accuracy"]  # the attack did something to compare
    assert ("gate_flag_rate_attacked" in whole) == gate
    assert whole["proxy_examples"] == len(x)  # what a difference between two figures is worth


@pytest.mark.parametrize("gate", [False, True])
def test_proxy_split_over_ranks_gives_the_one_process_counts(gate):
    cfg, defended, x, y = _proxy_case(gate)
    alone = proxy_counts(cfg, defended, x, y, batch_size=9)  # 8 batches, the last of 1 image
    assert alone[0] == 64 and alone[2] < alone[1]  # every image counted; the attack did something
    for world in (2, 3, 8, 11):  # 11 ranks for 8 batches: some ranks have none
        parts = [proxy_counts(cfg, defended, x, y, batch_size=9, rank=r, world=world) for r in range(world)]
        assert torch.equal(sum(parts), alone), world
        assert sum(bool(p[0]) for p in parts) == min(world, 8)  # the batches are spread, not all on one rank
    assert proxy_from_counts(cfg, alone, gate) == proxy_metrics(cfg, defended, x, y, batch_size=9)


def test_proxy_batch_is_bounded_by_memory_and_eval_batch_size():
    cfg = resolve_config("synthetic")
    assert proxy_batch_size(cfg, (1, 8, 8)) == cfg.eval.batch_size
    assert proxy_batch_size(cfg, (3, 224, 224)) == 64
    assert proxy_batch_size(cfg.replace(**{"eval.batch_size": 16}), (3, 224, 224)) == 16
