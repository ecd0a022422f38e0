"""Searches translator architectures and loss weights with Ray Tune + Optuna, then evaluates the best with AutoAttack.

    python -m oodray.tune                                   # embedded default: a small search on digits, local Ray
    python -m oodray.tune --dataset fashion-mnist --num-samples 8
    python -m oodray.tune --dataset imagenet --data-dir /data/imagenet --storage s3://bucket/oodray \
        --workers-per-trial 8 --gpus-per-worker 1 --set classifier.weights=/data/weights/resnet50.pth
    python -m oodray.tune --resume                          # continue the interrupted experiment of the same config

Layers: the `Tuner` (OptunaSearch, define-by-run space; ASHA stops weak trials) runs `trial_driver` per trial,
which builds a `TorchTrainer` (oodray.train) reporting to Tune through `TuneReportCallback`. The objective is the
proxy robust accuracy under the adaptive attacker (PGD end to end) with clean accuracy as a constraint
(`--objective robust`) or as a second objective (`--objective pareto`, NSGA-II). After the search the top-k trials
and the undefended classifier are evaluated with full AutoAttack (oblivious, adaptive, transfer), clean and natural
shifts, through the evaluation fan-out, and the results table is printed (see `oodray.results`).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

from oodray.cli import add_config_args, config_from_args, run, setup_logging
from oodray.config import ExperimentConfig, save_config
from oodray.errors import ConfigError, OodrayError
from oodray.io import ensure_writable_dir, safe_child
from oodray.locks import LOCK_FILE
from oodray.locks import hold as hold_lock
from oodray.storage import exists, has_content, is_uri, mirror_down, mirror_up
from oodray.storage import join as storage_join

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.25  # the trial driver only waits on its TorchTrainer

# The search space: key -> (kind, choices or (low, high[, log])). Conditional keys live under their architecture.
SPACE: dict[str, tuple[str, Any]] = {
    "translator.arch": ("cat", ["unet", "resnet"]),
    "translator.residual": ("cat", [True, False]),
    "translator.width": ("cat", [8, 16, 32]),
    "translator.norm": ("cat", ["batch", "instance", "none"]),
    "translator.depth": ("int", (1, 3)),  # unet only
    "translator.dropout": ("float", (0.0, 0.3)),  # unet only
    "translator.downsamplings": ("int", (0, 2)),  # resnet only
    "translator.blocks": ("int", (1, 6)),  # resnet only
    "loss.pixel": ("float", (0.0, 2.0)),
    "loss.consistency": ("float", (0.0, 2.0)),
    "loss.ce": ("float", (0.0, 2.0)),
    "loss.feature": ("float", (0.0, 1.0)),
    "loss.identity": ("float", (0.0, 2.0)),
    "loss.clean_consistency": ("float", (0.0, 3.0)),
    "loss.gan": ("cat", [0.0, 0.05]),
    "train.lr": ("float", (1e-4, 3e-3, "log")),
    "train.regime": ("cat", ["oblivious", "adaptive"]),
    "attack.attacks": ("cat", ["pgd", "pgd,fgsm"]),
    "attack.eps_mix": ("cat", ["eps", "eps,half"]),
}
CONDITIONAL = {"translator.depth": "unet", "translator.dropout": "unet", "translator.downsamplings": "resnet",
               "translator.blocks": "resnet"}


def narrowed_space(narrow: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Applies `tune.space` from the YAML: a list narrows a choice, a scalar fixes it, {low, high} a range."""
    space = dict(SPACE)
    for key, v in narrow.items():
        if key not in SPACE:
            raise ConfigError(f"tune.space key '{key}' is not searched; known: {', '.join(SPACE)}")
        kind, _ = SPACE[key]
        if isinstance(v, list):
            if not v:
                raise ConfigError(f"tune.space narrows '{key}' to nothing (empty list)")
            space[key] = ("cat", v)
        elif isinstance(v, dict):
            if not {"low", "high"} <= set(v) or v["low"] > v["high"]:
                raise ConfigError(f"tune.space '{key}' range needs low <= high, got {v}")
            space[key] = (kind if kind != "cat" else "float", (v["low"], v["high"], *(["log"] if v.get("log") else [])))
        else:
            space[key] = ("fixed", v)
    return space


