"""Searches translator architectures and loss weights with Ray Tune + Optuna, then evaluates the best with AutoAttack.

    python -m oodray.tune                                   # embedded default: a small search on digits, local Ray
    python -m oodray.tune --dataset fashion-mnist --num-samples 8
    python -m oodray.tune --dataset imagenet --data-dir /data/imagenet --storage s3://bucket/oodray \
        --workers-per-trial 8 --gpus-per-worker 1          # C: torchvision ResNet-50 IMAGENET1K_V2 (TORCH_HOME)
    python -m oodray.tune --resume                          # continue the interrupted experiment of the same config

Layers: the `Tuner` (OptunaSearch, define-by-run space; ASHA stops weak trials) runs `trial_driver` per trial,
which builds a `TorchTrainer` (oodray.train) reporting to Tune through `TuneReportCallback`. The objective is the
proxy robust accuracy under the adaptive attacker (PGD end to end) with clean accuracy as a constraint
(`--objective robust`) or as a second objective (`--objective pareto`, NSGA-II). After the search the top-k trials
and the undefended classifier are evaluated with full AutoAttack (oblivious, adaptive, transfer), clean and natural
shifts, through the evaluation fan-out, and the results table is printed (see `oodray.results`).

ray and optuna are imported inside the functions that use them (heavy imports).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oodray.cache import build_oblivious_cache, check_cache_space
from oodray.cli import add_config_args, config_from_args, end_ray, run, setup_logging
from oodray.config import ExperimentConfig, config_hash, flatten, save_config
from oodray.data import load_dataset
from oodray.errors import Interrupted, OodrayError, RunFailed
from oodray.evaluate import run_evaluation
from oodray.fixed_classifier import classifier_path, get_classifier, surrogate_config
from oodray.io import ensure_writable_dir, safe_child
from oodray.locks import LOCK_FILE
from oodray.locks import hold as hold_lock
from oodray.models.translator import build_translator
from oodray.progress import Progress, trial_table
from oodray.refit import check_refit, run_refits
from oodray.results import (
    RESULT_FILES,
    build_table,
    files_line,
    load_trials,
    print_leaderboard,
    rank_trials,
    write_outputs,
)
from oodray.runtime import check_resources, cluster_capacity, ensure_cluster_can_hold, init_ray
from oodray.schedulers import ReleaseOrphanedPlacementGroups, ResumableASHA
from oodray.search_space import (
    CONDITIONAL,
    SPACE,
    DefineByRun,
    config_space,
    narrowed_space,
    trial_name,
    trial_overrides,
    validate_space,
)
from oodray.storage import exists, has_content, is_uri, mirror_down, mirror_up, storage_uri
from oodray.storage import join as storage_join
from oodray.train import fit_translator, prepare_run

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.25  # the trial driver only waits on its TorchTrainer
SCHEDULER_STATE = "oodray_scheduler.json"  # ResumableASHA's rungs, beside the experiment
TPE_STARTUP_TRIALS = 3  # TPE's first proposals are seeded random draws (independent of the results), then its model's
__all__ = ["CONDITIONAL", "SPACE", "DefineByRun", "main", "narrowed_space", "trial_driver", "trial_overrides"]

def trial_driver(params: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """One trial: a Ray Train run of the sampled translator, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg0 = ExperimentConfig.from_dict(base)
    cfg = cfg0.replace(**trial_overrides(params, cfg0))
    name = trial_name(tune.get_context().get_trial_id())
    # The search verified every cache's checksums before trials started; a trial checks shard sizes only.
    loop = prepare_run(cfg, verify_cache=False)
    result = fit_translator(cfg, loop, storage=storage_join(exp_dir, "train"), name=name,
                            callbacks=[TuneReportCallback()])
    if result.error:
        raise result.error


