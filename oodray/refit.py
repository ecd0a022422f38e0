"""The refit stage of a search: the top-k configurations retrained from scratch at a final budget, so that the defence
reported is trained as long as what it is compared with, not for the search's small per-trial budget.

The budget is `tune.refit_epochs` (full epochs of the training split), or, with `tune.refit_match` (evaluation
directories of baselines, e.g. PGD-AT's), the training compute of the strongest of them (highest adaptive AutoAttack
accuracy), matched in forward+backward passes (`oodray.compute`): classifier C + translator + its oblivious cache
together get what the baseline spent, to within one batch. Each refit is an ordinary Ray Train run under
`<experiment>/refit/<trial>` (same seed, the trial's sampled settings), so an interrupted refit resumes from its latest
checkpoint when the experiment is resumed.

ray is imported by `oodray.train`'s functions, inside them. `python -m oodray.refit EXPERIMENT` refits an experiment
that has finished its search (the budget experiment's way to refit one search at several budgets).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodray.attacks import attack_specs
from oodray.cli import run, setup_logging
from oodray.compute import attack_passes, translator_step_passes
from oodray.config import ExperimentConfig, classifier_key
from oodray.data import load_dataset
from oodray.errors import CheckpointError, ConfigError, OodrayError, RunFailed
from oodray.evaluate import run_evaluation
from oodray.io import read_json
from oodray.locks import hold as hold_lock
from oodray.models.translator import CHECKPOINT_FILE, load_translator_checkpoint
from oodray.progress import Progress
from oodray.results import recorded_classifier_passes
from oodray.runtime import init_ray
from oodray.search_space import trial_name
from oodray.storage import is_uri, mirror_down
from oodray.storage import join as storage_join
from oodray.summaries import read_summary
from oodray.tables import load_trials, rank_trials
from oodray.train import fit_translator, prepare_run, resume_checkpoint

log = logging.getLogger(__name__)
REFIT_DIR = "refit"


@dataclass(frozen=True)
class Budget:
    epochs: int
    max_batches: int | None  # batches per worker per epoch; None: whole epochs
    passes: float  # the translator's own passes this buys
    why: str


def baseline_budget(dirs: tuple[str, ...]) -> tuple[float, str]:
    """(total training passes, its name) of the strongest baseline among evaluation directories: highest adaptive
    AutoAttack robust accuracy (its first threat-model key). A directory without a summary or without recorded compute
    is a one-line error."""
    best: tuple[float, float, str] | None = None
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"tune.refit_match: '{d}' holds no summary.json; give evaluation directories made by "
                              "python -m oodray.evaluate --out DIR")
        s = read_summary(path)
        passes = (s.get("training_compute") or {}).get("passes")
        if passes is None:
            raise ConfigError(f"tune.refit_match: '{d}' records no training compute (evaluated before compute was "
                              "recorded); evaluate it again with this version")
        adaptive = [v for k, v in (s.get("robust") or {}).items() if k.startswith("adaptive/")]
        if not adaptive:
            raise ConfigError(f"tune.refit_match: '{d}' has no adaptive AutoAttack result to rank it by")
        cand = (adaptive[0], float(passes), s.get("label") or Path(d).name)
        best = cand if best is None or cand[0] > best[0] else best
    assert best is not None
    return best[1], best[2]


def classifier_passes_or_fail(cfg: ExperimentConfig) -> float:
    """The training passes recorded for the experiment's classifier; a one-line error when it recorded none."""
    passes = recorded_classifier_passes(cfg)
    if passes is None:
        path = cfg.resolved_cache_dir() / "classifiers" / classifier_key(cfg) / "metrics.json"
        raise ConfigError(f"the fixed classifier's training compute is not recorded in '{path}' (trained by an older "
                          "version); retrain it (python -m oodray.classifier --force) to match a baseline's budget")
    return float(passes)


