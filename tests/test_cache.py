"""The oblivious cache (oodray/cache.py): uint8 images within the attack's distance of x, a lazy reader bounded by its
LRU, checksums checked on first open, builds that do not depend on how shards are grouped into tasks, old float16
caches regenerated, and a cache that cannot fit refused before Ray starts."""

from __future__ import annotations

import json
import pickle
import random
from collections import namedtuple

import pytest
import torch
from conftest import forbid_ray

import oodray.cache as cache
from oodray.classifier import get_classifier
from oodray.cli import run
from oodray.config import resolve_config
from oodray.errors import CheckpointError, ConfigError, StorageFullError
from oodray.models.classifier import classifier_from_state


def _attacked(x: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """An attack-like x_adv: for Linf half the images at the corners x +- eps (what PGD's sign steps end on), half
    anywhere in the ball; for L2 on the sphere of radius eps. Clipped to [0,1] as attacks are."""
    g = torch.Generator().manual_seed(seed)
    if norm == "Linf":
        d = (2 * torch.rand(x.shape, generator=g) - 1) * eps
        d[: len(x) // 2] = eps * torch.sign(torch.rand(d[: len(x) // 2].shape, generator=g) - 0.5)
    else:
        d = torch.randn(x.shape, generator=g)
        d = d * eps / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return (x + d).clamp(0, 1)


def _dist(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 8 / 255), ("Linf", 0.3), ("Linf", 4 / 255), ("L2", 0.5)])
def test_uint8_images_stay_within_the_attacks_distance_of_x_on_the_grid(norm, eps):
    """On the 1/255 grid (MNIST, CIFAR, ImageNet decoded by PIL) no stored pixel is further from x than the attack
    left it, so the stored image is in the eps ball for both norms; plain rounding would break this at eps=0.3
    (76.5/255 rounds up to 77/255)."""
    x = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(1)).float() / 255
    x_adv = _attacked(x, eps, norm, seed=2)
    q = cache.quantize(x, x_adv)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    stored = cache.dequantize(q)
    assert ((stored - x).abs() <= (x_adv - x).abs() + 1e-6).all()
    assert (_dist(stored, x, norm) <= eps * (1 + 1e-6) + 1e-6).all()
    assert ((stored - x_adv).abs() <= 1 / 255 + 1e-6).all()  # and it is the attacked image, to within one step
    if norm == "Linf":  # PGD's corners x +- eps are kept exactly where they are grid points
        corners = x_adv[:32]
        on_grid = ((corners * 255 - (corners * 255).round()).abs() < 1e-3)
        assert torch.allclose(stored[:32][on_grid], corners[on_grid], atol=1e-6)


def test_uint8_images_off_the_grid_keep_the_linf_radius():
    """Off the grid (digits, synthetic) a pixel may have no grid point as close to x as the attack's; the image still
    stays within its Linf radius (or half a grid step, whichever is larger)."""
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for eps in (0.1, 0.2, 0.3):
        x_adv = _attacked(x, eps, "Linf", seed=4)
        stored = cache.dequantize(cache.quantize(x, x_adv))
        assert (_dist(stored, x, "Linf") <= torch.clamp(_dist(x_adv, x, "Linf"), min=1 / 510) + 1e-6).all()


# --- builds and the reader, on a real local Ray ----------------------------------------------------------------------

SMALL = ["attack.attacks=[pgd, fgsm]", "cache.batch_size=16"]  # 400 training images, shards of 40, batches of 16


def _read_all(reader: cache.ObliviousCache) -> torch.Tensor:
    return torch.stack([reader[i] for i in range(len(reader))])


