"""Tests for oodray.shifts: shapes and range, graded severity, seeding, and argument errors."""

from __future__ import annotations

import pytest
import torch

from oodray.shifts import SEVERITIES, SHIFTS, apply_shift, gaussian_blur, random_shifts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with two intra-op threads on a busy 2-core machine torch spin-waits (seen: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 6, c: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images with structure (so blur and sharpen have edges to act on), strictly inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, side // 2, side // 2, generator=g)
    up = torch.nn.functional.interpolate(base, size=(side, side), mode="nearest")
    return 0.1 + 0.8 * up


def _total_variation(x: torch.Tensor) -> float:
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().sum()
    return (vertical + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()).item()


@pytest.mark.parametrize("side", [8, 28, 224])
@pytest.mark.parametrize("name", SHIFTS)
def test_every_shift_keeps_shape_dtype_and_range(name: str, side: int) -> None:
    x = _images(n=2, c=1 if side == 28 else 3, side=side)
    for severity in SEVERITIES:
        out = apply_shift(x, name, severity, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not torch.equal(out, x), f"{name} at severity {severity} did nothing"


def test_range_holds_for_extreme_inputs() -> None:
    x = torch.cat([torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)])
    for name in SHIFTS:
        out = apply_shift(x, name, 5, generator=torch.Generator().manual_seed(1))
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_darker_and_brighter_grow_with_severity() -> None:
    x = _images()
    darker = [apply_shift(x, "darker", s).mean().item() for s in SEVERITIES]
    brighter = [apply_shift(x, "brighter", s).mean().item() for s in SEVERITIES]
    assert all(a > b for a, b in zip([x.mean().item()] + darker, darker))
    assert all(a < b for a, b in zip([x.mean().item()] + brighter, brighter))


def test_contrast_shrinks_spread_keeps_mean() -> None:
    x = _images()
    outs = [apply_shift(x, "contrast", s) for s in SEVERITIES]
    spreads = [o.std(dim=(1, 2, 3)).mean().item() for o in outs]
    assert all(a > b for a, b in zip([x.std(dim=(1, 2, 3)).mean().item()] + spreads, spreads))
    for o in outs:  # the per-image mean is the fixed point of the contrast map
        torch.testing.assert_close(o.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)


def test_blur_lowers_and_sharpen_raises_total_variation_with_severity() -> None:
    for side in (8, 224):
        x = _images(side=side)
        blur = [_total_variation(apply_shift(x, "blur", s)) for s in SEVERITIES]
        sharpen = [_total_variation(apply_shift(x, "sharpen", s)) for s in SEVERITIES]
        tv = _total_variation(x)
        assert all(a > b for a, b in zip([tv] + blur, blur)), (side, blur)
        assert all(a < b for a, b in zip([tv] + sharpen, sharpen)), (side, sharpen)


def test_blur_keeps_a_constant_image_constant() -> None:
    # Replicate padding: a zero-padded blur would darken the border of a flat image.
    x = torch.full((1, 3, 8, 8), 0.6)
    torch.testing.assert_close(gaussian_blur(x, 5.0), x)
    torch.testing.assert_close(apply_shift(x, "blur", 5), x)


def test_noise_std_grows_with_severity() -> None:
    x = torch.full((4, 3, 32, 32), 0.5)  # away from the clamp so the measured std is the drawn one
    stds = [(apply_shift(x, "noise", s, generator=torch.Generator().manual_seed(0)) - x).std().item()
            for s in SEVERITIES]
    for measured, expected in zip(stds, (0.04, 0.08, 0.12, 0.16, 0.2)):
        assert abs(measured - expected) < 0.01
    assert stds == sorted(stds)


def test_noise_is_seeded_by_the_generator() -> None:
    x = _images()
    a = apply_shift(x, "noise", 3, generator=torch.Generator().manual_seed(7))
    b = apply_shift(x, "noise", 3, generator=torch.Generator().manual_seed(7))
    c = apply_shift(x, "noise", 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_shifts_is_per_sample_and_seeded() -> None:
    x = _images(n=32)
    out = random_shifts(x, generator=torch.Generator().manual_seed(3), names=("darker", "brighter"),
                        severities=(5,))
    darker = apply_shift(x, "darker", 5)
    brighter = apply_shift(x, "brighter", 5)
    is_darker = (out == darker).flatten(1).all(1)
    is_brighter = (out == brighter).flatten(1).all(1)
    assert bool((is_darker ^ is_brighter).all()), "each sample gets exactly one shift, in its own place"
    assert 0 < int(is_darker.sum()) < 32

    g = torch.Generator().manual_seed(11)
    first = random_shifts(x, generator=g)
    assert torch.equal(first, random_shifts(x, generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(first, random_shifts(x, generator=torch.Generator().manual_seed(12)))


def test_random_shifts_uses_all_requested_severities() -> None:
    x = _images(n=64)
    out = random_shifts(x, generator=torch.Generator().manual_seed(0), names=("darker",))
    seen = set()
    for severity in SEVERITIES:
        seen |= {i for i in range(64) if torch.equal(out[i], apply_shift(x[i:i + 1], "darker", severity)[0])}
    assert seen == set(range(64))
    per_severity = [sum(torch.equal(out[i], apply_shift(x[i:i + 1], "darker", s)[0]) for i in range(64))
                    for s in SEVERITIES]
    assert all(count > 0 for count in per_severity)


@pytest.mark.parametrize("name", ["fog", "", "Blur"])
def test_unknown_shift_names_the_value_and_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'.*darker, brighter, contrast, sharpen, blur, noise"):
        apply_shift(_images(), name, 1)
    with pytest.raises(ValueError, match=f"'{name}'"):
        random_shifts(_images(), generator=None, names=("blur", name))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True])
def test_bad_severity_names_the_value(severity) -> None:
    with pytest.raises(ValueError, match=rf"1\.\.5, got {severity!r}"):
        apply_shift(_images(), "blur", severity)
    with pytest.raises(ValueError, match="severity"):
        random_shifts(_images(), generator=None, severities=(1, severity))


def test_bad_images_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(3, 8, 8\)"):
        apply_shift(torch.rand(3, 8, 8), "blur", 1)
    with pytest.raises(ValueError, match="float"):
        apply_shift(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "blur", 1)
    with pytest.raises(ValueError, match="non-empty"):
        random_shifts(_images(), generator=None, names=())
