"""A toy ImageNet: an ImageFolder of real JPEG files with class-dependent content, for tests and benchmarks.

    from oodray.toydata import make_toy_imagefolder
    make_toy_imagefolder("/tmp/toy", classes=10, per_class=30, val_per_class=5, size=64)

Each class has its own colour and stripe pattern (orientation and frequency); every image adds a random phase, a
random brightness and pixel noise, so a small CNN learns the classes in a few epochs but no two images are the same.
Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_toy_imagefolder(root: str | Path, classes: int = 10, per_class: int = 20, val_per_class: int = 5,
                         size: int = 96, seed: int = 0, quality: int = 90) -> Path:
    """Writes `root/{train,val}/class_XX/NNNNN.JPEG` (per_class train and val_per_class val images of size x size);
    returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.15, 0.85, (classes, 3))
    angles = rng.permutation(classes) * np.pi / classes
    freqs = 2 + (np.arange(classes) % 3) * 2
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                phase = rng.uniform(0, 2 * np.pi)
                t = np.cos(angles[c]) * xx + np.sin(angles[c]) * yy
                stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freqs[c] * t + phase)
                img = colours[c] * (0.6 + 0.4 * stripes[..., None]) * rng.uniform(0.8, 1.2)
                img = img + rng.normal(0, 0.06, (size, size, 3))
                pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:05d}.JPEG", quality=quality)
    return root