def cache_variants(cfg: ExperimentConfig, space: dict[str, tuple[str, Any]]) -> list[ExperimentConfig]:
    """The configs of every oblivious cache the search can pick (one per attack variant; none without that regime)."""
    def values(key: str) -> list[Any]:
        kind, arg = space[key]
        return [arg] if kind == "fixed" else list(arg)

    if "oblivious" not in values("train.regime"):
        return []
    variants = []
    for attacks, eps_mix, steps in itertools.product(values("attack.attacks"), values("attack.eps_mix"),
                                                     values("attack.steps")):
        params = {"attack.attacks": attacks, "attack.eps_mix": eps_mix, "attack.steps": steps}
        variants.append(cfg.replace(**{k: v for k, v in trial_overrides(params, cfg).items()
                                       if k.startswith("attack.")}))
    return variants


def precompute_caches(cfg: ExperimentConfig, space: dict[str, tuple[str, Any]], train: Any = None) -> None:
    """Builds the oblivious caches of every attack variant the search can pick, before trials need them (as Ray
    tasks, while the whole cluster is free), so trials only read them."""
    for variant in cache_variants(cfg, space):
        build_oblivious_cache(variant, classifier_path(variant), train)


def experiment_name(cfg: ExperimentConfig, objective: str) -> str:
    digest = config_hash(cfg, ('data', 'classifier', 'translator', 'loss', 'attack', 'train', 'tune'))
    return cfg.name or f"tune-{cfg.data.name}-{objective}-{digest}"


def trial_resources(cfg: ExperimentConfig) -> tuple[float, float, str]:
    """(CPUs, GPUs) one trial holds at once (its workers and its driver), and how to say so."""
    t = cfg.train
    what = (f"a trial ({t.workers} worker(s) x {t.cpus_per_worker:g} CPU + {DRIVER_CPUS:g} for its driver, "
            f"{t.workers} x {t.gpus_per_worker:g} GPU)")
    return t.workers * t.cpus_per_worker + DRIVER_CPUS, t.workers * t.gpus_per_worker, what


