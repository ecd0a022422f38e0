"""Trains one translator T in front of the fixed classifier C with Ray Train (data parallel, DDP).

    python -m oodray.train                                   # digits, embedded default
    python -m oodray.train --dataset fashion-mnist --workers 2
    python -m oodray.train --config experiments/digits.yaml --set train.regime=adaptive --set loss.ce=1

Three layers, each taking one plain dict: `train_loop_per_worker` (runs on every Ray Train worker), `fit_translator`
(builds the `TorchTrainer`; Tune's trial driver calls it too) and the CLI. Each epoch reports the loss terms, the
clean accuracy of C(T(x)) and a proxy robust accuracy (PGD end to end through T and C on a fixed validation
subset), with a checkpoint holding T, the optimizer(s), the epoch and the resolved config. A re-run with the same
name resumes from its latest checkpoint; worker failures are retried from it (`FailureConfig`).

Here: the worker loop and one training step, the driver-side preparation (`prepare_run`: fixed classifier and oblivious
cache), the `TorchTrainer` (`fit_translator`) and the CLI. The checkpoint format lives in `models.translator`, the
proxy metrics in `metrics`, Ray start-up in `runtime`; their old names stay importable from here.

ray is imported inside the functions that use it (heavy import).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from oodray.attacks import attack_specs, mixed_attack
from oodray.cache import ObliviousCache, build_oblivious_cache, check_cache_space
from oodray.cli import add_config_args, config_from_args, end_ray, run, setup_logging
from oodray.compute import Compute, attack_passes, translator_step_passes
from oodray.config import ExperimentConfig, classifier_key, config_hash, save_config
from oodray.data import eval_subset, is_streamed, load_dataset, stack
from oodray.errors import CheckpointError, ConfigError, DataError, RunFailed
from oodray.fixed_classifier import get_classifier
from oodray.imagefolder import one_line
from oodray.io import ensure_writable_dir, fsync_dir, load_checkpoint, safe_child, save_checkpoint
from oodray.locks import hold as hold_lock
from oodray.losses import PatchDiscriminator, TranslatorObjective, discriminator_loss
from oodray.metrics import proxy_metrics, proxy_metrics_over_ranks
from oodray.models.classifier import classifier_from_state
from oodray.models.defended import DefendedModel, MahalanobisGate, gate_from_state, gate_state, load_defended
from oodray.models.translator import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    build_translator,
    checkpoint_dirs,
    load_translator_checkpoint,
)
from oodray.runtime import (
    amp_autocast,
    fast_layout,
    init_ray,
    init_ray_for,
    pin_ray_address,
    quiet_train_reports,
    train_logging,
    use_channels_last,
)
from oodray.shifts import random_shifts
from oodray.storage import is_uri, storage_uri

log = logging.getLogger(__name__)
GATE_EXAMPLES = 5000  # training and validation images the OOD gate is fitted on (at most; a seeded subset of val)
# Names that moved to the modules they belong to, kept importable from here.
__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "PairedImages", "attack_specs", "check_resumable", "config_hash",
           "fit_translator", "init_ray", "load_defended", "load_translator_checkpoint", "main", "pin_ray_address",
           "prepare_run", "proxy_metrics", "run_name", "storage_uri", "train_loop_per_worker", "train_step"]


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.name or f"train-{cfg.data.name}-{cfg.translator.arch}-{config_hash(cfg)}"


class PairedImages(Dataset):
    """(clean image, cached oblivious OOD image, label) for each training example. Without a cache (the adaptive
    regime crafts its OOD inputs on the fly) the second item is an empty placeholder, not a second copy of the image:
    a decode process would otherwise ship every image twice."""

    def __init__(self, base: Dataset, ood: ObliviousCache | torch.Tensor | None) -> None:
        self.base, self.ood = base, ood

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.base[i]
        return x, (self.ood[i].float() if self.ood is not None else NO_CACHE), y


NO_CACHE = torch.empty(0)


def ood_batch(cfg: ExperimentConfig, defended_eval: torch.nn.Module, x: torch.Tensor, x_cached: torch.Tensor,
              y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The batch's OOD inputs: cached oblivious attacks or fresh end-to-end ones, part replaced by natural shifts."""
    if cfg.train.regime == "adaptive":
        x_ood = mixed_attack(defended_eval, x, y, attack_specs(cfg), generator=g)
    else:
        x_ood = x_cached
    n_shift = int(round(cfg.attack.shift_fraction * len(x)))
    if n_shift:
        idx = torch.randperm(len(x), generator=g)[:n_shift].to(x.device)
        x_ood = x_ood.clone()
        x_ood[idx] = random_shifts(x[idx], generator=g)
    return x_ood