@pytest.mark.ray
def test_build_does_not_depend_on_task_grouping_and_the_reader_is_lazy(ray_local, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_SIZE", 40)
    cfg = resolve_config("synthetic", overrides=[*SMALL, "cache.shards_per_task=1"])
    _, cpath = get_classifier(cfg)
    d, generated = cache.build_oblivious_cache(cfg, cpath)
    assert generated == 10
    one_per_task = _read_all(cache.ObliviousCache(d))
    d.rename(d.with_name(d.name + "-one-per-task"))
    d2, generated = cache.build_oblivious_cache(cfg.replace(**{"cache.shards_per_task": 4}), cpath)
    assert d2 == d and generated == 10
    reader = cache.ObliviousCache(d, max_open=2)
    assert len(reader) == 400
    # The same images whatever the grouping, and they are the seeded attack of each batch of 16, stored as uint8.
    order = list(range(400))
    random.Random(0).shuffle(order)
    for i in order:
        assert torch.equal(reader[i], one_per_task[i])
        assert reader.open_shards <= 2  # never more than its LRU
    assert reader.opens > 10  # shards were evicted and opened again: nothing was read up front
    from oodray.data import load_dataset, stack
    from oodray.io import load_checkpoint
    train = load_dataset(cfg.data).train
    classifier = classifier_from_state(load_checkpoint(cpath))
    x, y = stack(train, range(56, 72))  # the second batch of the second shard
    assert torch.equal(cache.dequantize(cache.attack_chunk(cfg, classifier, x, y, 56)), one_per_task[56:72])
    assert not torch.equal(one_per_task[56:72], x)  # the attack did move the images
    # A reader travels to DataLoader workers and Ray actors without its open shards.
    assert pickle.loads(pickle.dumps(reader)).open_shards == 0


@pytest.mark.ray
def test_a_shard_altered_in_place_is_caught_when_first_opened_and_rebuilt_by_a_verifying_build(ray_local,
                                                                                                 monkeypatch):
    monkeypatch.setattr(cache, "SHARD_SIZE", 40)
    cfg = resolve_config("synthetic", overrides=SMALL)
    _, cpath = get_classifier(cfg)
    d, _ = cache.build_oblivious_cache(cfg, cpath)
    good = _read_all(cache.ObliviousCache(d))
    load = cache.load_dataset
    monkeypatch.setattr(cache, "load_dataset", lambda _cfg: pytest.fail("a trial scanned the dataset"))
    assert cache.build_oblivious_cache(cfg, cpath, verify=False)[1] == 0  # a trial reads a complete cache as it is
    monkeypatch.setattr(cache, "load_dataset", load)
    shard = d / "shard-00003.u8"
    data = bytearray(shard.read_bytes())
    data[123] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    reader = cache.ObliviousCache(d)
    assert torch.equal(reader[0], good[0])  # other shards read fine
    with pytest.raises(CheckpointError, match="checksum"):
        reader[3 * 40 + 5]
    assert cache.build_oblivious_cache(cfg, cpath, verify=False)[1] == 0  # sizes only: a trial's quick check
    assert cache.build_oblivious_cache(cfg, cpath)[1] == 1  # checksums: only that shard is made again
    assert torch.equal(_read_all(cache.ObliviousCache(d)), good)


# --- formats, sizes and places -----------------------------------------------------------------------------------


def test_a_float16_cache_of_format_1_is_regenerated_not_read(monkeypatch):
    cfg = resolve_config("synthetic")
    _, cpath = get_classifier(cfg)
    d = cache.cache_dir(cfg, cpath)
    d.mkdir(parents=True, exist_ok=True)
    from oodray.io import save_checkpoint
    sha = save_checkpoint({"x_adv": torch.rand(400, 1, 8, 8).half(), "start": 0, "stop": 400}, d / "shard-00000.pt")
    (d / "manifest.json").write_text(json.dumps({"n": 400, "shard_size": 512, "shards": {
        "00000": {"sha256": sha, "start": 0, "stop": 400}}}))
    try:
        plan = cache.plan_oblivious_cache(cfg, cpath, 400)
        assert [s for s, _, _ in plan.todo] == ["00000"] and plan.manifest["stale"]
        with pytest.raises(CheckpointError, match="format"):
            cache.ObliviousCache(d)
    finally:
        (d / "manifest.json").unlink()
        (d / "shard-00000.pt").unlink()


def _tiny_disk(monkeypatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: usage(free, 0, free))


def test_a_cache_that_does_not_fit_is_refused_with_its_size(monkeypatch):
    cfg = resolve_config("synthetic")
    _, cpath = get_classifier(cfg)
    plan = cache.plan_oblivious_cache(cfg, cpath, 400, verify=False)
    assert plan.total_bytes == 400 * 1 * 8 * 8  # one byte per pixel
    _tiny_disk(monkeypatch, plan.total_bytes)  # the images fit, the temp file of a shard in flight does not
    with pytest.raises(StorageFullError, match=r"needs 58.4 kB under .* only 25.6 kB is free.*train.regime=adaptive"):
        cache.check_cache_space([cfg], [cpath], 400)
    _tiny_disk(monkeypatch, 10 * plan.total_bytes)
    assert cache.check_cache_space([cfg], [cpath], 400)[0].todo  # fits: planned, nothing written
    assert not (plan.dir / "manifest.json").exists()
    # Several variants (a search) are counted together on one file system.
    variants = [cfg, cfg.replace(**{"attack.eps": 0.05}), cfg.replace(**{"attack.eps": 0.07})]
    _tiny_disk(monkeypatch, 3 * plan.total_bytes)
    with pytest.raises(StorageFullError):
        cache.check_cache_space(variants, [cpath] * 3, 400)


@pytest.mark.parametrize("cli", ["train", "tune"])
def test_cli_refuses_a_cache_that_does_not_fit_before_ray(cli, monkeypatch, tmp_path, capsys):
    import importlib

    forbid_ray(monkeypatch)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _tiny_disk(monkeypatch, 1000)
    main = importlib.import_module(f"oodray.{cli}").main
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--dataset", "synthetic", "--storage", str(tmp_path / "runs"), "--set", "attack.eps=0.123"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "the oblivious cache needs" in lines[0] and "free" in lines[0]


def test_a_cache_dir_uri_is_refused_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="cache_dir='s3://bucket/oodray' is a URI.*file-system path"):
        resolve_config("synthetic", overrides=["cache_dir=s3://bucket/oodray"])
    monkeypatch.setenv("OODRAY_CACHE", "gs://bucket/oodray")
    with pytest.raises(ConfigError, match="OODRAY_CACHE='gs://bucket/oodray' is a URI"):
        resolve_config("synthetic").resolved_cache_dir()
