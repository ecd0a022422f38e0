"""The plots of an experiment: clean vs robust accuracy (`pareto.png`), accuracy vs shift severity per shift, C vs C(T)
(`shifts.png`), robust accuracy vs eps (`robust-vs-eps.png`, when several eps were evaluated) and vs training compute
(`robust-vs-compute.png`, when trials report it). Each is written atomically; matplotlib draws off-screen (Agg)
and is imported only when a plot is drawn (heavy import)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from oodray.summaries import eval_summaries, read_shifts


def _robust_column(table: pd.DataFrame) -> str | None:
    cols = [c for c in table.columns if c.startswith("AA adaptive/")]
    return cols[0] if cols else None


def plot_pareto(table: pd.DataFrame, path: Path) -> None:
    """Clean vs robust accuracy: AutoAttack adaptive where evaluated, else the proxy; undefended as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    trials = table[table["trial"] != "undefended"]
    if len(trials):  # an experiment whose search finished no trial still plots its undefended classifier
        ax.scatter(trials["clean acc (proxy)"], trials["robust acc (proxy, adaptive PGD)"], c="tab:blue",
                   label="trials (proxy: PGD end to end, validation)")
    rc = _robust_column(table)
    if rc:
        ev = table[table[rc].notna()]
        ax.scatter(ev["AA clean C(T)"], ev[rc], marker="s", c=["tab:red" if t == "undefended" else "tab:green"
                                                              for t in ev["trial"]], s=60)
        for _, r in ev.iterrows():
            ax.annotate(r["trial"], (r["AA clean C(T)"], r[rc]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], marker="s", c="tab:green", label=f"{rc} (test subset)")
        ax.scatter([], [], marker="s", c="tab:red", label="undefended classifier")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("robust accuracy")
    ax.set_title("clean vs robust accuracy (adaptive attacker)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_extras(exp_dir: Path) -> list[Path]:
    """Robust accuracy vs eps and accuracy vs shift severity, where the experiment's evaluations support them;
    returns those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_dir, written = Path(exp_dir), []
    summaries = eval_summaries(exp_dir) if (exp_dir / "eval").is_dir() else {}
    # Robust accuracy vs eps: only when some evaluation has more than one eps for a norm.
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, s in summaries.items():
        for key, acc in (s.get("robust") or {}).items():
            threat, norm, eps = key.split("/")
            if threat == "adaptive":
                curves.setdefault(norm, {}).setdefault(label, []).append((float(eps), acc))
    norms = [n for n, by in curves.items() if any(len(c) > 1 for c in by.values())]
    if norms:
        fig, axes = plt.subplots(1, len(norms), figsize=(5.0 * len(norms), 4.0), squeeze=False)
        for ax, norm in zip(axes[0], norms):
            for label, c in sorted(curves[norm].items()):
                ax.plot(*zip(*sorted(c)), marker="o", label=label)
            ax.set_xlabel(f"eps ({norm})")
            ax.set_ylabel("robust accuracy (adaptive AutoAttack)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _save(fig, exp_dir / "robust-vs-eps.png")
        written.append(exp_dir / "robust-vs-eps.png")
    # Accuracy vs shift severity, per shift: C (dashed) against each evaluated defence's C(T).
    per = {label: read_shifts(exp_dir / "eval" / label / "shifts.json") for label in summaries
           if (exp_dir / "eval" / label / "shifts.json").exists()}
    if per:
        names = sorted({n for v in per.values() for n in v})
        cols = min(3, len(names))
        fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4.0 * cols, 3.2 * math.ceil(
            len(names) / cols)), squeeze=False)
        # C: the undefended evaluation's classifier (a baseline such as PGD-AT brings its own C, drawn as its C(T)).
        ref = per.get("undefended") or next(iter(per.values()))
        for ax, name in zip(axes.flat, names):
            if name in ref:
                sev = sorted(ref[name]["severity"], key=int)
                ax.plot([int(k) for k in sev], [ref[name]["severity"][k]["classifier"] for k in sev], "k--", label="C")
            for label, shifts in sorted(per.items()):
                if name in shifts and label != "undefended":  # the undefended C(T) is C
                    sev = sorted(shifts[name]["severity"], key=int)
                    ax.plot([int(k) for k in sev], [shifts[name]["severity"][k]["defended"] for k in sev], marker="o",
                            label=f"C(T) {label}")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("severity")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        _save(fig, exp_dir / "shifts.png")
        written.append(exp_dir / "shifts.png")
    return written


def plot_compute(trials: pd.DataFrame, path: Path) -> None:
    """Robust accuracy (AutoAttack adaptive where evaluated, else the proxy) vs training compute, one point a trial;
    `trials` are leaderboard rows with `compute`, `compute unit`, `AA adaptive`, `proxy` and `defence`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    y = trials["AA adaptive"].fillna(trials["proxy"])
    ax.scatter(trials["compute"], y, c=["tab:green" if v else "tab:blue" for v in trials["AA adaptive"].notna()])
    for (_, r), v in zip(trials.iterrows(), y):
        ax.annotate(r["defence"], (r["compute"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if trials["compute"].max() > 100 * trials["compute"].min():
        ax.set_xscale("log")
    ax.set_xlabel(f"training compute ({trials['compute unit'].iloc[0]})")
    ax.set_ylabel("robust accuracy (AutoAttack adaptive; blue: proxy)")
    ax.grid(alpha=0.3)
    _save(fig, path)
