"""`python -m oodray.evaluate`: AutoAttack and natural-shift evaluation of a defended model C(T(.)), fanned out as Ray
tasks; resumable.

    python -m oodray.evaluate --checkpoint runs/train-digits-unet-<hash>/checkpoint_<time>/translator.pt
    python -m oodray.evaluate --translator identity --dataset digits --n-examples 100    # the undefended C
    python -m oodray.evaluate --translator bitdepth --dataset digits --eps 0.1,0.2,0.3   # BPDA baseline
    python -m oodray.evaluate --checkpoint CKPT --threat-models adaptive --norm Linf,L2 --eps 0.5 --shards 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from oodray.cli import add_config_args, config_from_args, end_ray, setup_logging
from oodray.config import ExperimentConfig, config_for_checkpoint
from oodray.errors import ConfigError
from oodray.evaluate.driver import run_evaluation, summary_tables
from oodray.evaluate.plan import BASELINES
from oodray.io import safe_child
from oodray.models.translator import load_translator_checkpoint
from oodray.storage import is_uri


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.1,0.2") from None


def default_out_and_label(cfg: ExperimentConfig, checkpoint: str | None, epoch: int | None) -> tuple[Path, str]:
    """`<run dir>/eval/epoch<N>` for a checkpoint in a Ray run, else `runs/eval/<dataset>-<translator>`."""
    if checkpoint is None:
        root = Path("runs") if is_uri(cfg.storage) else Path(cfg.storage)
        label = f"{cfg.data.name}-{cfg.translator.arch}"
        return root / "eval" / label, label
    p = Path(checkpoint)
    d = p if p.is_dir() else p.parent
    run_dir = d.parent if d.name.startswith("checkpoint_") else d
    return safe_child(run_dir / "eval", f"epoch{epoch}"), f"{run_dir.name}-epoch{epoch}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodray.evaluate", description=__doc__.split("\n")[0])
    add_config_args(p)
    p.add_argument("--checkpoint", help="translator checkpoint: a translator.pt file or a Ray checkpoint directory")
    p.add_argument("--translator", help="instead of --checkpoint: a baseline that needs none (identity, bitdepth)")
    p.add_argument("--threat-models", help="comma-separated: oblivious,adaptive,transfer")
    p.add_argument("--norm", help="comma-separated: Linf,L2 (default: the config's attack.norm)")
    p.add_argument("--eps", help="comma-separated radii in [0,1] pixels, for every norm (default: attack.eps)")
    p.add_argument("--n-examples", type=int, help="size of the fixed evaluation subset of the test split")
    p.add_argument("--version", help="AutoAttack version: standard, plus or rand")
    p.add_argument("--shards", type=int, help="Ray tasks per attack (at most one per block)")
    p.add_argument("--batch-size", type=int, help="largest AutoAttack block (eval.batch_size)")
    p.add_argument("--gpus-per-task", type=float)
    p.add_argument("--cpus-per-task", type=float)
    p.add_argument("--seed", type=int, help="evaluation seed: the subset, AutoAttack and shift noise")
    p.add_argument("--no-shifts", action="store_true", help="skip the natural shifts")
    p.add_argument("--out", help="output directory (default: <run dir>/eval/epoch<N> or runs/eval/<dataset>-<T>)")
    p.add_argument("--label", help="name of this evaluation in every output (default: derived)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    eval_layer = {"threat_models": args.threat_models, "norms": args.norm, "eps": _floats(args.eps, "--eps"),
                  "n_examples": args.n_examples, "version": args.version, "shards": args.shards,
                  "batch_size": args.batch_size, "gpus_per_task": args.gpus_per_task,
                  "cpus_per_task": args.cpus_per_task, "seed": args.seed, "shifts": False if args.no_shifts else None}
    if args.checkpoint and args.translator:
        raise ConfigError("give either --checkpoint PATH or --translator identity|bitdepth, not both")
    epoch = None
    if args.checkpoint:
        state = load_translator_checkpoint(args.checkpoint)
        epoch = state.get("epoch")
        layer = {"eval": eval_layer, "data": {"data_dir": args.data_dir}, "cache_dir": args.cache_dir}
        cfg = config_for_checkpoint(state, dataset=args.dataset, yaml_path=args.config, overrides=args.overrides,
                                    layer=layer)
    else:
        if not args.translator:
            raise ConfigError("give --checkpoint PATH (a trained translator) or --translator identity|bitdepth")
        if args.translator not in BASELINES:
            raise ConfigError(f"--translator {args.translator!r} needs a trained checkpoint (--checkpoint PATH); "
                              f"without one choose {' or '.join(BASELINES)}")
        cfg = config_from_args(args, {"eval": eval_layer, "translator": {"arch": args.translator}})
    out, label = default_out_and_label(cfg, args.checkpoint, epoch)
    out, label = Path(args.out) if args.out else out, args.label or label
    t0 = time.time()
    summary = run_evaluation(cfg, checkpoint=args.checkpoint, out_dir=out, label=label)  # EvaluationFailed: exit 1
    end_ray()
    attacks, shifts = summary_tables(summary)
    print(f"\n{label}: {cfg.data.name}, translator {summary['translator']}, {summary['n_examples']} examples, "
          f"AutoAttack {cfg.eval.version} [{time.time() - t0:.0f}s]\n")
    print(attacks.to_markdown(index=False, floatfmt=".4f"))
    if len(shifts):
        print("\nnatural shifts (accuracy, mean over severities 1-5):\n")
        print(shifts.to_markdown(index=False, floatfmt=".4f"))
    for s in summary["sanity"]:
        print(f"sanity [{s['kind']}] {s['threat_model']} {s.get('norm', '')} {s.get('eps', '')}: {s['detail']}")
    print(f"\nresults: {out}")
    return 0