def refit_budget(base: ExperimentConfig, trial: ExperimentConfig, n_train: int) -> Budget:
    """The refit budget of one trial's configuration: `tune.refit_epochs`, or the strongest matched baseline's."""
    t = base.tune
    per_example = translator_step_passes(trial.train.regime, attack_specs(trial), tuple(trial.loss.weights()))
    if t.refit_epochs is not None:
        return Budget(t.refit_epochs, None, t.refit_epochs * n_train * per_example,
                      f"{t.refit_epochs} epochs (tune.refit_epochs)")
    target, name = baseline_budget(t.refit_match)
    cache = attack_passes(attack_specs(trial)) * n_train if trial.train.regime == "oblivious" else 0.0
    own = target - classifier_passes_or_fail(trial) - cache
    if own <= 0:
        raise ConfigError(f"tune.refit_match: baseline '{name}' spent {target:.3g} passes, no more than the classifier "
                          f"and cache alone ({target - own:.3g}); give tune.refit_epochs instead")
    examples = own / per_example
    epochs = max(1, math.ceil(examples / n_train))
    per_worker_batch = trial.train.batch_size * trial.train.workers
    batches = math.ceil(examples / (epochs * per_worker_batch))
    full = math.ceil(n_train / per_worker_batch)
    return Budget(epochs, None if batches >= full else batches, own,
                  f"matched to '{name}' ({target:.3g} passes in all): {examples / n_train:.2f} epochs-equivalent of "
                  f"{per_example:g} passes per example")


def refit_configs(cfg: ExperimentConfig, top: list[dict[str, Any]], n_train: int,
                  ) -> list[tuple[str, ExperimentConfig, Budget]]:
    """(label, config, budget) of each refit: the trial's resolved config at the refit budget, from scratch."""
    out = []
    for t in top:
        trial_cfg = ExperimentConfig.from_dict(t["config"])
        b = refit_budget(cfg, trial_cfg, n_train)
        out.append((f"refit-{trial_name(t['trial_id'])}",
                    trial_cfg.replace(**{"train.epochs": b.epochs, "train.max_batches": b.max_batches}), b))
    return out


def finished_refit(run_dir: Path, rcfg: ExperimentConfig) -> Path | None:
    """The checkpoint file of a refit already trained to its whole budget under the same config (as Ray Train would
    resume it, read from the local copy), else None: the refit is (re)started through Ray Train."""
    if not run_dir.is_dir():
        return None
    try:  # a damaged or foreign checkpoint is not kept: Ray Train's resume deals with it as without this shortcut
        resume = resume_checkpoint(run_dir, CHECKPOINT_FILE, load_translator_checkpoint)
        if resume is None:
            return None
        ckpt, state = resume
        same = ExperimentConfig.from_dict(state["config"]) == rcfg
    except (CheckpointError, ConfigError):
        return None
    return ckpt if same and state["epoch"] >= rcfg.train.epochs else None


def run_refits(cfg: ExperimentConfig, top: list[dict[str, Any]], exp_uri: str, exp_dir: Path, n_train: int,
               ) -> list[tuple[ExperimentConfig, str, str]]:
    """Trains each refit under `<exp_uri>/refit/<label>` (a finished or interrupted one resumes by name); returns
    (config, local checkpoint file, label) for the final evaluation."""
    done = []
    jobs = refit_configs(cfg, top, n_train)
    for label, rcfg, budget in Progress("refit", len(jobs), "models").track(jobs):
        kept = finished_refit(exp_dir / REFIT_DIR / label, rcfg)
        if kept is not None:  # no worker group started again for a finished refit (minutes on a GPU cluster)
            log.info("refit %s already trained for its %d epochs; kept", label, rcfg.train.epochs)
            done.append((rcfg, str(kept), label))
            continue
        log.info("refit %s: %s", label, budget.why)
        result = fit_translator(rcfg, prepare_run(rcfg), storage=storage_join(exp_uri, REFIT_DIR), name=label)
        if result.error or result.checkpoint is None:
            raise RunFailed(f"refit {label} failed: {result.error}")
        if is_uri(exp_uri):
            mirror_down(storage_join(exp_uri, REFIT_DIR, label), exp_dir / REFIT_DIR / label)
        ckpt = exp_dir / REFIT_DIR / label / Path(result.checkpoint.path).name / CHECKPOINT_FILE
        done.append((rcfg, str(ckpt), label))
    return done


