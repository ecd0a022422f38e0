"""The fixed classifier C that translators defend: trained once (plain or adversarial: PGD-AT, TRADES), cached, frozen.

The classifier is saved under `<cache>/classifiers/<classifier_key>/` (`classifier.pt` + `config.json` +
`metrics.json`) and re-used by every later run with the same key. C is trained once and frozen, in the calling
process (`classifier.workers=0`, small datasets on CPU) or as a Ray Train job (`classifier.workers` DDP workers,
`classifier.gpus_per_worker` GPUs each: fine-tuning a pretrained torchvision model on an ImageFolder dataset).
`python -m oodray.classifier` is the CLI.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from oodray.attacks import pgd
from oodray.compute import Compute, classifier_step_passes
from oodray.config import ExperimentConfig, classifier_key, save_config
from oodray.data import DatasetInfo, Splits, load_dataset
from oodray.errors import CheckpointError, ConfigError, RunFailed
from oodray.io import atomic_write_text, ensure_writable_dir, load_checkpoint, save_checkpoint
from oodray.metrics import accuracy
from oodray.models.classifier import (
    CLASSIFIERS,
    Classifier,
    build_classifier,
    check_arch,
    check_weights,
    freeze,
    load_classifier,
    save_classifier,
)
from oodray.runtime import (
    amp_autocast,
    fast_layout,
    init_ray_for,
    quiet_train_reports,
    train_logging,
    use_channels_last,
)
from oodray.storage import is_uri, storage_uri

log = logging.getLogger(__name__)


PROGRESS = "training.pt"  # an in-process training's state after its last finished epoch, beside classifier.pt


def classifier_path(cfg: ExperimentConfig) -> Path:
    return cfg.resolved_cache_dir() / "classifiers" / classifier_key(cfg) / "classifier.pt"


def train_classifier(cfg: ExperimentConfig, splits: Splits, compute: Compute | None = None,
                     progress: Path | None = None) -> Classifier:
    """Adam on cross-entropy; with `classifier.adversarial` = pgd (Madry) or trades, on PGD examples. The training
    compute (examples, passes: adv_steps + 1 per example when adversarial, wall seconds) is added to `compute`.

    With `progress` (a file), the state after every epoch (weights, optimizer, scheduler, random generators, compute
    so far) is written there atomically, and a run that finds it resumes after that epoch: an interrupted
    adversarial training loses at most one epoch, and the resumed run ends with the same weights as an uninterrupted
    one. The caller removes the file once the classifier is saved."""
    c = cfg.classifier
    compute = compute if compute is not None else Compute()
    passes = classifier_step_passes(c.adversarial, c.adv_steps)
    torch.manual_seed(c.seed)
    model = build_classifier(c.arch, splits.info, c.weights)
    if c.epochs == 0 and model.new_head:
        raise ConfigError(f"classifier.weights={c.weights} has {model.new_head} classes and "
                          f"'{splits.info.name}' has {splits.info.num_classes}: the new head is random until trained; "
                          "fine-tune it with classifier.epochs > 0 (e.g. --epochs 5)")
    if c.epochs == 0:
        return freeze(model)
    model = fast_layout(model, use_channels_last(cfg.train.channels_last, "cpu", splits.info.image_size))
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
    g = torch.Generator().manual_seed(c.seed)
    loader = DataLoader(splits.train, batch_size=c.batch_size, shuffle=True, generator=g, drop_last=False)
    eps = c.adv_eps or cfg.attack.eps
    start = _resume_epoch(progress, model, opt, sched, g, compute) if progress is not None else 0
    for epoch in range(start, c.epochs):
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for x, y in loader:
            if c.adversarial == "none":
                loss = F.cross_entropy(model(x), y)
            else:
                loss = _adversarial_loss(model, x, y, c.adversarial, eps, cfg.attack.norm, c.adv_steps,
                                         c.trades_beta, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
            compute.add(len(y), passes)
        compute.add_time(time.time() - t0, 1.0)  # one process
        sched.step()
        model.eval()
        log.info("classifier epoch %d/%d loss %.4f val acc %.4f (%.1fs)", epoch + 1, c.epochs, total / n,
                 accuracy(model, splits.val), time.time() - t0)
        if progress is not None:
            save_checkpoint({"state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "generator": g.get_state(),
                             "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                             "metrics": compute.to_metrics()}, progress)
    # back to NCHW: the C returned here is the C every later load of the cache file gives (same layout, same rounding)
    return freeze(model.to(memory_format=torch.contiguous_format))


def _resume_epoch(progress: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, g: torch.Generator, compute: Compute) -> int:
    """Loads `progress` (written by train_classifier after an epoch) into the training state; returns the epoch to
    start from (0 when there is no file). The file lives in the classifier's cache directory, whose name is the hash
    of the config (epochs included), so it belongs to this very training; a file that cannot be read is a one-line
    error naming it."""
    if not progress.exists():
        return 0
    try:
        state = load_checkpoint(progress, what="interrupted classifier training")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; delete it to start this training over") from None
    start, done = _restore_training(state, model, opt, sched)
    g.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    compute.merge(done)  # the epochs done before the interruption
    log.info("classifier training resumed after epoch %d from %s", start, progress)
    return start


def _restore_training(state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, Compute]:
    """A training checkpoint (in-process or Ray Train) loaded into model, optimizer and scheduler: the epochs it had
    finished, and the compute they spent."""
    model.load_state_dict(state["state_dict"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["epoch"]), Compute.from_metrics(state.get("metrics"))


def _adversarial_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, eps: float, norm: str,
                      steps: int, beta: float, g: torch.Generator, craft: torch.nn.Module | None = None,
                      ) -> torch.Tensor:
    """`craft` (default `model`) makes the adversarial examples: the plain module when `model` is DDP-wrapped."""
    craft = craft or model
    model.eval()  # craft with fixed dropout/BN, as in Madry et al.'s reference code
    if kind == "pgd":
        x_adv = pgd(craft, x, y, eps=eps, norm=norm, steps=steps, generator=g)
        model.train()
        return F.cross_entropy(model(x_adv), y)
    # TRADES: CE on clean + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL term.
    with torch.no_grad():
        p_clean = F.softmax(craft(x), 1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=g).to(x.device)).clamp(0, 1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(craft(x_adv), 1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        if norm == "Linf":
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
        else:
            gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            d = x_adv.detach() + step * grad / gn - x
            dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x_adv = (x + d * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)).clamp(0, 1)
    model.train()
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1),
                                                        reduction="batchmean")


def check_classifier_config(cfg: ExperimentConfig) -> None:
    """Refuses a classifier that cannot be built or would be meaningless, before any data is read or Ray starts: an
    unknown architecture or weights name, weights not in torchvision's cache, and a torchvision architecture with
    random weights that is not trained (`classifier.epochs=0` without `classifier.weights`)."""
    c = cfg.classifier
    check_arch(c.arch)
    check_weights(c.arch, c.weights)
    if c.epochs == 0 and not c.weights and c.arch not in CLASSIFIERS:
        raise ConfigError(f"classifier.epochs=0 keeps {c.arch}'s random weights; give pretrained ones "
                          "(--set classifier.weights=IMAGENET1K_V2, another torchvision weights name, or a file) "
                          "or train it (classifier.epochs > 0)")


def surrogate_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config of the transfer attacker's surrogate: C's recipe with `classifier.seed + 1`, on
    `eval.surrogate_arch`/`eval.surrogate_weights` when set. A surrogate that would be C itself is refused (one line)
    before any work: an untrained pretrained C (`classifier.epochs=0` with weights) does not change with the seed,
    and 'transfer' would then be a white-box attack on C. (Untrained random weights do: they are drawn from the
    seed.)"""
    c, e = cfg.classifier, cfg.eval
    over: dict[str, object] = {"classifier.seed": c.seed + 1}
    if e.surrogate_arch is not None:
        over["classifier.arch"] = e.surrogate_arch
    if e.surrogate_weights is not None:
        over["classifier.weights"] = e.surrogate_weights
    s = cfg.replace(**over)
    if s.classifier.epochs == 0 and c.weights is not None and (s.classifier.arch, s.classifier.weights) == (
            c.arch, c.weights):
        raise ConfigError(f"the 'transfer' surrogate would be C itself: classifier.epochs=0 keeps {c.arch}'s "
                          f"{c.weights or 'initial'} weights whatever the seed; name another model (--set "
                          "eval.surrogate_arch=resnet18 --set eval.surrogate_weights=IMAGENET1K_V1), train C "
                          "(classifier.epochs > 0), or leave 'transfer' out of eval.threat_models")
    return s


