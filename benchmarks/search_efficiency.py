"""Search efficiency of the scheduler, measured in one run: the same seeded search (same Optuna sampler, same
trials proposed) with ASHA and with every trial run to its full budget (FIFO). Prints the total trial-epochs each
spent and how many ASHA spent before one of its trials reached the best proxy robust accuracy that the
full-budget run found.

    python benchmarks/search_efficiency.py [--dataset digits] [--num-samples 6] [--epochs 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from oodray.results import load_trials


def run_search(storage: Path, name: str, args: argparse.Namespace, scheduler: str) -> list[dict]:
    cmd = [sys.executable, "-m", "oodray.tune", "--dataset", args.dataset, "--num-samples", str(args.num_samples),
           "--epochs", str(args.epochs), "--final-top-k", "0", "--max-concurrent", "1", "--storage", str(storage),
           "--name", name, "--set", f"tune.scheduler={scheduler}", "--set", "tune.space={train.regime: [oblivious]}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return load_trials(storage / name)


def epochs_to_reach(trials: list[dict], target: float, key: str = "robust_accuracy") -> int | None:
    """Trial-epochs spent (trials in start order, max_concurrent=1) until some epoch reports >= target."""
    spent = 0
    for t in sorted(trials, key=lambda t: t["history"][0].get("timestamp", 0)):
        for row in t["history"]:
            spent += 1
            if (row.get(key) or 0.0) >= target:
                return spent
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="oodray-search-"))
    full = run_search(storage, "fifo", args, "fifo")
    asha = run_search(storage, "asha", args, "asha")
    best = max(max(r.get("robust_accuracy") or 0.0 for r in t["history"]) for t in full)
    total_full = sum(len(t["history"]) for t in full)
    total_asha = sum(len(t["history"]) for t in asha)
    reach = epochs_to_reach(asha, best)
    print(f"{args.dataset}: {args.num_samples} trials x up to {args.epochs} epochs, one at a time, same seed")
    print(f"full budget (FIFO): {total_full} trial-epochs; best proxy robust accuracy {best:.4f}")
    print(f"ASHA:               {total_asha} trial-epochs ({total_asha / total_full:.2f} of full); best "
          f"{max(max(r.get('robust_accuracy') or 0.0 for r in t['history']) for t in asha):.4f}; "
          + (f"reached {best:.4f} after {reach} trial-epochs ({reach / total_full:.2f} of full)" if reach
             else "never reached the full-budget best"))


if __name__ == "__main__":
    main()
