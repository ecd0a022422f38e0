"""What is measured during training and search: accuracy (the one helper), and the proxy metrics and objective that
every epoch reports to Tune (clean accuracy of C(T(.)), PGD robust accuracy end to end, the penalised objective)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from oodray.attacks import pgd
from oodray.attacks.common import _random_start, memory_batch
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
        correct += _correct(model, xb, yb)
        n += len(yb)
    return correct / max(1, n)


def proxy_metrics(cfg: ExperimentConfig, defended: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                  batch_size: int | None = None) -> dict[str, float]:
    """Clean accuracy of C(T(x)) and PGD robust accuracy end to end through T (and gate) and C, in one process:
    `proxy_counts` over the whole set, then `proxy_from_counts`."""
    return proxy_from_counts(cfg, proxy_counts(cfg, defended, x_val, y_val, batch_size), is_gated(defended))


PROXY_COUNTS = ("examples", "clean", "robust", "classifier_clean", "flagged_clean", "flagged_attacked")


def is_gated(defended: torch.nn.Module) -> bool:
    return getattr(defended, "gate", None) is not None


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum().item())


def proxy_counts(cfg: ExperimentConfig, defended: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                 batch_size: int | None = None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of the proxy evaluation: float64 counts in the order of `PROXY_COUNTS` (flag counts 0
    without a gate). Summed over the ranks (an all-reduce) they are the one-process counts.

    PGD runs on `batch_size` images at a time (default: `proxy_batch_size`), drawing its random starts from one
    generator in batch order, so that for Linf the result is the one of a single batch (L2 draws direction and radius
    per batch: the same distribution, other draws). With `world` ranks, batch i of n goes to rank i * world // n; a
    rank draws (and drops) the random starts of the batches before its own, so it attacks its batches from the very
    starts one process would: every split of the work gives the same counts."""
    batch_size = batch_size or proxy_batch_size(cfg, tuple(x_val.shape[1:]))
    g = torch.Generator(device=x_val.device).manual_seed(cfg.train.seed)
    starts = range(0, len(x_val), batch_size)
    counts = torch.zeros(len(PROXY_COUNTS), dtype=torch.float64)
    for i, s in enumerate(starts):
        owner = i * world // len(starts)
        if owner > rank:
            break
        xb, yb = x_val[s:s + batch_size], y_val[s:s + batch_size]
        if owner < rank:
            _random_start(xb, cfg.attack.eps, cfg.attack.norm, g)  # the draws of a batch an earlier rank attacks
            continue
        x_adv = pgd(defended, xb, yb, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=cfg.train.proxy_steps,
                    generator=g)
        n = len(yb)
        flags = [0, 0]
        if is_gated(defended):  # a rate is k / n exactly: back to the count
            flags = [round(defended.flag_rate(xb) * n), round(defended.flag_rate(x_adv) * n)]
        counts += torch.tensor([n, _correct(defended, xb, yb), _correct(defended, x_adv, yb),
                                _correct(defended.classifier, xb, yb), *flags], dtype=torch.float64)
    return counts


def proxy_metrics_over_ranks(cfg: ExperimentConfig, defended: torch.nn.Module, x_val: torch.Tensor,
                             y_val: torch.Tensor, rank: int, world: int, device: torch.device) -> dict[str, float]:
    """The proxy metrics of the whole set on every rank of a process group, each attacking its share (`proxy_counts`),
    the counts all-reduced on `device` (NCCL needs them on the GPU)."""
    counts = proxy_counts(cfg, defended, x_val, y_val, rank=rank, world=world)
    if world > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
    return proxy_from_counts(cfg, counts.cpu(), is_gated(defended))


def proxy_from_counts(cfg: ExperimentConfig, counts: torch.Tensor, gated: bool) -> dict[str, float]:
    """The proxy metrics from the counts of all ranks (see `proxy_counts`), with the search objective and the number
    of images they are measured on (`proxy_examples`: what a difference between two trials' figures is worth)."""
    c = dict(zip(PROXY_COUNTS, counts.tolist(), strict=True))
    n = max(1.0, c["examples"])
    out = {"clean_accuracy": c["clean"] / n, "robust_accuracy": c["robust"] / n,
           "classifier_clean_accuracy": c["classifier_clean"] / n, "proxy_examples": int(c["examples"])}
    out["objective"] = search_objective(cfg, out)
    if gated:
        out["gate_flag_rate_clean"], out["gate_flag_rate_attacked"] = c["flagged_clean"] / n, c["flagged_attacked"] / n
    return out


def proxy_batch_size(cfg: ExperimentConfig, shape: tuple[int, ...]) -> int:
    """Images the proxy attack sends through T and C at once: what fits memory at this image size
    (`attacks.common.memory_batch`), at most `eval.batch_size` (the evaluation's attack batch)."""
    return memory_batch(shape, cfg.eval.batch_size)


def search_objective(cfg: ExperimentConfig, m: dict[str, float]) -> float:
    """Robust accuracy, penalised once clean accuracy falls more than `tune.min_clean_accuracy_drop` below C's."""
    excess = max(0.0, m["classifier_clean_accuracy"] - m["clean_accuracy"] - cfg.tune.min_clean_accuracy_drop)
    return m["robust_accuracy"] - 10.0 * excess
