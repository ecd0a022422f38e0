"""Trains one translator T in front of the fixed classifier C with Ray Train (data parallel, DDP).

    python -m oodray.train                                   # digits, embedded default
    python -m oodray.train --dataset fashion-mnist --workers 2
    python -m oodray.train --config experiments/digits.yaml --set train.regime=adaptive --set loss.ce=1

Three layers, each taking one plain dict: `train_loop_per_worker` (runs on every Ray Train worker), `fit_translator`
(builds the `TorchTrainer`; Tune's trial driver calls it too) and the CLI. Each epoch reports the loss terms, the
clean accuracy of C(T(x)) and a proxy robust accuracy (PGD end to end through T and C on a fixed validation
subset), with a checkpoint holding T, the optimizer(s), the epoch and the resolved config. A re-run with the same
name resumes from its latest checkpoint; worker failures are retried from it (`FailureConfig`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from oodray.cli import add_config_args, config_from_args, run, setup_logging
from oodray.config import ExperimentConfig, save_config
from oodray.errors import CheckpointError, ConfigError
from oodray.io import check_finite, ensure_writable_dir, load_checkpoint, resume_checkpoint, safe_child, save_checkpoint
from oodray.locks import hold as hold_lock

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "oodray.translator/1"
CHECKPOINT_FILE = "translator.pt"


def config_hash(cfg: ExperimentConfig, sections: tuple[str, ...] = ("data", "classifier", "translator", "loss",
                                                                        "attack", "train")) -> str:
    d = cfg.to_dict()
    blob = json.dumps({k: d[k] for k in sections}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.name or f"train-{cfg.data.name}-{cfg.translator.arch}-{config_hash(cfg)}"


class PairedImages(Dataset):
    """(clean image, cached oblivious OOD image or the clean one, label, index) for each training example."""

    def __init__(self, base: Dataset, ood: torch.Tensor | None) -> None:
        self.base, self.ood = base, ood

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.base[i]
        return x, (self.ood[i].float() if self.ood is not None else x), y


def ood_batch(cfg: ExperimentConfig, defended_eval: torch.nn.Module, x: torch.Tensor, x_cached: torch.Tensor,
              y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The batch's OOD inputs: cached oblivious attacks or fresh end-to-end ones, part replaced by natural shifts."""
    from oodray.attacks import mixed_attack
    from oodray.shifts import random_shifts

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


def attack_specs(cfg: ExperimentConfig) -> list[Any]:
    from oodray.attacks import AttackSpec

    return [AttackSpec(name=a, norm=cfg.attack.norm, eps=e, steps=cfg.attack.steps)
            for a in cfg.attack.attacks for e in cfg.attack.eps_values()]


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    return sum((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs)) / len(x)


def proxy_metrics(cfg: ExperimentConfig, defended: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                  ) -> dict[str, float]:
    """Clean accuracy of C(T(x)) and PGD robust accuracy end to end through T (and gate) and C."""
    from oodray.attacks import pgd

    g = torch.Generator(device=x_val.device).manual_seed(cfg.train.seed)
    x_adv = pgd(defended, x_val, y_val, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=cfg.train.proxy_steps,
                generator=g)
    out = {"clean_accuracy": _accuracy(defended, x_val, y_val), "robust_accuracy": _accuracy(defended, x_adv, y_val),
           "classifier_clean_accuracy": _accuracy(defended.classifier, x_val, y_val)}
    # The search objective: robust accuracy, penalised once clean accuracy falls more than the allowed drop.
    excess = max(0.0, out["classifier_clean_accuracy"] - out["clean_accuracy"] - cfg.tune.min_clean_accuracy_drop)
    out["objective"] = out["robust_accuracy"] - 10.0 * excess
    rate = getattr(defended, "flag_rate", lambda _x: None)
    if rate(x_val) is not None:
        out["gate_flag_rate_clean"], out["gate_flag_rate_attacked"] = rate(x_val), rate(x_adv)
    return out


