"""Robust accuracy vs training compute, from the evaluations of a budget experiment (experiments/<dataset>-budget.sh):
a Markdown table on stdout and two plots, `robust-vs-compute.png` and `clean-vs-robust.png`, written beside it.

    python experiments/budget_curves.py OUT SEARCH PLOT_PREFIX > experiments/results/fashion-mnist-budget.md

OUT holds the baselines' evaluation directories (`pgd-at-e<B>`, `trades-e<B>`, and the undefended `undefended`);
SEARCH is the search experiment whose refits (`eval/refit-*-b<B>`) are the translator's points. Every row carries
its training compute (forward+backward passes per example summed, `oodray.compute`) and the measured training and
evaluation wall seconds, read from the evaluations' summary.json files, never typed in.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from oodray.config import flatten  # noqa: E402
from oodray.evaluate.wall import EVAL_SECONDS_NOTE, EVAL_SECONDS_STAR, eval_seconds_cell  # noqa: E402

METHODS = {"pgd-at": "PGD-AT", "trades": "TRADES", "refit": "translator (refit of the best searched config)"}


def _row(path: Path) -> dict:
    s = json.loads(path.read_text())
    label = s.get("label") or path.parent.name
    method = next((m for m in METHODS if label.startswith(m)), "undefended")
    budget = re.search(r"-[eb](\d+(?:\.\d+)?)$", label)
    robust = s.get("robust") or {}
    adaptive = next((v for k, v in robust.items() if k.startswith("adaptive/")), None)
    oblivious = next((v for k, v in robust.items() if k.startswith("oblivious/")), None)
    tc = s.get("training_compute") or {}
    walls = [tc.get(k) for k in ("classifier_wall_seconds", "translator_wall_seconds") if tc.get(k) is not None]
    shifts = s.get("shifts") or {}
    return {
        "method": METHODS.get(method, method), "label": label, "budget": float(budget.group(1)) if budget else None,
        "compute (passes)": tc.get("passes"),
        "clean": s.get("clean_accuracy_defended"), "AA adaptive": adaptive,
        # No translator: the oblivious attacker is the adaptive one (one AutoAttack run on C).
        "AA oblivious": oblivious if oblivious is not None or s.get("translator") != "identity" else adaptive,
        "AA transfer": next((v for k, v in robust.items() if k.startswith("transfer/")), None),
        "shifts": sum(v["defended"] for v in shifts.values()) / len(shifts) if shifts else None,
        "train s": round(sum(walls)) if walls else None,
        "eval s": eval_seconds_cell(s),
        "surrogate s": s.get("surrogate_train_seconds"),
        "n": s.get("n_examples"), "sanity": "; ".join(t.get("kind", "") for t in s.get("sanity") or []) or "none",
        "_config": s.get("config") or {},
    }


def main() -> None:
    out, search, prefix = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    paths = sorted(out.glob("*/summary.json")) + sorted(search.glob("eval/refit-*-b*/summary.json"))
    if not paths:
        raise SystemExit(f"no evaluations under {out} or {search}/eval/refit-*-b*")
    rows = [_row(p) for p in paths]
    df = pd.DataFrame(rows).sort_values(["method", "compute (passes)"], na_position="first")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, g in df[df["compute (passes)"].notna()].groupby("method"):
        g = g.sort_values("compute (passes)")
        a.plot(g["compute (passes)"], g["AA adaptive"], "o-", label=method)
        b.plot(g["clean"], g["AA adaptive"], "o-", label=method)
        for _, r in g.iterrows():
            a.annotate(r["label"], (r["compute (passes)"], r["AA adaptive"]), fontsize=6, xytext=(2, 2),
                       textcoords="offset points")
    a.set_xscale("log")
    a.set_xlabel("training compute (forward+backward passes, classifier + translator + cache)")
    a.set_ylabel("AutoAttack robust accuracy (adaptive)")
    b.set_xlabel("clean accuracy")
    b.set_ylabel("AutoAttack robust accuracy (adaptive)")
    a.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{prefix}-curves.png", dpi=120)
    cfg = rows[0]["_config"]
    print(f"# {cfg.get('data', {}).get('name')}: robust accuracy vs training compute, "
          f"{cfg.get('attack', {}).get('norm')} eps {cfg.get('attack', {}).get('eps')}\n")
    print("Made by the budget experiment script (this file is its output). Budget B: PGD-AT trained for B epochs of "
          "PGD-7; TRADES for the epochs nearest the same compute; the translator refit (the search's best config, "
          "from scratch) at PGD-AT's compute of that budget, matched by `python -m oodray.refit --match`. AutoAttack "
          f"on the same fixed {rows[0]['n']} test images for every row. Plot: `{prefix.name}-curves.png`.\n")
    shown = df.drop(columns=["_config"]).rename(columns={"sanity": "sanity tells"})
    whole = {"budget": "{:g}", "compute (passes)": "{:,.0f}", "train s": "{:.0f}", "surrogate s": "{:.0f}",
             "n": "{:.0f}"}
    for col, fmt in whole.items():  # counts and seconds as whole numbers; accuracies keep 3 decimals
        shown[col] = [fmt.format(v) if pd.notna(v) else "" for v in shown[col]]
    shown["eval s"] = shown["eval s"].fillna("")
    print(shown.to_markdown(index=False, floatfmt=".3f"))
    print("\n`train s`: the defence's training wall seconds (classifier, and translator when there is one). `eval s`: "
          + EVAL_SECONDS_NOTE
          + ("; " + EVAL_SECONDS_STAR if shown["eval s"].str.endswith("*").any() else "")
          + ". `surrogate s`: the training of the transfer attack's surrogate classifier, not in `eval s`; it is "
          "trained once and shared by every row with the same surrogate config.")
    print("\nEach row's resolved config differs from the first row's in:\n")
    base = flatten(rows[0]["_config"])
    for r in rows:
        diff = {k: v for k, v in flatten(r["_config"]).items() if base.get(k) != v and not k.startswith(("name",))}
        print(f"- **{r['label']}**: " + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(diff.items()))
                                         or "none"))


if __name__ == "__main__":
    main()