def check_refit(cfg: ExperimentConfig) -> None:
    """Refit settings checked before Ray starts: matched baselines exist, are evaluated and carry compute."""
    if cfg.tune.refit_epochs is None and cfg.tune.refit_match:
        baseline_budget(cfg.tune.refit_match)


def main(argv: list[str] | None = None) -> int:
    """`python -m oodray.refit EXPERIMENT --epochs E | --match EVAL_DIR ...`: refits the top-k configurations of a
    finished search at that budget into `<experiment>/refit/refit-<trial><suffix>`, then evaluates each with the
    experiment's AutoAttack settings into `<experiment>/eval/` (finished refits and results are reused)."""
    p = argparse.ArgumentParser(prog="python -m oodray.refit", description=main.__doc__.split("\n")[0])
    p.add_argument("experiment", help="a search experiment directory (oodray_config.json, its trials)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--epochs", type=int, help="refit budget in full epochs")
    budget.add_argument("--match", action="append", metavar="EVAL_DIR",
                        help="refit at the training compute of the strongest of these evaluated baselines")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--suffix", default="", help="appended to each refit's name (e.g. -b3 for a budget)")
    p.add_argument("--n-examples", type=int, help="AutoAttack test examples (default: the experiment's)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(quiet=args.quiet)
    exp_dir = Path(args.experiment)
    if not (exp_dir / "oodray_config.json").is_file():
        raise OodrayError(f"'{exp_dir}' is not an oodray search experiment (no oodray_config.json)")
    if args.suffix and not all(c.isalnum() or c in "-_." for c in args.suffix):
        raise ConfigError(f"--suffix '{args.suffix}' may hold only letters, digits, '-', '_' and '.'")
    cfg = ExperimentConfig.from_dict(read_json(exp_dir / "oodray_config.json"))
    over: dict[str, Any] = {"tune.refit_epochs": args.epochs, "tune.refit_match": args.match or [],
                            "tune.final_top_k": args.top_k}
    if args.n_examples is not None:
        over["eval.n_examples"] = args.n_examples
    cfg = cfg.replace(**over)
    top = rank_trials(load_trials(exp_dir), cfg.tune.objective)
    top = [t for t in top if t.get("checkpoint")][: cfg.tune.final_top_k]
    if not top:
        raise OodrayError(f"'{exp_dir}' has no finished trial to refit")
    hold_lock(exp_dir, "experiment directory")
    check_refit(cfg)
    n_train = len(load_dataset(cfg.data).train)
    jobs = refit_configs(cfg, top, n_train)  # budgets checked (a matched baseline too small) before Ray starts
    for label, _, b in jobs:
        print(f"{label}{args.suffix}: {b.epochs} epochs" + (f" of {b.max_batches} batches" if b.max_batches else "")
              + f" ({b.why})")
    init_ray()
    renamed = [{**t, "trial_id": f"{t['trial_id']}{args.suffix}"} for t in top]
    for rcfg, ckpt, label in run_refits(cfg, renamed, str(exp_dir), exp_dir, n_train):
        rcfg = rcfg.replace(**{"eval": cfg.to_dict()["eval"]})
        summary = run_evaluation(rcfg, checkpoint=ckpt, out_dir=exp_dir / "eval" / label, label=label)
        robust = ", ".join(f"{k} {v:.4f}" for k, v in summary["robust"].items())
        print(f"{label}: clean {summary['clean_accuracy_defended']:.4f}; {robust}; training compute "
              f"{summary['training_compute']['passes']:.4g} passes")
    return 0


if __name__ == "__main__":
    run(main)