def train_step(cfg: ExperimentConfig, translator: torch.nn.Module, classifier: torch.nn.Module, gate: Any,
               objective: Any, opts: tuple[Any, Any], disc: torch.nn.Module | None,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], g: torch.Generator, use_amp: bool,
               ) -> dict[str, float]:
    """One optimisation step of T (and of the discriminator): OOD batch, weighted objective, backward, step."""
    x, x_cached, y = batch
    raw_t = translator.module if hasattr(translator, "module") else translator
    raw_t.eval()  # attacks (adaptive regime) see T in eval mode
    x_ood = ood_batch(cfg, DefendedModel(classifier, raw_t, gate), x, x_cached, y, g)
    translator.train()
    with amp_autocast(x.device, use_amp):  # bf16 on CUDA only: on CPU this is full precision whatever use_amp says
        loss, terms, t_ood = objective(translator, x, x_ood, y)
    opt, opt_d = opts
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if disc is not None:
        d_loss = discriminator_loss(disc, x, t_ood)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        terms["discriminator"] = float(d_loss.detach())
    terms["total"] = float(loss.detach())
    return terms


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: rebuild the typed config, train T with DDP, report + checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    entered = time.time()
    cfg = ExperimentConfig.from_dict(loop_config["config"])
    quiet_train_reports(cfg.train.ray_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Intra-op threads = the CPUs Ray granted, set here rather than left to OMP_NUM_THREADS: a worker that imported
    # torch before Ray applied it (e.g. through a setup hook) would otherwise use every core of the machine.
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    splits = load_dataset(cfg.data)
    classifier = classifier_from_state(_resolve(loop_config["classifier"])).to(device)  # frozen, never DDP-wrapped
    translator = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    layout = use_channels_last(cfg.train.channels_last, device, splits.info.image_size)
    classifier, translator = fast_layout(classifier, layout), fast_layout(translator, layout)
    disc = (fast_layout(PatchDiscriminator(splits.info.channels, splits.info.image_size), layout)
            if cfg.loss.gan > 0 else None)
    opt = torch.optim.Adam(translator.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999)) if disc else None
    gate = None
    start_epoch = 0
    replay = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_translator_checkpoint(Path(d) / CHECKPOINT_FILE)
        translator.load_state_dict(state["translator"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None and state.get("discriminator"):
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["discriminator_optimizer"])
        if state.get("gate"):
            gate = gate_from_state(state["gate"])
        start_epoch = state["epoch"]
        replay = state.get("metrics")
        log.info("rank %d resumed from epoch %d", rank, start_epoch)
    x_val, y_val = (t.to(device) for t in eval_subset(splits.val, min(cfg.train.proxy_examples, len(splits.val)),
                                                        cfg.data.seed))
    if cfg.translator.gate and gate is None:
        x_tr, y_tr = stack(splits.train, range(min(len(splits.train), GATE_EXAMPLES)))
        x_v, _ = eval_subset(splits.val, min(len(splits.val), GATE_EXAMPLES), cfg.data.seed)  # a percentile: any order
        gate = MahalanobisGate.fit(classifier.cpu(), x_tr, x_v, cfg.translator.gate_percentile, y_train=y_tr)
        classifier.to(device)
    if gate is not None:
        gate.to(device)
    translator = ray.train.torch.prepare_model(translator)  # DDP when world > 1
    if disc is not None:
        disc = ray.train.torch.prepare_model(disc)
    raw_t = translator.module if hasattr(translator, "module") else translator
    ood = ObliviousCache(loop_config["oblivious"]) if loop_config.get("oblivious") is not None else None
    data = PairedImages(splits.train, ood)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    loader = training_loader(cfg, data, sampler, device, streamed=is_streamed(splits.train))
    objective = TranslatorObjective(cfg.loss, classifier, disc)
    use_amp = cfg.train.amp and device.type == "cuda"
    g = torch.Generator(device="cpu")
    compute = Compute.from_metrics(replay)  # cumulative over the run, resumes included
    # Cumulative seconds of rank 0's steps: a run keeps only its last checkpoints (and their metrics), so where a whole
    # fit's time went is read from the last report (benchmarks/spread.fit_split), not summed over the kept ones.
    totals = {k: float((replay or {}).get(f"{k}_seconds_total", 0.0)) for k in ("train", "proxy", "checkpoint_write")}
    passes_per_example = translator_step_passes(cfg.train.regime, attack_specs(cfg), tuple(cfg.loss.weights()))
    devices_per_worker = cfg.train.gpus_per_worker or cfg.train.cpus_per_worker
    setup_seconds = time.time() - entered
    if replay is not None:
        # A checkpoint can be saved before its result reaches Tune (a stop or a crash in between): report the resumed
        # epoch's metrics again, so that a scheduler judges that epoch as an uninterrupted run would (ASHA keys its
        # rungs by trial, so a result it has already seen changes nothing).
        ray.train.report({**replay, "replayed": True} if rank == 0 else {})
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        # Seeded per (rank, epoch), not once: a run resumed at epoch k draws what an uninterrupted one draws there.
        g.manual_seed(epoch_seed(cfg.train.seed, rank, epoch))
        torch.manual_seed(epoch_seed(cfg.train.seed, rank, epoch))  # dropout and other global draws
        sampler.set_epoch(epoch)
        for group in opt.param_groups:  # set from the epoch alone, so a resumed run follows the same schedule
            group["lr"] = epoch_lr(cfg.train, epoch)
        translator.train()
        sums: dict[str, float] = {}
        n_batches = n_examples = 0
        data_seconds = 0.0
        fetched = time.time()
        for b, (x, x_cached, y) in enumerate(one_line_errors(loader)):
            data_seconds += time.time() - fetched
            if cfg.train.max_batches is not None and b >= cfg.train.max_batches:
                break
            x = x.to(device, non_blocking=True)
            x_cached = x_cached.to(device, non_blocking=True) if x_cached.numel() else x  # no cache: x, as before
            batch = (x, x_cached, y.to(device, non_blocking=True))
            terms = train_step(cfg, translator, classifier, gate, objective, (opt, opt_d), disc, batch, g, use_amp)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
            n_examples += len(y)
            fetched = time.time()
        train_seconds = time.time() - t0
        metrics: dict[str, Any] = {f"loss_{k}": v / max(1, n_batches) for k, v in sums.items()}
        # Examples seen by all workers: rank 0's count x world (the DistributedSampler gives every rank equal shares).
        compute.add(n_examples * world, passes_per_example)
        metrics.update(epoch=epoch + 1, epoch_seconds=train_seconds, train_seconds=train_seconds,
                       data_seconds=data_seconds, setup_seconds=setup_seconds,
                       train_examples=n_examples * world, world_size=world, worker_started_at=entered,
                       resumed_from_epoch=start_epoch, node_id=ray.get_runtime_context().get_node_id(),
                       cache_passes=loop_config.get("cache_passes", 0.0), channels_last=layout)
        # The proxy evaluation, split over the ranks (each attacks its batches of the fixed set, the counts summed):
        # every rank gets the one-process figures, in 1/world of the time.
        raw_t.eval()
        t_proxy = time.time()
        metrics.update(proxy_metrics_over_ranks(cfg, DefendedModel(classifier, raw_t, gate), x_val, y_val, rank, world,
                                                device))
        metrics["proxy_seconds"] = time.time() - t_proxy
        if rank == 0:
            totals["train"] += train_seconds
            totals["proxy"] += metrics["proxy_seconds"]
            metrics.update({f"{k}_seconds_total": v for k, v in totals.items()})  # saved in the checkpoint: resumes
            metrics["epoch_seconds"] = time.time() - t0
            compute.add_time(metrics["epoch_seconds"], devices_per_worker * world)
            metrics.update(compute.to_metrics())
            t_ckpt = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": cfg.to_dict(),
                    "translator": raw_t.state_dict(), "optimizer": opt.state_dict(),
                    "discriminator": (disc.module if hasattr(disc, "module") else disc).state_dict() if disc else None,
                    "discriminator_optimizer": opt_d.state_dict() if opt_d else None,
                    "gate": gate_state(gate), "metrics": metrics,
                    "classifier_key": loop_config.get("classifier_key"),
                }, Path(tmp) / CHECKPOINT_FILE)
                metrics["checkpoint_write_seconds"] = time.time() - t_ckpt
                totals["checkpoint_write"] += metrics["checkpoint_write_seconds"]
                metrics["checkpoint_write_seconds_total"] = totals["checkpoint_write"]
                metrics["reported_at"] = time.time()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def epoch_lr(t: Any, epoch: int) -> float:
    """The learning rate of an epoch: `train.lr`, cosine-annealed over `train.epochs` when `train.lr_schedule` says."""
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs))
    return t.lr


