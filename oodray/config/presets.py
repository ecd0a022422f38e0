"""Dataset presets: each names the dataset's standard threat model and affordable training budgets.

Plain data (no import of the dataset registry): `oodray.config.resolve` layers a preset between the defaults
and the YAML file.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "classifier": {"arch": "tiny_cnn", "epochs": 30, "lr": 0.01},
        "translator": {"arch": "tiny"},
        "attack": {"eps": 0.1, "steps": 5},
        "train": {"epochs": 1, "batch_size": 32, "proxy_examples": 32, "proxy_steps": 3},
        "eval": {"n_examples": 32, "shards": 2},
    },
    "digits": {
        "classifier": {"arch": "small_cnn", "epochs": 30, "batch_size": 64},
        "translator": {"arch": "unet", "depth": 2, "width": 16},
        "attack": {"eps": 0.2, "steps": 10},
        "train": {"epochs": 3, "batch_size": 64, "proxy_examples": 180},
        "eval": {"n_examples": 200, "shards": 2},
        "tune": {"num_samples": 4, "final_top_k": 1},
    },
    # Sized for a 2-core CPU machine (search + final AutoAttack: 84 min there): 60 batches of 128 per epoch,
    # U-Nets of width 8-16, PGD only; a GPU cluster lifts max_batches and widens the space.
    "fashion-mnist": {
        "classifier": {"arch": "small_cnn", "epochs": 8},
        "translator": {"arch": "unet", "depth": 2, "width": 16},
        "attack": {"eps": 0.1, "steps": 10},
        "train": {"epochs": 4, "batch_size": 128, "proxy_examples": 500, "max_batches": 60},
        "eval": {"n_examples": 1000, "shards": 2},
        "tune": {"num_samples": 6, "final_top_k": 1,
                 "space": {"translator.arch": ["unet"], "translator.width": [8, 16], "attack.attacks": ["pgd"],
                           "attack.eps_mix": ["eps"]}},
    },
    "mnist": {
        "classifier": {"arch": "small_cnn", "epochs": 8},
        "translator": {"arch": "unet", "depth": 2, "width": 32},
        "attack": {"eps": 0.3, "steps": 20},
        "train": {"epochs": 10, "batch_size": 128, "proxy_examples": 500},
        "eval": {"n_examples": 1000},
    },
    "cifar10": {
        "classifier": {"arch": "resnet18_cifar", "epochs": 60, "lr": 1e-3, "batch_size": 256},
        "translator": {"arch": "unet", "depth": 3, "width": 64},
        "attack": {"eps": 8 / 255, "steps": 10},
        "train": {"epochs": 30, "batch_size": 128, "proxy_examples": 1000},
        "eval": {"n_examples": 1000, "norms": ["Linf"], "eps": [8 / 255]},
    },
    "imagenet": {
        "classifier": {"arch": "resnet50", "epochs": 0},
        "translator": {"arch": "resnet", "downsamplings": 2, "blocks": 6, "width": 64},
        "attack": {"eps": 4 / 255, "steps": 5},
        "train": {"epochs": 10, "batch_size": 64, "proxy_examples": 500, "proxy_steps": 5},
        "eval": {"n_examples": 5000, "shards": 16},
    },
}
PRESETS["imagefolder"] = PRESETS["imagenet"]  # one builder, two names: a user's own ImageFolder starts as ImageNet