def train_step(cfg: ExperimentConfig, translator: torch.nn.Module, classifier: torch.nn.Module, gate: Any,
               objective: Any, opts: tuple[Any, Any], disc: torch.nn.Module | None,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], g: torch.Generator, use_amp: bool,
               ) -> dict[str, float]:
    """One optimisation step of T (and of the discriminator): OOD batch, weighted objective, backward, step."""
    from oodray.losses import discriminator_loss
    from oodray.models.defended import DefendedModel

    x, x_cached, y = batch
    raw_t = translator.module if hasattr(translator, "module") else translator
    raw_t.eval()  # attacks (adaptive regime) see T in eval mode
    x_ood = ood_batch(cfg, DefendedModel(classifier, raw_t, gate), x, x_cached, y, g)
    translator.train()
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp):
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

    from oodray.data import eval_subset, load_dataset
    from oodray.losses import PatchDiscriminator, TranslatorObjective
    from oodray.models.classifier import classifier_from_state
    from oodray.models.defended import DefendedModel, MahalanobisGate
    from oodray.models.translator import build_translator

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)
    splits = load_dataset(cfg.data)
    classifier = classifier_from_state(_resolve(loop_config["classifier"])).to(device)  # frozen, never DDP-wrapped
    translator = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    disc = PatchDiscriminator(splits.info.channels, splits.info.image_size) if cfg.loss.gan > 0 else None
    opt = torch.optim.Adam(translator.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999)) if disc else None
    gate = None
    start_epoch = 0
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
            gate = _gate_from_state(state["gate"])
        start_epoch = state["epoch"]
        log.info("rank %d resumed from epoch %d", rank, start_epoch)
    x_val, y_val = (t.to(device) for t in eval_subset(splits.val, min(cfg.train.proxy_examples, len(splits.val)),
                                                        cfg.data.seed))
    if cfg.translator.gate and gate is None:
        from oodray.data import stack

        x_tr, y_tr = stack(splits.train, range(min(len(splits.train), 5000)))
        x_v, _ = stack(splits.val)
        gate = MahalanobisGate.fit(classifier.cpu(), x_tr, x_v, cfg.translator.gate_percentile, y_train=y_tr)
        classifier.to(device)
    if gate is not None:
        gate.to(device)
    translator = ray.train.torch.prepare_model(translator)  # DDP when world > 1
    if disc is not None:
        disc = ray.train.torch.prepare_model(disc)
    raw_t = translator.module if hasattr(translator, "module") else translator
    ood = _resolve(loop_config["oblivious"]) if loop_config.get("oblivious") is not None else None
    data = PairedImages(splits.train, ood)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    loader = DataLoader(data, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=len(data) >= 2 * world *
                        cfg.train.batch_size)
    objective = TranslatorObjective(cfg.loss, classifier, disc)
    use_amp = cfg.train.amp and device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1000 + rank)
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        translator.train()
        sums: dict[str, float] = {}
        n_batches = 0
        for b, (x, x_cached, y) in enumerate(loader):
            if cfg.train.max_batches is not None and b >= cfg.train.max_batches:
                break
            batch = (x.to(device), x_cached.to(device), y.to(device))
            terms = train_step(cfg, translator, classifier, gate, objective, (opt, opt_d), disc, batch, g, use_amp)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
        metrics: dict[str, Any] = {f"loss_{k}": v / max(1, n_batches) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, epoch_seconds=time.time() - t0, train_seconds=time.time() - t0,
                       train_examples=n_batches * cfg.train.batch_size * world, world_size=world,
                       resumed_from_epoch=start_epoch, node_id=ray.get_runtime_context().get_node_id())
        if rank == 0:
            raw_t.eval()
            metrics.update(proxy_metrics(cfg, DefendedModel(classifier, raw_t, gate), x_val, y_val))
            metrics["epoch_seconds"] = time.time() - t0
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": cfg.to_dict(),
                    "translator": raw_t.state_dict(), "optimizer": opt.state_dict(),
                    "discriminator": (disc.module if hasattr(disc, "module") else disc).state_dict() if disc else None,
                    "discriminator_optimizer": opt_d.state_dict() if opt_d else None,
                    "gate": _gate_state(gate), "metrics": metrics,
                    "classifier_key": loop_config.get("classifier_key"),
                }, Path(tmp) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _resolve(obj: Any) -> Any:
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def _gate_state(gate: Any) -> dict[str, torch.Tensor] | None:
    return None if gate is None else {k: v.detach().cpu() for k, v in gate.state_dict().items()}


def _gate_from_state(state: dict[str, torch.Tensor]) -> Any:
    from oodray.models.defended import MahalanobisGate

    gate = MahalanobisGate(state["mean"].shape[-1], state["mean"].shape[0])
    gate.load_state_dict(state)
    return gate


def load_translator_checkpoint(path: str | Path) -> dict[str, Any]:
    """A translator checkpoint file, or a Ray checkpoint directory holding one; validated, loaded as data."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    state = load_checkpoint(p, what="translator checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{p}' is not an oodray translator checkpoint (format {state.get('format')!r})")
    if not (isinstance(state.get("translator"), dict) and isinstance(state.get("config"), dict)
            and type(state.get("epoch")) is int):
        raise CheckpointError(f"translator checkpoint '{p}' lacks its weights, config or integer epoch")
    check_finite(state["translator"], "translator checkpoint", p)
    return state


def check_resumable(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A re-run resumes from the run's newest checkpoint: it is checked here, on the driver before Ray starts, so that
    a damaged one, or one of another translator (a reused --name), is a one-line error, not failing workers."""
    # #15: the checkpoint Ray Train resumes from (its snapshot's latest), partial unregistered ones set aside
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