def training_loader(cfg: ExperimentConfig, data: Dataset, sampler: DistributedSampler, device: torch.device, *,
                    streamed: bool) -> DataLoader:
    """The worker's input stream: this rank's shard (DistributedSampler), decoded by `data.loader_workers` processes
    that prepare `data.prefetch_factor` batches ahead each, pinned for CUDA. In-memory datasets default to no decode
    process (indexing a tensor is cheaper than shipping it between processes); streamed ones to the worker's CPUs
    less the one that trains.

    Why torch DataLoader workers and not Ray Data (benchmarks/input_pipeline.py, docs/benchmarks.md): per decode
    core, Ray Data's read_images + map_batches + iter_torch_batches delivered 0.51x-0.77x (median) of a plain
    torchvision DataLoader with the same workers here, and this loader matches it (same decode code); a DataLoader
    keeps each image paired by index with its cached oblivious attack (`PairedImages`), which Ray Data would have to
    join across two datasets. Ray Data's strength, CPU-only nodes decoding for GPU nodes, matters once one node's
    cores cannot keep its GPUs fed: measure that on a GPU node before switching."""
    d = cfg.data
    workers = d.loader_workers
    if workers is None:
        workers = max(1, int(cfg.train.cpus_per_worker) - 1) if streamed else 0
    pin = d.pin_memory if d.pin_memory is not None else device.type == "cuda"
    extra = {"prefetch_factor": d.prefetch_factor, "persistent_workers": d.persistent_workers} if workers else {}
    return DataLoader(data, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      drop_last=len(data) >= 2 * sampler.num_replicas * cfg.train.batch_size, **extra)


