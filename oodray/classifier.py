"""Trains, evaluates and caches the fixed classifier C that translators defend (the library half: fixed_classifier).

    python -m oodray.classifier --dataset digits
    python -m oodray.classifier --dataset fashion-mnist
    python -m oodray.classifier --dataset fashion-mnist --adversarial pgd --eps 0.1     # Madry baseline
    python -m oodray.classifier --dataset imagenet --data-dir /data/imagenet --set classifier.weights=IMAGENET1K_V2
    python -m oodray.classifier --dataset imagenet --data-dir /data/mine --arch resnet18 \
        --set classifier.weights=IMAGENET1K_V1 --epochs 5 --workers 8 --gpus-per-worker 1   # fine-tune, Ray Train

The classifier is saved under `<cache>/classifiers/<dataset>-<arch>-seed<seed>[-<adv>-<norm>-eps<eps>]-<digest>/`
(`classifier.pt` + `config.json`) and re-used by every later run with the same key.
"""

from __future__ import annotations

import argparse
import json
import time

from oodray.cli import add_config_args, config_from_args, end_ray, run, setup_logging
from oodray.config import check_eps, classifier_key
from oodray.data import load_dataset
from oodray.fixed_classifier import check_classifier_config, classifier_path, get_classifier, train_classifier
from oodray.metrics import accuracy

split_accuracy = accuracy  # the name earlier versions exported
__all__ = ["accuracy", "classifier_key", "classifier_path", "get_classifier", "main", "split_accuracy",
           "train_classifier"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.classifier", description=__doc__.split("\n")[0])
    add_config_args(p, dataset_default=None)
    p.add_argument("--arch", help="classifier architecture (default: the dataset's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--adversarial", choices=["none", "pgd", "trades"], help="adversarial training (baselines)")
    p.add_argument("--eps", type=float, help="adversarial-training eps (default: the dataset's attack.eps)")
    p.add_argument("--workers", type=int, help="Ray Train workers training C (0: in this process)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker")
    p.add_argument("--force", action="store_true", help="retrain even if a cached classifier exists")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    cfg = config_from_args(args, {"classifier": {"arch": args.arch, "epochs": args.epochs, "seed": args.seed,
                                                 "adversarial": args.adversarial, "adv_eps": args.eps,
                                                 "workers": args.workers, "gpus_per_worker": args.gpus_per_worker}})
    if cfg.classifier.adv_eps is not None:
        check_eps("--eps", cfg.classifier.adv_eps, cfg.attack.norm)
    check_classifier_config(cfg)  # unknown arch or weights, weights not in torchvision's cache: before reading data
    splits = load_dataset(cfg.data) if cfg.classifier.workers == 0 else None  # Ray Train workers read it themselves
    t0 = time.time()
    model, path = get_classifier(cfg, splits, force=args.force)
    end_ray()
    saved = json.loads((path.parent / "metrics.json").read_text()) if (path.parent / "metrics.json").is_file() else {}
    if saved.get("test_accuracy") is None:  # a classifier cached before metrics.json existed
        splits = splits or load_dataset(cfg.data)
        saved = {"test_accuracy": accuracy(model, splits.test), "test_examples": len(splits.test)}
    print(f"{cfg.data.name} {cfg.classifier.arch} ({classifier_key(cfg)}): clean test accuracy "
          f"{saved['test_accuracy']:.4f} on {saved['test_examples']} images [{time.time() - t0:.1f}s]")
    print(f"classifier: {path}")
    return 0


if __name__ == "__main__":
    run(main)
