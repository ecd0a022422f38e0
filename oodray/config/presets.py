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
        "tune": {"num_samples": 4, "final_top_k": 1, "refit_epochs": 6},  # the best config refit for 2x the budget
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
        # torchvision's pretrained ResNet-50, read from its cache (TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth)
        "classifier": {"arch": "resnet50", "epochs": 0, "weights": "IMAGENET1K_V2"},
        "translator": {"arch": "resnet", "downsamplings": 2, "blocks": 6, "width": 64},
        "attack": {"eps": 4 / 255, "steps": 5},
        "train": {"epochs": 10, "batch_size": 64, "proxy_examples": 500, "proxy_steps": 5},
        # 'transfer' needs a surrogate other than C: torchvision's ResNet-18 (its file in TORCH_HOME too)
        "eval": {"n_examples": 5000, "shards": 16, "surrogate_arch": "resnet18", "surrogate_weights": "IMAGENET1K_V1"},
    },
}
# A user's own ImageFolder: ImageNet's threat model and translator, but a ResNet-18 trained on it (no pretrained
# weights assumed: `--set classifier.weights=IMAGENET1K_V1` fine-tunes from torchvision's, with a new head) and the
# transfer surrogate C's recipe with another seed, so that a preset value never outlives a changed classifier.arch.
PRESETS["imagefolder"] = {
    **PRESETS["imagenet"],
    "classifier": {"arch": "resnet18", "epochs": 10},
    "eval": {"n_examples": 1000, "shards": 4},
}