def one_line_errors(loader: DataLoader) -> Any:
    """Iterates the loader; a file that does not decode stays one line naming it (a decode process would otherwise
    wrap the worker's traceback into the message)."""
    try:
        yield from loader
    except DataError as e:
        raise one_line(e) from None


def data_error(error: BaseException | None) -> DataError | None:
    """The `DataError` (a file that does not decode) behind a failed fit, if that is what stopped it."""
    failures = list(getattr(error, "worker_failures", {}).values()) + [error]
    for f in failures:
        for _ in range(8):  # Ray wraps a worker's exception: UserExceptionWithTraceback._base_exc (Train V2 2.60),
            if f is None:   # RayTaskError.cause, or the exception's __cause__
                break
            if isinstance(f, DataError):
                return one_line(f)
            f = getattr(f, "_base_exc", None) or getattr(f, "cause", None) or f.__cause__
    return None


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1000 + rank) * 10_000 + epoch


def _resolve(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


# --- resuming: the checkpoint Ray Train resumes from ------------------------------------------------------------------

RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train 2.60's index of registered checkpoints
INCOMPLETE_PREFIX = ".incomplete-"


def ray_train_checkpoints(run_dir: Path) -> tuple[str | None, set[str]] | None:
    """(the checkpoint directory Ray Train will resume from, every registered one), read from the run's checkpoint
    manager snapshot; None when there is no snapshot (Ray then starts the run from scratch).

    Ray Train 2.60 (v2 `CheckpointManager`) resumes a run from `latest_checkpoint_result` of this snapshot, never by
    listing directories. A checkpoint is registered there only after its upload into `checkpoint_*` finished, so a
    directory cut short by a full disk or a kill is never resumed from by Ray.
    """
    path = run_dir / RAY_TRAIN_SNAPSHOT
    if not path.is_file():
        return None
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
        latest = snap.get("latest_checkpoint_result")
        latest = None if latest is None else str(latest["checkpoint_dir_name"])
        registered = {str(r["checkpoint_dir_name"]) for r in snap.get("checkpoint_results", [])}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"Ray Train's checkpoint index '{path}' is cut short or damaged ({type(e).__name__}), "
                              "e.g. by a full disk: Ray cannot resume this run. Move that file aside to train this run "
                              "again from scratch, or pass another --name") from None
    return latest, registered | ({latest} if latest else set())


