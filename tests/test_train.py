"""Ray Train translator training on a real local Ray: 2 workers, checkpoints, resume; the oblivious cache."""

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from oodray.attacks import attack_specs
from oodray.cache import ObliviousCache, build_oblivious_cache, cache_dir
from oodray.classifier import get_classifier
from oodray.compute import attack_passes, translator_step_passes
from oodray.config import resolve_config
from oodray.data import eval_subset, load_dataset
from oodray.metrics import proxy_metrics
from oodray.models.defended import DefendedModel
from oodray.models.translator import build_translator, load_translator_checkpoint
from oodray.runtime import fast_layout
from oodray.train import fit_translator, prepare_run

pytestmark = pytest.mark.ray


def _cfg(**over):
    base = {"train.workers": 2, "train.cpus_per_worker": 0.5, "train.epochs": 1, "train.max_batches": 3,
            "train.proxy_examples": 16}
    base.update(over)
    return resolve_config("synthetic", overrides=[f"{k}={v}" for k, v in base.items()])


def test_two_worker_training_checkpoints_and_resumes(ray_local, tmp_path):
    cfg = _cfg(**{"eval.batch_size": 8})  # the proxy's 16 images in 2 batches: one per rank
    result = fit_translator(cfg, prepare_run(cfg), storage=str(tmp_path), name="run")
    assert result.error is None
    assert result.metrics["epoch"] == 1 and result.metrics["world_size"] == 2
    for k in ("clean_accuracy", "robust_accuracy", "loss_total", "loss_pixel", "objective"):
        assert k in result.metrics
    state = load_translator_checkpoint(result.checkpoint.path)
    # The proxy split over the 2 ranks gives the figures one process gets from the same translator.
    splits = load_dataset(cfg.data)
    translator = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    translator.load_state_dict(state["translator"])
    classifier, _ = get_classifier(cfg, splits)
    defended = DefendedModel(fast_layout(classifier, True), fast_layout(translator, True).eval(), None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (rounding is the same, so are the 16 PGD results)
    try:
        alone = proxy_metrics(cfg, defended, *eval_subset(splits.val, 16, cfg.data.seed))
    finally:
        torch.set_num_threads(threads)
    assert {k: result.metrics[k] for k in alone} == alone
    assert result.metrics["channels_last"] is True  # the layout the workers used (the default on CPU at 8 px)
    assert state["epoch"] == 1 and state["config"]["train"]["workers"] == 2 and "optimizer" in state
    first = state["translator"]

    # The same run name with more epochs continues from the checkpoint: epoch 2 only, the counter continuing.
    cfg2 = cfg.replace(**{"train.epochs": 2})
    result2 = fit_translator(cfg2, prepare_run(cfg2), storage=str(tmp_path), name="run")
    assert result2.error is None and result2.metrics["epoch"] == 2
    state2 = load_translator_checkpoint(result2.checkpoint.path)
    assert state2["epoch"] == 2
    assert any(not torch.equal(first[k], state2["translator"][k]) for k in first)
    assert result2.metrics["resumed_from_epoch"] == 1  # epoch 1 was not trained again
    assert result.metrics["resumed_from_epoch"] == 0

    # Compute is cumulative over the run, the resumed epoch continuing from the checkpoint's totals.
    per_example = translator_step_passes("oblivious", attack_specs(cfg), tuple(cfg.loss.weights()))
    seen = 3 * cfg.train.batch_size * 2  # 3 batches per worker, 2 workers
    assert result.metrics["compute_examples"] == seen and result2.metrics["compute_examples"] == 2 * seen
    assert result2.metrics["compute_passes"] == pytest.approx(2 * seen * per_example)
    assert result2.metrics["compute_wall_seconds"] > result.metrics["compute_wall_seconds"] > 0
    assert result.metrics["cache_passes"] == attack_passes(attack_specs(cfg)) * 400  # synthetic: 400 training images


def test_adaptive_regime_and_gate(ray_local, tmp_path):
    cfg = _cfg(**{"train.regime": "adaptive", "train.workers": 1, "translator.gate": True, "loss.gan": 0.1})
    result = fit_translator(cfg, prepare_run(cfg), storage=str(tmp_path), name="adaptive")
    assert result.error is None
    m = result.metrics
    assert 0.0 <= m["gate_flag_rate_clean"] <= 0.5 and "gate_flag_rate_attacked" in m
    assert "loss_gan" in m and "loss_discriminator" in m
    assert load_translator_checkpoint(result.checkpoint.path)["gate"] is not None


def test_oblivious_cache_is_reused_and_partial_shards_regenerated(ray_local):
    cfg = resolve_config("synthetic", overrides=["attack.attacks=[pgd, fgsm]"])
    _, cpath = get_classifier(cfg)
    d, generated = build_oblivious_cache(cfg, cpath)
    assert d == cache_dir(cfg, cpath)
    x = _read_all(d)
    assert x.shape == (400, 1, 8, 8)
    assert (d / "shard-00000.u8").stat().st_size == 400 * 8 * 8  # raw uint8: 1 byte per pixel
    assert build_oblivious_cache(cfg, cpath)[1] == 0  # second run generates nothing
    # An interrupted write: a shard cut short is detected by its checksum and only it is regenerated.
    shard = d / "shard-00000.u8"
    shard.write_bytes(shard.read_bytes()[:50])
    assert build_oblivious_cache(cfg, cpath)[1] == 1
    assert torch.equal(_read_all(d), x)
    # Another attack config gets its own cache.
    other = cfg.replace(**{"attack.eps": 0.05})
    assert cache_dir(other, cpath) != d


def _read_all(d):
    cache = ObliviousCache(d)
    return torch.stack([cache[i] for i in range(len(cache))])


def test_train_cli_bad_inputs_exit_2():
    assert_one_line_error(run_cli("oodray.train", "--dataset", "synthetic", "--set", "translator.arch=vit"),
                          "unknown translator 'vit'")
    assert_one_line_error(run_cli("oodray.train", "--dataset", "digits", "--set", "translator.depth=4"),
                          "downsamples by 16")
    assert_one_line_error(run_cli("oodray.train", "--dataset", "digits", "--set", "attack.eps=1.5"), "attack.eps")
    assert_one_line_error(run_cli("oodray.train", "--dataset", "digits", "--set", "loss.pixel=-1"), "loss.pixel")
    assert_one_line_error(run_cli("oodray.train", "--dataset", "digits", "--set", "loss.perceptual=1"),
                          "loss.perceptual")
