"""The evaluation driver: submits every shard of every attack result (and the clean/shift task) as Ray tasks up front,
drains them with `ray.wait`, merges and writes each result as soon as its shards are in, and writes `summary.json`.

ray and pandas are imported inside the functions that use them (heavy imports).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oodray.attacks import autoattack_settings
from oodray.compute import defence_compute
from oodray.config import ExperimentConfig
from oodray.errors import RunFailed
from oodray.evaluate.plan import (
    _Inputs,
    _Job,
    _load_inputs,
    _plan,
    _read_result,
    _write_result,
    result_name,
    shard_ranges,
)
from oodray.evaluate.sanity import sanity_checks
from oodray.evaluate.tasks import attack_shard, clean_and_shifts
from oodray.evaluate.wall import AttemptClock, recorded_totals
from oodray.io import atomic_write_text
from oodray.locks import hold as hold_lock
from oodray.progress import Progress
from oodray.runtime import init_ray_for
from oodray.shifts import SEVERITIES, SHIFTS

log = logging.getLogger(__name__)
MAX_RETRIES = 3
TARGETS = {"oblivious": "classifier", "adaptive": "defended", "transfer": "surrogate"}  # what each attacker attacks


class EvaluationFailed(RunFailed):
    """Some evaluation tasks failed; finished results and AutoAttack state are kept for the next run."""


def run_evaluation(cfg: ExperimentConfig, *, checkpoint: str | Path | None, out_dir: Path, label: str,
                   ) -> dict[str, Any]:
    """Evaluates C(T(.)) (T from `checkpoint`, or the identity/bitdepth baseline when None) and returns the summary.

    Everything is validated before any work starts; finished results in out_dir are reused. Tasks run on the
    current Ray (started locally, or RAY_ADDRESS, when none is). Raises `EvaluationFailed` after draining the
    remaining tasks if some failed; what finished is on disk and a rerun resumes.
    """
    t0 = time.time()
    inp = _load_inputs(cfg, checkpoint, label)
    out_dir = hold_lock(out_dir, "evaluation output directory").dir  # one writer per --out, once inputs are valid
    todo, done = _plan(inp, out_dir)
    clean_fp = {**inp.fingerprint, "kind": "clean"}
    shifts_fp = {**inp.fingerprint, "kind": "shifts", "shifts": list(SHIFTS), "severities": list(SEVERITIES)}
    clean = _read_result(out_dir / "clean.json", clean_fp)
    shifts = _read_result(out_dir / "shifts.json", shifts_fp) if cfg.eval.shifts else None
    need_shifts = cfg.eval.shifts and shifts is None

    def on_clean(res: dict[str, Any]) -> None:  # written at once: a later failure must not lose it
        nonlocal clean, shifts
        if clean is None:
            clean = _clean_payload(res, clean_fp, inp.meta)
            _write_result(out_dir / "clean.json", clean)
        if need_shifts:
            shifts = {**inp.meta, "threat_model": "natural-shift", "fingerprint": shifts_fp, "seed": cfg.eval.seed,
                      "shifts": res["shifts"]}
            _write_result(out_dir / "shifts.json", shifts)

    if todo or clean is None or need_shifts:
        with AttemptClock(out_dir / "wall.json") as clock:  # every attempt's wall time, killed ones included
            _fan_out(inp, todo, done, on_clean if clean is None or need_shifts else None, need_shifts)
            totals = clock.totals()
    else:  # nothing left to do: not an attempt
        totals = recorded_totals(out_dir / "wall.json")
    summary = _summary(inp, clean, shifts, done)
    summary["seconds"] = round(time.time() - t0, 1)  # this run's, input loading (and training a surrogate) included
    summary.update(totals)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _fan_out(inp: _Inputs, todo: list[_Job], done: dict[tuple[str, str, float], dict[str, Any]],
             on_clean: Callable[[dict[str, Any]], None] | None, shifts: bool) -> None:
    """Submits every shard of every job (and the clean/shift task when `on_clean`) up front, drains them with ray.wait
    and writes each result as soon as its shards are in."""
    import ray

    cfg, e, n = inp.cfg, inp.cfg.eval, len(inp.y)
    init_ray_for(e.cpus_per_task, e.gpus_per_task, f"an evaluation task ({e.cpus_per_task:g} CPU, "
                 f"{e.gpus_per_task:g} GPU)")
    opts = {"num_cpus": e.cpus_per_task, "num_gpus": e.gpus_per_task, "max_retries": MAX_RETRIES}
    c_ref, t_ref = ray.put(inp.classifier_state), ray.put(inp.translator_state)
    s_ref = ray.put(inp.surrogate_state) if inp.surrogate_state is not None else None
    ranges = shard_ranges(n, inp.block, e.shards)
    if len(ranges) < e.shards:
        log.warning("%d examples make %d blocks of %d (eval.batch_size=%d): running %d shards, not %d", n,
                    math.ceil(n / inp.block), inp.block, e.batch_size, len(ranges), e.shards)
    pending: dict[Any, _Job | None] = {}
    if on_clean is not None:
        ref = ray.remote(clean_and_shifts).options(**opts).remote(
            {"config": cfg.to_dict(), "shifts": shifts}, c_ref, t_ref, ray.put(inp.x), ray.put(inp.y))
        pending[ref] = None
    attack = ray.remote(attack_shard).options(**opts)
    data = {(a, b): (ray.put(inp.x[a:b]), ray.put(inp.y[a:b])) for a, b in ranges}
    for job in todo:
        threat, norm, eps = job.key
        attacks = autoattack_settings(job.version, norm, eps)["attacks"]
        for a, b in ranges:
            spec = {"config": cfg.to_dict(), "threat": threat, "norm": norm, "eps": eps, "version": job.version,
                    "attacks": attacks, "seed": e.seed, "block": inp.block, "start": a, "stop": b,
                    "state_dir": str(job.state_dir)}
            pending[attack.remote(spec, c_ref, t_ref, s_ref, *data[(a, b)])] = job
    total, n_done, n_robust = n * len(todo), 0, 0
    log.info("submitted %d tasks: %d attack results x %d shards%s; %d examples to attack", len(pending), len(todo),
             len(ranges), " + clean/shifts" if on_clean else "", total)
    failures: list[str] = []
    bar = Progress(f"AutoAttack {inp.meta['label']}", total=total, unit="img")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=30.0)
        if not ready:
            log.info("progress: %d/%d examples attacked, robust so far %s; %d tasks running or queued", n_done, total,
                     f"{n_robust / n_done:.4f}" if n_done else "-", len(pending))
            continue
        job = pending.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - RayTaskError wraps whatever the task raised; drain the rest first
            cause = getattr(err, "cause", None) or err
            line = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
            failures.append(f"{result_name(*job.key) if job else 'clean/shifts'}: {line}")
            log.error("task for %s failed: %s", result_name(*job.key) if job else "clean/shifts", err)
            continue
        if job is None:
            on_clean(res)
            continue
        job.parts.append(res)
        n_done, n_robust = n_done + len(res["robust"]), n_robust + sum(res["robust"])
        bar.update(len(res["robust"]), robust=n_robust / n_done)
        log.debug("%s [%d, %d) done in %.1fs: robust %d/%d | %d/%d examples attacked, robust so far %.4f",
                  result_name(*job.key), res["start"], res["stop"], res["seconds"], sum(res["robust"]),
                  len(res["robust"]), n_done, total, n_robust / n_done)  # the progress line says it at INFO
        if sum(len(r["robust"]) for r in job.parts) == n:
            done[job.key] = _merge(job, inp.meta, n)
            _write_result(job.path, done[job.key])
    bar.close()
    if failures:
        raise EvaluationFailed(f"{len(failures)} evaluation task(s) failed (first: {failures[0]}); finished results "
                               "and AutoAttack state are kept: rerun the same command to resume")


def _clean_payload(res: dict[str, Any], fp: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    n = len(res["classifier_correct"])
    return {**meta, "threat_model": "clean", "fingerprint": fp,
            "clean_accuracy_classifier": sum(res["classifier_correct"]) / n,
            "clean_accuracy_defended": sum(res["defended_correct"]) / n, "gate_flag_rate": res["gate_flag_rate"],
            "per_example": {"classifier_correct": res["classifier_correct"],
                            "defended_correct": res["defended_correct"]}}


def _merge(job: _Job, meta: dict[str, Any], n: int) -> dict[str, Any]:
    """One attack's shards, merged in subset order (the same answer as one task over the whole subset)."""
    parts = sorted(job.parts, key=lambda r: r["start"])
    cat = {k: [v for r in parts for v in r[k]] for k in ("robust", "adv_correct", "target_robust")}
    gate = [v for r in parts for v in r["gate_flags"]] if parts[0]["gate_flags"] is not None else None
    threat, norm, eps = job.key
    return {
        **meta, "threat_model": threat, "norm": norm, "eps": eps, "version": job.version,
        "version_note": job.version_note, "fingerprint": job.fingerprint, "target": TARGETS[threat],
        "robust_accuracy": sum(cat["robust"]) / n, "adversarial_accuracy": sum(cat["adv_correct"]) / n,
        "target_robust_accuracy": sum(cat["target_robust"]) / n,
        "target_stage_accuracy": {s: sum(r["stage_counts"][s] for r in parts) / n for s in parts[0]["stage_counts"]},
        "gate_flag_rate_attacked": sum(gate) / n if gate is not None else None,
        "messages": list(dict.fromkeys(m for r in parts for m in r["messages"])),
        "autoattack": autoattack_settings(job.version, norm, eps),
        "shards": [{"start": r["start"], "stop": r["stop"], "seconds": round(r["seconds"], 2),
                    "cpu_seconds": round(r["cpu_seconds"], 2), "node_id": r.get("node_id"),
                    "channels_last": r.get("channels_last")} for r in parts],
        "per_example": {**cat, **({"gate_flags": gate} if gate is not None else {})},
    }


