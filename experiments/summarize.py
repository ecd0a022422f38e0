"""Builds the defence x {clean, oblivious, adaptive, transfer, shifts} table of an experiment directory made by
experiments/<dataset>.sh, from the evaluation summary.json files, as Markdown on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from oodray.config import flatten


def _differences(row_cfg: dict, search_cfg: dict) -> dict:
    """The settings of one row's resolved config that differ from the search config (bookkeeping keys left out)."""
    skip = ("name", "storage", "cache_dir")
    a, b = flatten(row_cfg), flatten(search_cfg)
    return {k: v for k, v in sorted(a.items())
            if not k.startswith(skip) and not k.startswith("tune.") and b.get(k, object()) != v}


def main() -> None:
    out = Path(sys.argv[1])
    rows, configs, tells = [], [], []
    summaries = sorted(out.glob("search/eval/*/summary.json")) + sorted(out.glob("eval/*/summary.json"))
    for path in summaries:
        s = json.loads(path.read_text())
        row = {"defence": s.get("label", path.parent.name), "translator": s.get("translator"),
               "clean C": s.get("clean_accuracy_classifier"), "clean C(T)": s.get("clean_accuracy_defended")}
        for k, v in sorted(s.get("robust", {}).items()):
            row[k.split("/")[0] + f" ({'/'.join(k.split('/')[1:])})"] = v
        if s.get("translator") == "identity":  # no translator: the oblivious attacker is the adaptive one
            for k in [k for k in row if k.startswith("adaptive (")]:
                row.setdefault("oblivious" + k[len("adaptive"):], row[k])
        for name, v in sorted((s.get("shifts") or {}).items()):
            row[f"{name}"] = v["defended"]
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
          "over severities 1-5.\n")
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
