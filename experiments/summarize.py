"""Builds the defence x {clean, oblivious, adaptive, transfer, shifts} table of an experiment directory made by
experiments/<dataset>.sh, from the evaluation summary.json files, as Markdown on stdout.

    python experiments/summarize.py runs/digits-experiment > experiments/results/digits.md

The rows are read by the results leaderboard (`oodray.results.summary_rows`, the same reader as
`python -m oodray.results OUT/search OUT/eval/*`, which prints them ranked by threat model); this file keeps its
own layout: one row per evaluation in path order, every threat model and shift as a column."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from oodray.config import flatten
from oodray.evaluate.wall import EVAL_SECONDS_NOTE, EVAL_SECONDS_STAR, eval_seconds_cell
from oodray.results import THREATS, summary_rows


def _differences(row_cfg: dict, search_cfg: dict) -> dict:
    """The settings of one row's resolved config that differ from the search config (bookkeeping keys left out)."""
    skip = ("name", "storage", "cache_dir")
    a, b = flatten(row_cfg), flatten(search_cfg)
    return {k: v for k, v in sorted(a.items())
            if not k.startswith(skip) and not k.startswith("tune.") and b.get(k, object()) != v}


def _row(s: dict, label: str) -> dict:
    """One evaluation as a wide row, from the leaderboard's per-threat-model rows of its summary.json. Columns: the
    attacks in the summary's key order, then those the leaderboard fills (identity: oblivious = adaptive)."""
    recs = summary_rows(s, label, "", "")
    row = {"defence": label, "translator": s.get("translator"), "clean C": recs[0]["clean C"],
           "clean C(T)": recs[0]["clean C(T)"]}
    attacks = {f"{t}/{r['norm']}/{r['eps']:g}": r[f"AA {t}"] for r in recs for t in THREATS
               if pd.notna(r.get(f"AA {t}"))}
    for k in sorted(s.get("robust", {})) + sorted(set(attacks) - set(s.get("robust", {}))):
        threat, rest = k.split("/", 1)
        row[f"{threat} ({rest})"] = attacks[k]
    row.update({k[len("shift "):]: v for k, v in recs[0].items() if k.startswith("shift ")})
    tc = s.get("training_compute") or {}
    row["compute (passes)"] = f"{tc['passes']:.3g}" if tc.get("passes") is not None else "not recorded"
    walls = [tc.get(k) for k in ("classifier_wall_seconds", "translator_wall_seconds") if tc.get(k) is not None]
    row["train s"] = round(sum(walls)) if walls else None
    row["eval s"] = eval_seconds_cell(s)
    return row


def main() -> None:
    out = Path(sys.argv[1])
    rows, configs, tells = [], [], []
    summaries = sorted(out.glob("search/eval/*/summary.json")) + sorted(out.glob("eval/*/summary.json"))
    for path in summaries:
        s = json.loads(path.read_text())
        row = _row(s, s.get("label", path.parent.name))
        rows.append(row)
        ckpt = s.get("checkpoint")
        if ckpt and Path(ckpt).is_absolute() and Path(ckpt).is_relative_to(Path.cwd()):
            ckpt = str(Path(ckpt).relative_to(Path.cwd()))
        configs.append((row["defence"], ckpt, s.get("config") or {}))
        tells.extend((row["defence"], t) for t in s.get("sanity") or [])
    table = pd.DataFrame(rows)
    cfg = json.loads((out / "search" / "oodray_config.json").read_text())
    print(f"# {cfg['data']['name']}: defences under AutoAttack ({cfg['eval']['version']}), "
          f"{cfg['attack']['norm']} eps {cfg['attack']['eps']:g}\n")
    print(f"Made by `bash experiments/{cfg['data']['name']}.sh` (this file is its output; rows: the best searched "
          "translator, the undefended classifier and the baselines; robust accuracy on the fixed test subset of "
          f"{cfg['eval']['n_examples']} images).\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print("\nRows with the identity translator (no translator in front of C) have one attacker for oblivious and "
          "adaptive: the same AutoAttack run on C fills both columns. Shift columns: accuracy of C(T(.)) averaged "
          "over severities 1-5. compute: the defence's whole training compute in forward+backward passes per example "
          "(classifier + translator + its oblivious cache; PGD-k steps count k, see oodray/compute.py); train s: "
          f"measured training wall seconds (classifier + translator); eval s: {EVAL_SECONDS_NOTE}"
          + (f"; {EVAL_SECONDS_STAR}" if table["eval s"].astype(str).str.endswith("*").any() else "") + ".\n")
    print("Sanity tells of the evaluation (gradient masking, AutoAttack's own warnings):" +
          (" none fired." if not tells else "\n"))
    for label, t in tells:
        where = " ".join(str(t.get(k)) for k in ("threat_model", "norm", "eps") if t.get(k) is not None)
        print(f"- **{label}**, {where}: {t.get('kind')}: {t.get('detail')}")
    print("\nResolved search config:\n")
    print("```json\n" + json.dumps(cfg, indent=1, sort_keys=True) + "\n```")
    print("\nEach row's own resolved config (saved in its `summary.json`), as the settings that differ from the search "
          "config above:\n")
    for label, checkpoint, row_cfg in configs:
        diff = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in _differences(row_cfg, cfg).items())
        print(f"- **{label}**" + (f" (checkpoint `{checkpoint}`)" if checkpoint else "") + f": {diff or 'none'}")


if __name__ == "__main__":
    main()