def get_classifier(cfg: ExperimentConfig, splits: Splits | None = None, *, train: bool = True,
                   force: bool = False) -> tuple[Classifier, Path]:
    """The cached fixed classifier for this config, trained (and cached) first if missing."""
    check_arch(cfg.classifier.arch)  # an unknown name fails here, before data is read or Ray starts
    path = classifier_path(cfg)
    if path.exists() and not force:
        model, _ = load_classifier(path, expect_dataset=cfg.data.name, expect_arch=cfg.classifier.arch)
        return model, path
    if not train:
        raise ConfigError(f"no fixed classifier at '{path}'; train it with: python -m oodray.classifier "
                          f"--dataset {cfg.data.name}")
    check_classifier_config(cfg)
    ensure_writable_dir(path.parent, "classifier cache directory")
    progress = path.parent / PROGRESS
    if force:
        progress.unlink(missing_ok=True)  # retrain from scratch, not from an interrupted run's epoch
    t0 = time.time()
    if cfg.classifier.workers > 0 and cfg.classifier.epochs > 0:
        model, metrics = train_classifier_ray(cfg)  # accuracies and compute measured by the workers
        test_acc = metrics["test_accuracy"]
    else:
        splits = splits or load_dataset(cfg.data)
        compute = Compute()
        model = train_classifier(cfg, splits, compute, progress=progress)
        test_acc = accuracy(model, splits.test)
        metrics = {"test_accuracy": test_acc, "val_accuracy": accuracy(model, splits.val),
                   "test_examples": len(splits.test), **compute.to_metrics()}
    metrics["train_seconds"] = round(time.time() - t0, 1)
    save_classifier(model, path, cfg.to_dict(), metrics)
    save_config(cfg, path.parent)
    atomic_write_text(path.parent / "metrics.json", json.dumps(metrics, indent=2))
    progress.unlink(missing_ok=True)
    log.info("saved fixed classifier to %s (test acc %.4f)", path, test_acc)
    return model, path