def resume_checkpoint(run_dir: str | Path, filename: str, load: Callable[[Path], dict[str, Any]],
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a re-run of `run_dir` resumes from, loaded with `load`, or None for a fresh start.

    That is the one Ray Train registered last when the run has Ray's snapshot, and a damaged one is an error (Ray
    would load it). Checkpoint directories Ray never registered and that do not load (cut short by a full disk or a
    kill during the upload) are skipped, reported, and renamed `.incomplete-checkpoint_*`, so that nothing takes them
    for checkpoints. Without a snapshot, the newest complete checkpoint is returned so that the caller can check that
    the run is the same one (Ray itself starts from scratch then).
    """
    run_dir = Path(run_dir)
    ray_state = ray_train_checkpoints(run_dir)
    latest, registered = ray_state if ray_state is not None else (None, set())
    complete: list[tuple[Path, dict[str, Any]]] = []
    for d in checkpoint_dirs(run_dir):
        if d.name in registered:
            continue
        try:
            complete.append((d / filename, load(d / filename)))
        except CheckpointError as e:
            aside = d.with_name(INCOMPLETE_PREFIX + d.name)
            os.replace(d, aside)
            fsync_dir(run_dir)
            log.warning("skipped incomplete checkpoint '%s' (%s); Ray Train never registered it; moved to '%s'",
                        d, str(e).split("' ", 1)[-1], aside)
    if latest is not None:
        return run_dir / latest / filename, load(run_dir / latest / filename)
    if ray_state is None and complete:
        return complete[-1]
    return None


def check_resumable(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A re-run resumes from the run's newest checkpoint: it is checked here, on the driver before Ray starts, so that
    a damaged one, or one of another translator (a reused --name), is a one-line error, not failing workers."""
    resume = resume_checkpoint(run_dir, CHECKPOINT_FILE, load_translator_checkpoint)
    if resume is None:
        return
    ckpt, state = resume
    try:
        saved = ExperimentConfig.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"translator checkpoint '{ckpt}' holds a config this version rejects ({e})",
                              ) from None
    if saved.translator != cfg.translator or saved.data.name != cfg.data.name:
        raise CheckpointError(f"run '{run_dir}' resumes from '{ckpt}', a '{saved.translator.arch}' translator on "
                              f"'{saved.data.name}', but this config trains a '{cfg.translator.arch}' on "
                              f"'{cfg.data.name}'; pass another --name to start a new run")


def prepare_run(cfg: ExperimentConfig, verify_cache: bool = True) -> dict[str, Any]:
    """Driver-side preparation shared by `oodray.train` and each Tune trial: the fixed classifier (trained and
    cached if missing) and, for the oblivious regime, the shared cache of attacks on C (Ray tasks), passed to the
    workers as its directory (each reads it lazily). `verify_cache=False` checks the cache's shard sizes only (a
    trial whose search verified every shard's checksum before it started)."""
    import ray

    _, cpath = get_classifier(cfg)
    state = load_checkpoint(cpath, what="classifier checkpoint")
    info = state["info"]
    build_translator(cfg.translator, info["channels"], tuple(info["image_size"]))  # fails fast on bad sizes
    loop: dict[str, Any] = {"config": cfg.to_dict(), "classifier": ray.put(state),
                            "classifier_key": classifier_key(cfg), "oblivious": None}
    if cfg.train.regime == "oblivious":
        loop["oblivious"] = str(build_oblivious_cache(cfg, cpath, verify=verify_cache)[0])
        # Crafting the cache cost one attack per training example, once; reported beside each run's own passes.
        loop["cache_passes"] = attack_passes(attack_specs(cfg)) * len(ObliviousCache(loop["oblivious"]))
    return loop