def load_defended(state: dict[str, Any], classifier: torch.nn.Module, path: str = "<memory>") -> torch.nn.Module:
    """Rebuilds C(T(.)) (with its gate) from a translator checkpoint and the fixed classifier."""
    from oodray.models.defended import DefendedModel
    from oodray.models.translator import build_translator

    cfg = ExperimentConfig.from_dict(state["config"])
    t = build_translator(cfg.translator, classifier.info.channels)
    try:
        t.load_state_dict(state["translator"])
    except RuntimeError as e:
        raise CheckpointError(f"translator checkpoint '{path}' does not fit a '{cfg.translator.arch}' translator "
                              f"({str(e).splitlines()[0]})") from None
    gate = _gate_from_state(state["gate"]) if state.get("gate") else None
    return DefendedModel(classifier, t.eval(), gate).eval()


def prepare_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """Driver-side preparation shared by `oodray.train` and each Tune trial: the fixed classifier (trained and
    cached if missing) and, for the oblivious regime, the shared cache of attacks on C (Ray tasks)."""
    import ray

    from oodray.cache import ensure_oblivious_cache
    from oodray.classifier import classifier_key, get_classifier
    from oodray.models.translator import build_translator

    _, cpath = get_classifier(cfg)
    state = load_checkpoint(cpath, what="classifier checkpoint")
    info = state["info"]
    build_translator(cfg.translator, info["channels"], tuple(info["image_size"]))  # fails fast on bad sizes
    loop: dict[str, Any] = {"config": cfg.to_dict(), "classifier": ray.put(state),
                            "classifier_key": classifier_key(cfg), "oblivious": None}
    if cfg.train.regime == "oblivious":
        loop["oblivious"] = ray.put(ensure_oblivious_cache(cfg, cpath))
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
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def storage_uri(storage: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://) pass through."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def pin_ray_address() -> None:
    """Worker setup hook: points RAY_ADDRESS at the worker's own cluster.

    Ray's state API, when called with no address, looks for running GCS processes and fails when it finds two. That
    happens when two local Rays share a machine, e.g. an evaluation beside a search. Ray Train's
    `PlacementGroupCleaner` calls it. When it fails, a trial that Tune stops keeps its worker group's placement group
    forever, and the next trial waits for CPUs that never free up.
    """
    import os

    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(num_cpus: int | None = None) -> None:
    """Connects to RAY_ADDRESS when set, else starts a local Ray bound to 127.0.0.1 (token auth stays on)."""
    import os

    import ray

    if ray.is_initialized():
        return
    # Under load (or while a stopped trial's workers are torn down) 60 s is too short for a worker group to start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # #15: Ray binds every port (GCS, raylet, object manager, workers, agents, metrics) to all interfaces unless
        # the node IP is loopback. ray.init rewrites _node_ip_address=127.0.0.1 to the host's address; Ray's
        # single-host mode (its default on macOS/Windows) makes the node IP 127.0.0.1. Only for this start.
        from ray._private import ray_constants

        cluster_mode, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False,
                     runtime_env={"worker_process_setup_hook": "oodray.train.pin_ray_address"})
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


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
    setup_logging(args.verbose)
    cfg = config_from_args(args, {"train": {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
                                            "cpus_per_worker": args.cpus_per_worker, "epochs": args.epochs},
                                  "storage": args.storage, "name": args.name})
    if cfg.translator.arch in ("identity", "bitdepth"):
        raise ConfigError(f"translator '{cfg.translator.arch}' has nothing to train; evaluate it directly with "
                          f"python -m oodray.evaluate --translator {cfg.translator.arch}")
    storage = storage_uri(cfg.storage)
    name = run_name(cfg)
    run_dir = safe_child(storage, name)  # a name may not climb out of the storage directory
    if "://" not in storage:
        ensure_writable_dir(run_dir, "storage path")
        hold_lock(run_dir, "run directory")  # #15: one writer per run, before Ray starts (released by cli.run)
        check_resumable(cfg, run_dir)
    from oodray.classifier import get_classifier
    from oodray.data import load_dataset

    get_classifier(cfg, load_dataset(cfg.data))  # bad data or a bad cached C fail here: before Ray, nothing written
    if "://" not in storage:
        save_config(cfg, run_dir, "oodray_config.json")
    init_ray()
    loop = prepare_run(cfg)
    t0 = time.time()
    result = fit_translator(cfg, loop, storage=storage, name=name)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
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