class DefineByRun:
    """Optuna define-by-run space (picklable, so Tune can checkpoint the searcher): conditional parameters are
    only suggested for their architecture, and downsampling depths are capped by the image size."""

    def __init__(self, space: dict[str, tuple[str, Any]], max_depth: int) -> None:
        self.space, self.max_depth = space, max_depth

    def _pick(self, trial: Any, key: str, fixed: dict[str, Any]) -> Any:
        kind, arg = self.space[key]
        if kind == "fixed":
            fixed[key] = arg
            return arg
        if kind == "cat":
            return trial.suggest_categorical(key, arg)
        low, high, *log = arg
        if key in ("translator.depth", "translator.downsamplings"):
            high = min(high, self.max_depth - (1 if key == "translator.downsamplings" else 0))
            low = min(low, high)
        if kind == "int":
            return trial.suggest_int(key, int(low), int(high))
        return trial.suggest_float(key, float(low), float(high), log=bool(log))

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        fixed: dict[str, Any] = {}
        arch = self._pick(trial, "translator.arch", fixed)
        for key in self.space:
            if key == "translator.arch" or (key in CONDITIONAL and CONDITIONAL[key] != arch):
                continue
            self._pick(trial, key, fixed)
        return fixed or None


def trial_overrides(params: dict[str, Any], base: ExperimentConfig) -> dict[str, Any]:
    """Maps sampled parameters onto config keys (mixtures expand to tuples, conditional keys are reset)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if k not in SPACE:
            continue
        if k == "attack.attacks":
            v = tuple(str(v).split(","))
        elif k == "attack.eps_mix":
            v = (base.attack.eps,) if v == "eps" else (base.attack.eps, base.attack.eps / 2)
        out[k] = v
    arch = out.get("translator.arch", base.translator.arch)
    for k, a in CONDITIONAL.items():
        if a != arch:
            out[k] = None
    return out


def trial_driver(params: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """One trial: a Ray Train run of the sampled translator, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from oodray.train import fit_translator, prepare_run

    cfg0 = ExperimentConfig.from_dict(base)
    cfg = cfg0.replace(**trial_overrides(params, cfg0))
    name = f"trial-{tune.get_context().get_trial_id()}"  # deterministic per trial, so a restored trial resumes
    result = fit_translator(cfg, prepare_run(cfg), storage=storage_join(exp_dir, "train"), name=name,
                            callbacks=[TuneReportCallback()])
    if result.error:
        raise result.error


def precompute_caches(cfg: ExperimentConfig, space: dict[str, tuple[str, Any]]) -> None:
    """Builds the oblivious caches of every attack variant the search can pick, before trials need them (as Ray
    tasks, while the whole cluster is free), so trials only read them."""
    import itertools

    from oodray.cache import build_oblivious_cache
    from oodray.classifier import classifier_path

    def values(key: str) -> list[Any]:
        kind, arg = space[key]
        return [arg] if kind == "fixed" else list(arg)

    regimes = values("train.regime")
    if "oblivious" not in regimes:
        return
    for attacks, eps_mix in itertools.product(values("attack.attacks"), values("attack.eps_mix")):
        params = {"attack.attacks": attacks, "attack.eps_mix": eps_mix}
        variant = cfg.replace(**{k: v for k, v in trial_overrides(params, cfg).items() if k.startswith("attack.")})
        build_oblivious_cache(variant, classifier_path(variant))


def experiment_name(cfg: ExperimentConfig, objective: str) -> str:
    from oodray.train import config_hash

    digest = config_hash(cfg, ('data', 'classifier', 'translator', 'loss', 'attack', 'train', 'tune'))
    return cfg.name or f"tune-{cfg.data.name}-{objective}-{digest}"