def fit_translator(cfg: ExperimentConfig, loop_config: dict[str, Any], *, storage: str, name: str,
                   callbacks: list[Any] | None = None) -> Any:
    """Builds and fits the TorchTrainer; a run with the same storage+name resumes from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.gpus_per_worker > 0,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **(
                {"GPU": cfg.train.gpus_per_worker} if cfg.train.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_uri(storage), callbacks=callbacks,  # Ray wants local paths absolute
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            **train_logging(cfg.train.ray_log_level)),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.train", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (data-parallel)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--storage", help="where runs are written (local path or s3:// / gs:// URI)")
    p.add_argument("--name", help="run name (default: derived from the config, so a re-run resumes)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    cfg = config_from_args(args, {"train": {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
                                            "cpus_per_worker": args.cpus_per_worker, "epochs": args.epochs},
                                  "storage": args.storage, "name": args.name})
    if cfg.translator.arch in ("identity", "bitdepth"):
        raise ConfigError(f"translator '{cfg.translator.arch}' has nothing to train; evaluate it directly with "
                          f"python -m oodray.evaluate --translator {cfg.translator.arch}")
    storage = storage_uri(cfg.storage)
    name = run_name(cfg)
    run_dir = safe_child(storage, name)  # a name may not climb out of the storage directory
    if not is_uri(storage):
        ensure_writable_dir(run_dir, "storage path")
        hold_lock(run_dir, "run directory")  # one writer per run, before Ray starts (released by cli.run)
        check_resumable(cfg, run_dir)
    splits = load_dataset(cfg.data)
    classifier, cpath = get_classifier(cfg, splits)  # bad data or a bad cached C fail here, before Ray
    if cfg.train.regime == "oblivious":
        check_cache_space([cfg], [cpath], len(splits.train))  # a cache that cannot fit is refused before Ray
    build_translator(cfg.translator, classifier.info.channels, classifier.info.image_size)  # unknown arch, bad sizes
    if not is_uri(storage):
        save_config(cfg, run_dir, "oodray_config.json")
    t = cfg.train
    init_ray_for(t.workers * t.cpus_per_worker, t.workers * t.gpus_per_worker,
                 f"training with {t.workers} worker(s) x {t.cpus_per_worker:g} CPU, {t.gpus_per_worker:g} GPU",
                 bundles=[{"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}] * t.workers)
    loop = prepare_run(cfg)
    t0 = time.time()
    try:
        result = fit_translator(cfg, loop, storage=storage, name=name)  # Ray 2.60 raises a failed fit's error
    except Exception as e:  # noqa: BLE001 - only a bad file is turned into a one-line error; the rest re-raised
        bad_file = data_error(e)
        if bad_file is not None:
            raise bad_file from None  # bad input found mid-run: one line naming the file, exit 2 (checkpoints kept)
        raise
    if result.error:
        raise RunFailed(f"training failed: {result.error}")
    end_ray()
    m = result.metrics or {}
    print(f"trained {cfg.translator.arch} on {cfg.data.name} for {m.get('epoch')} epochs in {time.time() - t0:.0f}s: "
          f"clean acc of C(T(x)) {m.get('clean_accuracy', float('nan')):.4f}, proxy robust acc (PGD-"
          f"{cfg.train.proxy_steps} {cfg.attack.norm} eps {cfg.attack.eps:g}, end to end) "
          f"{m.get('robust_accuracy', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint.path}/{CHECKPOINT_FILE}")
    print(f"run directory: {result.path}")
    return 0


if __name__ == "__main__":
    run(main)