# --- training C with Ray Train (DDP over workers, GPUs when granted) -------------------------------------------------

CHECKPOINT = "classifier.pt"


@torch.no_grad()
def _accuracy_on(model: torch.nn.Module, data: Any, device: torch.device, batch_size: int) -> float:
    correct, n = 0, 0
    for xb, yb in DataLoader(data, batch_size=batch_size):
        correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
        n += len(yb)
    return correct / max(1, n)


def classifier_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: C (seeded identically on every rank, so the new head agrees) wrapped in DDP,
    a DistributedSampler over the training split, bf16 autocast on CUDA (train.amp), channels_last
    (train.channels_last), a checkpoint per epoch (weights, optimizer, scheduler, epoch) that a restarted worker group
    resumes from."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    quiet_train_reports(cfg.train.ray_log_level)
    c = cfg.classifier
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(c.cpus_per_worker)))
    splits = load_dataset(cfg.data)
    torch.manual_seed(c.seed)
    model = build_classifier(c.arch, splits.info, c.weights)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
    start, compute = 0, Compute()  # cumulative, resumes included
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT, what="classifier training checkpoint")
        start, compute = _restore_training(state, model, opt, sched)
    passes = classifier_step_passes(c.adversarial, c.adv_steps)
    use_amp = cfg.train.amp and device.type == "cuda"
    raw = fast_layout(model, use_channels_last(cfg.train.channels_last, device, splits.info.image_size))
    ddp = ray.train.torch.prepare_model(raw)  # to the device; DDP when world > 1
    raw = ddp.module if hasattr(ddp, "module") else ddp
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=c.seed)
    # a last partial batch of one image would fail BatchNorm in training mode; drop it when a full batch exists
    loader = DataLoader(splits.train, batch_size=c.batch_size, sampler=sampler, drop_last=len(sampler) > c.batch_size)
    eps = c.adv_eps or cfg.attack.eps
    g = torch.Generator()
    for epoch in range(start, c.epochs):
        sampler.set_epoch(epoch)
        g.manual_seed(c.seed * 1_000_003 + 1_009 * epoch + rank)
        t0, total, n = time.time(), 0.0, 0
        ddp.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp_autocast(device, use_amp):
                if c.adversarial == "none":
                    loss = F.cross_entropy(ddp(x), y)
                else:
                    loss = _adversarial_loss(ddp, x, y, c.adversarial, eps, cfg.attack.norm, c.adv_steps,
                                             c.trades_beta, g, craft=raw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        sched.step()
        ddp.eval()
        compute.add(n * world, passes)  # every rank sees an equal share (DistributedSampler)
        compute.add_time(time.time() - t0, world * (c.gpus_per_worker or c.cpus_per_worker))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": total / max(1, n), "epoch_seconds": time.time() - t0,
                                   "world_size": world, **compute.to_metrics()}
        if rank == 0:
            metrics["val_accuracy"] = _accuracy_on(raw, splits.val, device, c.batch_size)
            if epoch + 1 == c.epochs:
                metrics["test_accuracy"] = _accuracy_on(raw, splits.test, device, c.batch_size)
                metrics["test_examples"] = len(splits.test)
            log.info("classifier epoch %d/%d loss %.4f val acc %.4f (%.1fs, %d worker(s))", epoch + 1, c.epochs,
                     metrics["loss"], metrics["val_accuracy"], metrics["epoch_seconds"], world)
            with tempfile.TemporaryDirectory() as tmp:
                sd = {k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}
                i = splits.info
                info = {"name": i.name, "num_classes": i.num_classes, "channels": i.channels,
                        "image_size": list(i.image_size), "mean": list(i.mean), "std": list(i.std)}
                save_checkpoint({"state_dict": sd, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "epoch": epoch + 1, "metrics": metrics, "info": info},
                                Path(tmp) / CHECKPOINT)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def train_classifier_ray(cfg: ExperimentConfig) -> tuple[Classifier, dict[str, Any]]:
    """Trains C as a Ray Train job (`classifier.workers` x `classifier.gpus_per_worker` GPUs) and returns it frozen
    with the metrics its rank 0 measured. The run lives under `<storage>/classifier-<classifier_key>`, so a re-run
    after a failure resumes from its last epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    c = cfg.classifier
    bundle = {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}
    init_ray_for(c.workers * c.cpus_per_worker, c.workers * c.gpus_per_worker,
                 f"training the classifier with {c.workers} worker(s) x {c.cpus_per_worker:g} CPU, "
                 f"{c.gpus_per_worker:g} GPU", bundles=[bundle] * c.workers)
    storage = storage_uri(cfg.storage)
    if not is_uri(storage):
        ensure_writable_dir(storage, "storage path")
    trainer = TorchTrainer(
        classifier_loop_per_worker, train_loop_config={"config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
            resources_per_worker={k: v for k, v in bundle.items() if v > 0}),
        run_config=ray.train.RunConfig(
            name=f"classifier-{classifier_key(cfg)}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            **train_logging(cfg.train.ray_log_level)))
    result = trainer.fit()
    if result.error:
        raise RunFailed(f"training the classifier failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT, what="classifier training checkpoint")
    i = state["info"]
    model = build_classifier(c.arch, DatasetInfo(i["name"], i["num_classes"], i["channels"], tuple(i["image_size"]),
                                                 tuple(i["mean"]), tuple(i["std"])))
    model.load_state_dict(state["state_dict"])
    m = result.metrics or {}
    return freeze(model), {"test_accuracy": m.get("test_accuracy"), "val_accuracy": m.get("val_accuracy"),
                           "test_examples": m.get("test_examples"), "workers": c.workers,
                           "gpus_per_worker": c.gpus_per_worker, **{k: v for k, v in m.items()
                                                                    if k.startswith("compute_")}}
