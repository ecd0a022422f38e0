"""What is measured during training and search: accuracy (the one helper), and the proxy metrics and objective that
every epoch reports to Tune (clean accuracy of C(T(.)), PGD robust accuracy end to end, the penalised objective)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from oodray.attacks import pgd
from oodray.attacks.common import memory_batch
from oodray.config import ExperimentConfig


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 500,
             ) -> float:
    """Share of correct argmax predictions over a Dataset of (image, label) or a pair of tensors (x, y)."""
    if isinstance(data, tuple):
        x, y = data
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    else:
        batches = DataLoader(data, batch_size=batch_size)
    correct, n = 0, 0
    for xb, yb in batches:
        correct += (model(xb).argmax(1) == yb).sum().item()
        n += len(yb)
    return correct / max(1, n)


def proxy_metrics(cfg: ExperimentConfig, defended: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                  batch_size: int | None = None) -> dict[str, float]:
    """Clean accuracy of C(T(x)) and PGD robust accuracy end to end through T (and gate) and C.

    PGD runs on `batch_size` images at a time (default: `proxy_batch_size`), drawing its random starts from one
    generator in order, so that for Linf the result is the one of a single batch (L2 draws direction and radius per
    batch: the same distribution, other draws)."""
    batch_size = batch_size or proxy_batch_size(cfg, tuple(x_val.shape[1:]))
    g = torch.Generator(device=x_val.device).manual_seed(cfg.train.seed)
    x_adv = torch.cat([pgd(defended, x_val[i:i + batch_size], y_val[i:i + batch_size], eps=cfg.attack.eps,
                           norm=cfg.attack.norm, steps=cfg.train.proxy_steps, generator=g)
                       for i in range(0, len(x_val), batch_size)])
    out = {"clean_accuracy": accuracy(defended, (x_val, y_val), batch_size),
           "robust_accuracy": accuracy(defended, (x_adv, y_val), batch_size),
           "classifier_clean_accuracy": accuracy(defended.classifier, (x_val, y_val), batch_size)}
    out["objective"] = search_objective(cfg, out)
    rate = getattr(defended, "flag_rate", lambda _x: None)
    if rate(x_val[:1]) is not None:
        def chunked_rate(x: torch.Tensor) -> float:  # counts per batch (a rate is k/len exactly), then the share
            return sum(round(rate(x[i:i + batch_size]) * len(x[i:i + batch_size]))
                       for i in range(0, len(x), batch_size)) / len(x)

        out["gate_flag_rate_clean"], out["gate_flag_rate_attacked"] = chunked_rate(x_val), chunked_rate(x_adv)
    return out


def proxy_batch_size(cfg: ExperimentConfig, shape: tuple[int, ...]) -> int:
    """Images the proxy attack sends through T and C at once: what fits memory at this image size
    (`attacks.common.memory_batch`), at most `eval.batch_size` (the evaluation's attack batch)."""
    return memory_batch(shape, cfg.eval.batch_size)


def search_objective(cfg: ExperimentConfig, m: dict[str, float]) -> float:
    """Robust accuracy, penalised once clean accuracy falls more than `tune.min_clean_accuracy_drop` below C's."""
    excess = max(0.0, m["classifier_clean_accuracy"] - m["clean_accuracy"] - cfg.tune.min_clean_accuracy_drop)
    return m["robust_accuracy"] - 10.0 * excess