def cluster_concurrency(cfg: ExperimentConfig) -> int:
    """How many trials fit at once, from the cluster's resources; refuses requests the cluster cannot hold."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    t = cfg.train
    need_gpu = t.workers * t.gpus_per_worker
    if need_gpu > gpus:
        raise OodrayError(f"a trial needs {need_gpu:g} GPUs ({t.workers} workers x {t.gpus_per_worker:g}) but the "
                          f"cluster has {gpus:g}; lower --workers-per-trial/--gpus-per-worker or add GPU nodes")
    need_cpu = t.workers * t.cpus_per_worker + DRIVER_CPUS
    if need_cpu > cpus:
        raise OodrayError(f"a trial needs {need_cpu:g} CPUs but the cluster has {cpus:g}; lower "
                          "--workers-per-trial or train.cpus_per_worker")
    by_cpu = math.floor(cpus / need_cpu)
    by_gpu = math.floor(gpus / need_gpu) if need_gpu > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu))


def check_storage(storage: str) -> None:
    """A local storage path on a multi-node cluster is refused: other nodes could not write or read it."""
    import ray

    if "://" in storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    if len(hosts) > 1:
        raise OodrayError(f"storage '{storage}' is a local path but the cluster has {len(hosts)} hosts; use a "
                          "shared filesystem path mounted on every node or an s3:// / gs:// URI (--storage)")


def search(cfg: ExperimentConfig, exp_dir: str, storage: str, name: str, resume: bool, max_depth: int) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    pareto = cfg.tune.objective == "pareto"
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=cfg.to_dict(), exp_dir=str(exp_dir)), {"CPU": DRIVER_CPUS})
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        return tuner.fit()
    space = narrowed_space(cfg.tune.space)
    seed = cfg.train.seed
    if pareto:
        searcher = OptunaSearch(space=DefineByRun(space, max_depth),
                                metric=["robust_accuracy", "clean_accuracy"], mode=["max", "max"],
                                sampler=optuna.samplers.NSGAIISampler(seed=seed, population_size=4))
    else:
        searcher = OptunaSearch(space=DefineByRun(space, max_depth), metric="objective", mode="max",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
    scheduler = None
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(metric="robust_accuracy" if pareto else "objective", mode="max", time_attr="epoch",
                                  max_t=cfg.train.epochs, grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                  reduction_factor=2)
    concurrency = cfg.tune.max_concurrent or cluster_concurrency(cfg)
    log.info("search: %d trials, %d at a time, objective %s", cfg.tune.num_samples, concurrency, cfg.tune.objective)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()


def final_evaluation(cfg: ExperimentConfig, exp_dir: Path) -> None:
    """Full AutoAttack on the top-k trials and on the undefended classifier, in this run; finished ones are kept."""
    from oodray.evaluate import run_evaluation
    from oodray.results import load_trials, rank_trials

    trials = rank_trials(load_trials(exp_dir), cfg.tune.objective)
    top = [t for t in trials if t.get("checkpoint")][: cfg.tune.final_top_k]
    jobs: list[tuple[ExperimentConfig, str | None, str]] = [
        (cfg.replace(**{"translator.arch": "identity"}), None, "undefended")]
    jobs += [(ExperimentConfig.from_dict(t["config"]), t["checkpoint"], f"trial-{t['trial_id']}") for t in top]
    for job_cfg, ckpt, label in jobs:
        out = safe_child(exp_dir / "eval", label)  # trial ids come from files in the experiment directory
        if (out / "summary.json").exists():
            log.info("%s already evaluated; kept", label)
            continue
        log.info("final AutoAttack evaluation of %s", label)
        run_evaluation(job_cfg, checkpoint=ckpt, out_dir=out, label=label)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.tune", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--objective", help="robust (TPE on proxy robust accuracy, clean as a constraint) | pareto")
    p.add_argument("--num-samples", type=int, help="trials to run")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA may stop trials earlier)")
    p.add_argument("--workers-per-trial", type=int)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: sized from the cluster)")
    p.add_argument("--final-top-k", type=int, help="trials evaluated with full AutoAttack after the search")
    p.add_argument("--storage", help="local path, shared path or s3:// / gs:// URI (default: runs)")
    p.add_argument("--name", help="experiment name (default: derived from the config)")
    p.add_argument("--local-dir", default="runs", help="local staging directory when --storage is a URI")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment of the same name")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_from_args(args, {
        "tune": {"objective": args.objective, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "final_top_k": args.final_top_k},
        "train": {"epochs": args.epochs, "workers": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker},
        "storage": args.storage, "name": args.name})
    narrowed_space(cfg.tune.space)  # bad narrowing fails before anything starts
    from oodray.train import init_ray, storage_uri

    storage = storage_uri(cfg.storage)
    name = experiment_name(cfg, cfg.tune.objective)
    safe_child(storage, name)  # a name may not climb out of the storage directory ('..', absolute)
    # With a URI, Tune/Train write there directly and oodray's own files are staged locally, then mirrored.
    exp_uri = storage_join(storage, name) if is_uri(storage) else str(Path(storage) / name)
    exp_dir = Path(args.local_dir) / name if is_uri(storage) else Path(storage) / name
    # #15: one writer per experiment, before the checks below and before Ray starts; for a URI, its staging directory
    hold_lock(exp_dir, "local staging directory" if is_uri(storage) else "experiment directory")
    found = exists(storage_join(exp_uri, "tuner.pkl")) if is_uri(storage) else (exp_dir / "tuner.pkl").exists()
    if args.resume and not found:
        raise OodrayError(f"--resume: no experiment '{name}' under '{storage}' to resume (looked for {exp_uri})")
    taken = has_content(exp_uri) if is_uri(storage) else any(p.name != LOCK_FILE for p in exp_dir.iterdir())
    if not args.resume and taken:
        raise OodrayError(f"experiment '{exp_uri}' already exists; pass --resume to continue it, or --name for a "
                          "new one (nothing was changed)")
    ensure_writable_dir(exp_dir, "local staging directory" if is_uri(storage) else "storage path")
    from oodray.classifier import get_classifier
    from oodray.data import load_dataset

    splits = load_dataset(cfg.data)  # bad data or a bad cached C fail here, before Ray starts or anything is written
    get_classifier(cfg, splits)  # train and cache C once, before trials share it
    init_ray()
    check_storage(storage)
    cluster_concurrency(cfg)
    if cfg.translator.gate:
        log.info("gated translators: inputs under the Mahalanobis threshold skip T")
    save_config(cfg, exp_dir, "oodray_config.json")
    if is_uri(storage):
        mirror_up(exp_dir, exp_uri, ["oodray_config.json"])
    precompute_caches(cfg, narrowed_space(cfg.tune.space))
    max_depth = int(math.log2(min(splits.info.image_size)))
    t0 = time.time()
    grid = search(cfg, exp_uri, storage, name, args.resume, max_depth)
    errors = [r.error for r in grid if r.error]
    if errors:
        log.warning("%d trials failed; first error: %s", len(errors), errors[0])
    log.info("search finished in %.0fs", time.time() - t0)
    if is_uri(storage):
        mirror_down(exp_uri, exp_dir)
    final_evaluation(cfg, exp_dir)
    from oodray.results import RESULT_FILES, build_table, write_outputs

    table = build_table(exp_dir)
    write_outputs(table, exp_dir)
    print(table.to_string(index=False))
    if is_uri(storage):
        mirror_up(exp_dir, exp_uri, ["eval", *RESULT_FILES])
        print(f"\nexperiment: {exp_uri} (staged locally in {exp_dir})")
    print(f"\nexperiment: {exp_dir}\nresults: {exp_dir / 'results.md'} (also .csv, .json, pareto.png)")
    return 0


if __name__ == "__main__":
    run(main)