def _summary(inp: _Inputs, clean: dict[str, Any], shifts: dict[str, Any] | None,
             results: dict[tuple[str, str, float], dict[str, Any]]) -> dict[str, Any]:
    threats = inp.cfg.eval.threat_models
    order = sorted(results, key=lambda k: (threats.index(k[0]), k[1], k[2]))
    names = {k: f"{k[0]}/{k[1]}/{k[2]:g}" for k in order}
    gate_rates = None
    if inp.gated:
        gate_rates = {"clean": clean["gate_flag_rate"]}
        gate_rates.update({names[k]: results[k]["gate_flag_rate_attacked"] for k in order})
    return {
        "label": inp.meta["label"], "translator": inp.meta["translator"], "checkpoint": inp.meta["checkpoint"],
        "stochastic_translator": inp.stochastic,
        "clean_accuracy_classifier": clean["clean_accuracy_classifier"],
        "clean_accuracy_defended": clean["clean_accuracy_defended"],
        "robust": {names[k]: results[k]["robust_accuracy"] for k in order},
        "attack_target_accuracy": {names[k]: results[k]["target_robust_accuracy"] for k in order},
        "shifts": {s: v["mean"] for s, v in shifts["shifts"].items()} if shifts else {},
        "gate_flag_rate": gate_rates,
        "sanity": inp.notes + sanity_checks({k: results[k] for k in order}, inp.num_classes),
        "n_examples": inp.meta["n_examples"], "version": inp.cfg.eval.version, "config": inp.meta["config"],
        "training_compute": defence_compute(inp.classifier_state, inp.translator_state, inp.train_examples),
        "surrogate_train_seconds": ((inp.surrogate_state or {}).get("metrics") or {}).get("compute_wall_seconds"),
    }


def summary_tables(summary: dict[str, Any]) -> tuple[Any, Any]:
    """(attacks table, shifts table) as pandas DataFrames."""
    import pandas as pd

    rows = [{"threat_model": "clean", "norm": "", "eps": "", "defended": summary["clean_accuracy_defended"],
             "attacked model": "classifier", "its accuracy": summary["clean_accuracy_classifier"]}]
    for k, acc in summary["robust"].items():
        t, nm, e = k.split("/")
        rows.append({"threat_model": t, "norm": nm, "eps": e, "defended": acc, "attacked model": TARGETS[t],
                     "its accuracy": summary["attack_target_accuracy"][k]})
    rates = summary["gate_flag_rate"]
    if rates:
        for r, k in zip(rows, ["clean", *summary["robust"]]):
            r["gate_flag_rate"] = rates[k]
    shifts = pd.DataFrame([{"shift": s, **v} for s, v in summary["shifts"].items()])
    return pd.DataFrame(rows), shifts