def trial_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """What one trial places: one bundle per Ray Train worker, and its driver's CPUs."""
    t = cfg.train
    return [{"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}] * t.workers + [{"CPU": DRIVER_CPUS}]


def cluster_concurrency(cfg: ExperimentConfig) -> int:
    """How many trials fit at once, from what the cluster can grow to (its nodes, plus every node its autoscaler can
    launch); at least one. A joined cluster that can never hold a trial is refused (exit 2); one whose autoscaler
    must first launch nodes is waited for, with progress."""
    need_cpu, need_gpu, what = trial_resources(cfg)
    if os.environ.get("RAY_ADDRESS"):
        ensure_cluster_can_hold(trial_bundles(cfg), what)
    res = cluster_capacity()
    by_cpu = res.get("CPU", 0.0) / need_cpu
    by_gpu = res.get("GPU", 0.0) / need_gpu if need_gpu > 0 else by_cpu
    return max(1, math.floor(min(by_cpu, by_gpu, cfg.tune.num_samples)))


def check_storage(storage: str) -> None:
    """A local storage path on a multi-node cluster is refused: other nodes could not write or read it."""
    import ray

    if is_uri(storage):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    if len(hosts) > 1:
        raise OodrayError(f"storage '{storage}' is a local path but the cluster has {len(hosts)} hosts; use a "
                          "shared filesystem path mounted on every node or an s3:// / gs:// URI (--storage)")


@contextlib.contextmanager
def _graceful_stop() -> Iterator[None]:
    """Ctrl-C or SIGTERM during the search: Tune stops its trials and saves its state (its own graceful stop, the one
    SIGUSR1 triggers), then the run stops with KeyboardInterrupt instead of going on to evaluate a partial search.
    A second signal stops at once."""
    stopped: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if stopped or not callable(tune_stop):  # a second signal, or Tune's loop not running yet
            raise KeyboardInterrupt
        stopped.append(signum)
        log.warning("stopping the search: Tune stops its trials and saves its state (signal again to stop at once)")
        tune_stop(signum, frame)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours replaces Tune's, which would go on to the evaluation
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env
    if stopped:
        raise KeyboardInterrupt


def search(cfg: ExperimentConfig, exp_dir: str, storage: str, name: str, resume: bool, max_depth: int,
           local_dir: Path) -> Any:
    """Runs (or, with `resume`, restores) the Tuner; `exp_dir` is where Tune writes (maybe a URI), `local_dir` the
    experiment's local directory (oodray's own files)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    pareto = cfg.tune.objective == "pareto"
    # Trial drivers run on any node: they get the cache directory this driver resolved (a node's own OODRAY_CACHE or
    # home directory would hold no classifier and no oblivious cache).
    base = cfg.replace(cache_dir=str(cfg.resolved_cache_dir().absolute())).to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=base, exp_dir=str(exp_dir)), {"CPU": DRIVER_CPUS})
    live = trial_table("robust_accuracy" if pareto else "objective", "max")  # also for restore
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        with _graceful_stop():
            return tuner.fit()
    space = narrowed_space(cfg.tune.space)
    seed = cfg.train.seed
    param_space: dict[str, Any] = {}
    if cfg.tune.scheduler == "bohb":  # BOHB's own model proposes the configurations (HyperBandForBOHB below)
        from ray.tune.search.bohb import TuneBOHB

        cs, param_space = config_space(space, max_depth, seed)
        searcher = TuneBOHB(space=cs, metric="objective", mode="max", seed=seed)
    elif pareto:
        searcher = OptunaSearch(space=DefineByRun(space, max_depth),
                                metric=["robust_accuracy", "clean_accuracy"], mode=["max", "max"],
                                sampler=optuna.samplers.NSGAIISampler(seed=seed, population_size=4))
    else:
        searcher = OptunaSearch(space=DefineByRun(space, max_depth), metric="objective", mode="max",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS))
    scheduler = build_scheduler(cfg, Path(local_dir) / SCHEDULER_STATE)
    concurrency = cfg.tune.max_concurrent or cluster_concurrency(cfg)
    log.info("search: %d trials, %d at a time, objective %s", cfg.tune.num_samples, concurrency, cfg.tune.objective)
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[ReleaseOrphanedPlacementGroups()], **live),
    )
    with _graceful_stop():
        return tuner.fit()


def build_scheduler(cfg: ExperimentConfig, state_path: Path) -> Any:
    """The trial scheduler `tune.scheduler` names: ASHA (resumable), synchronous HyperBand (BOHB's variant, which
    tells the BOHB searcher each rung's results), or none (FIFO)."""
    from ray.tune.schedulers import HyperBandForBOHB, HyperBandScheduler

    t = cfg.tune
    common = {"metric": "robust_accuracy" if t.objective == "pareto" else "objective", "mode": "max",
              "time_attr": "epoch", "max_t": cfg.train.epochs, "reduction_factor": t.reduction_factor}
    if t.scheduler == "asha":
        return ResumableASHA(str(state_path), grace_period=min(t.grace_period, cfg.train.epochs), **common)
    if t.scheduler == "hyperband":
        return HyperBandScheduler(**common)
    if t.scheduler == "bohb":
        return HyperBandForBOHB(**common)
    return None


def check_bohb_installed() -> None:
    """`tune.scheduler=bohb` runs Ray's TuneBOHB, which needs two optional packages: refused before Ray starts."""
    missing = [m for m in ("ConfigSpace", "hpbandster") if importlib.util.find_spec(m) is None]
    if missing:
        raise OodrayError(f"tune.scheduler=bohb needs {' and '.join(missing)}, not installed here; install them with "
                          "pip install 'oodray[bohb]' (or choose tune.scheduler asha, hyperband or fifo)")


def top_trials(cfg: ExperimentConfig, exp_dir: Path) -> list[dict[str, Any]]:
    """The search's best `tune.final_top_k` trials that left a checkpoint, best first."""
    trials = rank_trials(load_trials(exp_dir), cfg.tune.objective)
    return [t for t in trials if t.get("checkpoint")][: cfg.tune.final_top_k]


def final_evaluation(cfg: ExperimentConfig, exp_dir: Path,
                     refits: list[tuple[ExperimentConfig, str, str]] | None = None) -> None:
    """Full AutoAttack on the undefended classifier and on the refit models (when the search has a refit stage), else
    on the top-k trials, in this run; finished ones are kept."""
    jobs: list[tuple[ExperimentConfig, str | None, str]] = [
        (cfg.replace(**{"translator.arch": "identity"}), None, "undefended")]
    if refits:
        jobs += refits
    else:
        jobs += [(ExperimentConfig.from_dict(t["config"]), t["checkpoint"], trial_name(t['trial_id']))
                 for t in top_trials(cfg, exp_dir)]
    for job_cfg, ckpt, label in Progress("final AutoAttack", len(jobs), "models").track(jobs):
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
    p.add_argument("--final-top-k", type=int,
                   help="trials evaluated with full AutoAttack after the search (refit first with a refit budget)")
    p.add_argument("--refit-epochs", type=int, help="refit the top-k configurations from scratch for this many epochs")
    p.add_argument("--refit-match", action="append", metavar="EVAL_DIR",
                   help="refit at the training compute of the strongest of these evaluated baselines (repeatable)")
    p.add_argument("--storage", help="local path, shared path or s3:// / gs:// URI (default: runs)")
    p.add_argument("--name", help="experiment name (default: derived from the config)")
    p.add_argument("--local-dir", default="runs", help="local staging directory when --storage is a URI")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment of the same name")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    cfg = config_from_args(args, {
        "tune": {"objective": args.objective, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "final_top_k": args.final_top_k, "refit_epochs": args.refit_epochs,
                 "refit_match": args.refit_match},
        "train": {"epochs": args.epochs, "workers": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker},
        "storage": args.storage, "name": args.name})
    space = narrowed_space(cfg.tune.space)  # bad narrowing, or a value the config refuses, fails before anything starts
    validate_space(cfg, space)
    if cfg.tune.scheduler == "bohb":
        check_bohb_installed()
    storage = storage_uri(cfg.storage)
    name = experiment_name(cfg, cfg.tune.objective)
    safe_child(storage, name)  # a name may not climb out of the storage directory ('..', absolute)
    # With a URI, Tune/Train write there directly and oodray's own files are staged locally, then mirrored.
    exp_uri = storage_join(storage, name) if is_uri(storage) else str(Path(storage) / name)
    exp_dir = Path(args.local_dir) / name if is_uri(storage) else Path(storage) / name
    # One writer per experiment, before the checks below and before Ray starts; for a URI, its staging directory.
    hold_lock(exp_dir, "local staging directory" if is_uri(storage) else "experiment directory")
    found = exists(storage_join(exp_uri, "tuner.pkl")) if is_uri(storage) else (exp_dir / "tuner.pkl").exists()
    started = (exists(storage_join(exp_uri, "oodray_config.json")) if is_uri(storage)
               else (exp_dir / "oodray_config.json").exists())  # stopped before Tune started (e.g. in the cache build)
    if args.resume and not (found or started):
        raise OodrayError(f"--resume: no experiment '{name}' under '{storage}' to resume (looked for {exp_uri})")
    taken = has_content(exp_uri) if is_uri(storage) else any(p.name != LOCK_FILE for p in exp_dir.iterdir())
    if not args.resume and taken:
        raise OodrayError(f"experiment '{exp_uri}' already exists; pass --resume to continue it, or --name for a "
                          "new one (nothing was changed)")
    ensure_writable_dir(exp_dir, "local staging directory" if is_uri(storage) else "storage path")
    if args.resume and started and not is_uri(storage):
        saved = json.loads((exp_dir / "oodray_config.json").read_text())
        if saved != cfg.to_dict():
            diff = sorted(k for k, v in flatten(cfg.to_dict()).items() if flatten(saved).get(k) != v)
            raise OodrayError(f"--resume: experiment '{exp_uri}' was started with another config ({', '.join(diff[:3])}"
                              " differ); resume it with the same command, or pass --name for a new one")
    need_cpu, need_gpu, what = trial_resources(cfg)
    check_resources(need_cpu, need_gpu, what)  # the local machine, before Ray starts
    check_refit(cfg)  # matched baselines evaluated, with their compute
    splits = load_dataset(cfg.data)  # bad data or a bad cached C fail here, before Ray starts or anything is written
    get_classifier(cfg, splits)  # train and cache C once, before trials share it
    if "transfer" in cfg.eval.threat_models:  # the final evaluation's surrogate: refused now if it would be C
        get_classifier(surrogate_config(cfg), splits)
    arch_kind, archs = space["translator.arch"]
    for arch in [archs] if arch_kind == "fixed" else archs:  # a translator the search may pick must exist and fit
        build_translator(cfg.replace(**{"translator.arch": arch}).translator, splits.info.channels,
                         splits.info.image_size)
    variants = cache_variants(cfg, space)  # caches that cannot fit are refused before Ray starts, all together
    check_cache_space(variants, [classifier_path(v) for v in variants], len(splits.train))
    resume_cmd = " ".join(["python -m oodray.tune", *map(shlex.quote, sys.argv[1:] if argv is None else argv),
                           *([] if args.resume else ["--resume"])])
    step = "starting Ray"
    try:
        init_ray()
        check_storage(storage)
        cluster_concurrency(cfg)
        if cfg.translator.gate:
            log.info("gated translators: inputs under the Mahalanobis threshold skip T")
        save_config(cfg, exp_dir, "oodray_config.json")
        if is_uri(storage):
            mirror_up(exp_dir, exp_uri, ["oodray_config.json"])
        step = "the oblivious-cache build"
        precompute_caches(cfg, space, splits.train)
        max_depth = int(math.log2(min(splits.info.image_size)))
        t0 = time.time()
        step = "the search"
        grid = search(cfg, exp_uri, storage, name, args.resume and found, max_depth, exp_dir)
        errors = [r.error for r in grid if r.error]
        if errors:
            log.warning("%d trials failed; first error: %s", len(errors), errors[0])
        log.info("search finished in %.0fs", time.time() - t0)
        if is_uri(storage):
            mirror_down(exp_uri, exp_dir)
        if not load_trials(exp_dir):
            raise RunFailed(f"no trial reported a result ({len(errors)} failed; first error: "
                            f"{str(errors[0]).strip().splitlines()[-1] if errors else 'none'}); nothing to evaluate")
        refits = None
        if cfg.tune.refit_epochs is not None or cfg.tune.refit_match:
            step = "the refit"
            refits = run_refits(cfg, top_trials(cfg, exp_dir), exp_uri, exp_dir, len(splits.train))
        step = "the final AutoAttack evaluation"
        final_evaluation(cfg, exp_dir, refits)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped during {step}; finished work is kept in {exp_uri}. Resume with: "
                          f"{resume_cmd}") from None
    end_ray()
    table = build_table(exp_dir)
    plots = write_outputs(table, exp_dir)
    print_leaderboard(exp_dir, table)  # results.md keeps every column
    if is_uri(storage):
        mirror_up(exp_dir, exp_uri, ["eval", *RESULT_FILES])
        print(f"\nexperiment: {exp_uri} (staged locally in {exp_dir})")
    print(f"\nexperiment: {exp_dir}\n{files_line(exp_dir, plots)}")
    return 0


if __name__ == "__main__":
    run(main)
