"""AutoAttack and natural-shift evaluation of a defended model C(T(.)), fanned out as Ray tasks; resumable.

    python -m oodray.evaluate --checkpoint runs/train-digits-unet-<hash>/checkpoint_<time>/translator.pt
    python -m oodray.evaluate --translator identity --dataset digits --n-examples 100    # the undefended C
    python -m oodray.evaluate --translator bitdepth --dataset digits --eps 0.1,0.2,0.3   # BPDA baseline
    python -m oodray.evaluate --checkpoint CKPT --threat-models adaptive --norm Linf,L2 --eps 0.5 --shards 4

Threat models, each named in every output file:
- `oblivious`: AutoAttack crafted against C alone, then fed through the defence.
- `adaptive`: AutoAttack against the DefendedModel end to end (the gate and `bitdepth` give straight-through BPDA
  gradients); version `rand` (EoT) is used instead of the requested one when the translator is stochastic in eval mode.
- `transfer`: AutoAttack against an independently trained surrogate classifier (`classifier.seed + 1`, trained and
  cached if missing), then fed through the defence.
A point counts as robust when the defence classifies both x and its adversarial example correctly (the attacker may
submit either), so robust accuracy never exceeds the defence's clean accuracy.

Determinism: pyautoattack reseeds torch on every perturb() call and draws random starts of the whole batch's shape, so a
point's attack depends on which points share its batch (seen: the same 16 points attacked as one batch or as two
batches of 8 get adversarial images up to 2 eps apart). The evaluation subset is therefore cut into fixed blocks of
consecutive examples, each attacked on its own (one AutoAttack cascade, one batch per attack), and a shard is a
contiguous run of whole blocks. The block size depends only on n_examples and `eval.batch_size` (see `block_size`), so
every model call sees the same blocks whatever the number of shards, and the merged flags equal a single-process run
(shards=1) bit for bit. There are at most as many shards as blocks: lower `--batch-size` for more. Larger blocks
vectorise better (on CPU, digits' CNN: ~1.1 s per image that survives the cascade at 32 per block, ~11 s at 1).

out_dir holds `<threat>-<norm>-<eps>.json` per attack, `clean.json`, `shifts.json` and `summary.json`, each with the
resolved config; AutoAttack state per block lives under `state/`, so a killed task (retried by Ray) resumes there.
Finished results are reused; one made by a different evaluation is never overwritten (one-line error instead).
On a multi-node cluster put out_dir on shared storage so that a retried task finds its state on any node.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodray.cli import add_config_args, config_from_args, run, setup_logging
from oodray.config import NORMS, ExperimentConfig, _check_eps, flatten, load_yaml, parse_override
from oodray.errors import ConfigError, OodrayError
from oodray.io import atomic_write_text, load_checkpoint, safe_child
from oodray.locks import hold as hold_lock

log = logging.getLogger(__name__)
RESULT_FORMAT = "oodray.eval/1"
BASELINES = ("identity", "bitdepth")  # translators that need no checkpoint
MAX_RETRIES = 3
TARGETS = {"oblivious": "classifier", "adaptive": "defended", "transfer": "surrogate"}  # what each attacker attacks


class EvaluationFailed(RuntimeError):
    """Some evaluation tasks failed; finished results and AutoAttack state are kept for the next run."""


# --- shards and models -----------------------------------------------------------------------------------------


def block_size(n: int, batch_size: int) -> int:
    """Examples per AutoAttack block: n split into equal blocks of at most `eval.batch_size`, and into at least two so
    that the default two shards both have work. Depends on n and batch_size only, never on the number of shards."""
    return math.ceil(n / max(math.ceil(n / batch_size), min(2, n)))


def shard_ranges(n: int, block: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) example ranges made of whole blocks (as even as blocks allow); at most one per block."""
    n_blocks = math.ceil(n / block)
    groups = np.array_split(np.arange(n_blocks), min(shards, n_blocks))
    return [(int(g[0]) * block, min(n, (int(g[-1]) + 1) * block)) for g in groups]


def build_defended(cfg: ExperimentConfig, classifier: torch.nn.Module, translator_state: dict[str, Any] | None,
                   ) -> torch.nn.Module:
    """C(T(.)) from a translator checkpoint's state, or the identity/bitdepth baseline named by the config."""
    from oodray.models.defended import DefendedModel
    from oodray.models.translator import build_translator
    from oodray.train import load_defended

    if translator_state is not None:
        return load_defended(translator_state, classifier, translator_state.get("path", "<memory>"))
    return DefendedModel(classifier, build_translator(cfg.translator, classifier.info.channels)).eval()


def is_stochastic(defended: torch.nn.Module, x: torch.Tensor) -> bool:
    """True if T says it is stochastic, or two eval-mode passes with different seeds disagree (e.g. live dropout)."""
    if getattr(defended.translator, "stochastic", False):
        return True
    defended.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        a = defended.translator(x)
        torch.manual_seed(1)
        b = defended.translator(x)
    return not torch.equal(a, b)


def _task_setup(cfg: ExperimentConfig) -> torch.device:
    if not logging.getLogger().handlers:  # a fresh Ray worker: its per-block lines (and resumes) reach the driver
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("auto-attack").setLevel(logging.WARNING)  # repeats its settings for every block
    torch.set_num_threads(max(1, int(cfg.eval.cpus_per_task)))
    use_cuda = cfg.eval.gpus_per_task > 0 and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def _node_id() -> str | None:
    """The Ray node this runs on (recorded per shard, to show where work went); None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # the call alone would start Ray


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
    """Predictions block by block (the same batches in every shard split, so float results never differ)."""
    return torch.cat([model(x[i:i + block].to(device)).argmax(1).cpu() for i in range(0, len(x), block)])


# --- Ray task bodies (plain functions: callable in-process, wrapped by ray.remote when submitted) ---------------


def attack_shard(job: dict[str, Any], classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
                 surrogate_state: dict[str, Any] | None, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """AutoAttack on one shard (x, y = subset[start:stop]), block by block, each block resuming from its state file."""
    from oodray.attacks import autoattack
    from oodray.models.classifier import classifier_from_state

    t0, cpu0 = time.time(), time.process_time()
    cfg = ExperimentConfig.from_dict(job["config"])
    device = _task_setup(cfg)
    classifier = classifier_from_state(classifier_state).to(device)
    defended = build_defended(cfg, classifier, translator_state).to(device)
    threat, block, start = job["threat"], job["block"], job["start"]
    target = {"oblivious": classifier, "adaptive": defended}.get(threat)
    if threat == "transfer":
        target = classifier_from_state(surrogate_state).to(device)
    stages = ["clean", *job["attacks"]]
    counts = dict.fromkeys(stages, 0)
    x_adv, target_robust, messages = [], [], []
    for b0 in range(0, len(x), block):
        xb, yb = x[b0:b0 + block], y[b0:b0 + block]
        res = autoattack(target, xb.to(device), yb.to(device), norm=job["norm"], eps=job["eps"],
                         version=job["version"], seed=job["seed"], batch_size=block, device=device,
                         state_path=Path(job["state_dir"]) / f"block-{start + b0:06d}.pt")
        x_adv.append(res.x_adv.cpu())
        target_robust.append(res.y_adv.cpu() == yb)
        messages += [m for m in res.messages if m not in messages]
        last = 0
        for s in stages:  # stages AutoAttack skipped (nothing left to attack) keep the last count
            if s in res.accuracy:
                last = round(res.accuracy[s] * len(xb))
            counts[s] += last
    x_adv_t = torch.cat(x_adv)
    clean_ok = _predict(defended, x, block, device) == y
    adv_ok = _predict(defended, x_adv_t, block, device) == y
    gate_flags = None
    if getattr(defended, "gate", None) is not None:
        gate_flags = torch.cat([defended.gate.flags(classifier, x_adv_t[i:i + block].to(device)).cpu()
                                for i in range(0, len(x), block)]).int().tolist()
    return {"start": start, "stop": job["stop"], "robust": (clean_ok & adv_ok).int().tolist(),
            "adv_correct": adv_ok.int().tolist(), "target_robust": torch.cat(target_robust).int().tolist(),
            "stage_counts": counts, "messages": messages, "gate_flags": gate_flags, "seconds": time.time() - t0,
            "cpu_seconds": time.process_time() - cpu0, "node_id": _node_id()}


def shift_accuracies(classifier: torch.nn.Module, defended: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     seed: int, block: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy of C and of C(T(.)) under every shift at severities 1-5 (noise seeded per shift and severity)."""
    from oodray.shifts import SEVERITIES, SHIFTS, apply_shift

    device = torch.device(device)
    gate = getattr(defended, "gate", None)
    out: dict[str, Any] = {}
    for k, name in enumerate(SHIFTS):
        per: dict[str, Any] = {}
        for sev in SEVERITIES:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 100 * k + sev)
            xs = apply_shift(x, name, sev, generator=g)
            per[str(sev)] = {"classifier": (_predict(classifier, xs, block, device) == y).float().mean().item(),
                             "defended": (_predict(defended, xs, block, device) == y).float().mean().item()}
            if gate is not None:
                per[str(sev)]["gate_flag_rate"] = defended.flag_rate(xs.to(device))
        mean = {m: float(np.mean([per[str(s)][m] for s in SEVERITIES])) for m in per["1"]}
        out[name] = {"mean": mean, "severity": per}
    return out


def clean_and_shifts(job: dict[str, Any], classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
                     x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Clean accuracy of C and C(T(.)) (and the gate's clean flag rate); the natural shifts when job['shifts']."""
    from oodray.models.classifier import classifier_from_state

    cfg = ExperimentConfig.from_dict(job["config"])
    device = _task_setup(cfg)
    classifier = classifier_from_state(classifier_state).to(device)
    defended = build_defended(cfg, classifier, translator_state).to(device)
    block = block_size(len(y), cfg.eval.batch_size)
    pc, pd = _predict(classifier, x, block, device), _predict(defended, x, block, device)
    out: dict[str, Any] = {"classifier_correct": (pc == y).int().tolist(), "defended_correct": (pd == y).int().tolist(),
                           "gate_flag_rate": defended.flag_rate(x.to(device)) if defended.gate is not None else None}
    if job["shifts"]:
        out["shifts"] = shift_accuracies(classifier, defended, x, y, cfg.eval.seed, block, device)
    return out


# --- results on disk -------------------------------------------------------------------------------------------


def result_name(threat: str, norm: str, eps: float) -> str:
    return f"{threat}-{norm}-{eps:g}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_result(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """A finished result made by this same evaluation, None if absent; a different finished one is an error."""
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
        saved = res["fingerprint"] if res.get("complete") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OodrayError(f"'{path}' exists but is not an oodray result; move it away to recompute it") from None
    if saved is None:
        return None
    diff = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diff:
        k = diff[0]
        raise OodrayError(f"'{path}' holds a finished result of another evaluation ({k}: {saved.get(k)!r} there, "
                          f"{fingerprint.get(k)!r} now); pass another --out or move it away")
    return res


def _write_result(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({**payload, "complete": True}, indent=1))


# --- sanity signals --------------------------------------------------------------------------------------------


def sanity_checks(results: dict[tuple[str, str, float], dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """Gradient-masking tells and AutoAttack's own warnings, as records (kind, threat_model, norm, eps, detail)."""
    out: list[dict[str, Any]] = []
    for (threat, norm, eps), r in results.items():
        where = {"threat_model": threat, "norm": norm, "eps": eps}
        out += [{"kind": "autoattack_message", **where, "detail": m} for m in r["messages"]]
        acc = r["target_stage_accuracy"]
        if "square" in acc and len(acc) > 2:
            names = list(acc)
            drops = {s: acc[names[i - 1]] - acc[s] for i, s in enumerate(names) if i > 0}
            white = {s: d for s, d in drops.items() if s != "square"}
            if drops["square"] > 0.002:  # AutoAttack's own threshold (checks.check_square_sr)
                out.append({"kind": "square_beats_whitebox", **where, "detail":
                            f"black-box Square lowered {r['target']} accuracy by {drops['square']:.2%} after the "
                            f"white-box stages (their drops: {', '.join(f'{k} {v:.2%}' for k, v in white.items())}); "
                            "the gradients may be masked: try an adaptive attack (BPDA/EoT) or more Square queries"})
    for (threat, norm, eps), r in results.items():
        a = results.get(("adaptive", norm, eps))
        if threat == "transfer" and a is not None and r["robust_accuracy"] < a["robust_accuracy"]:
            out.append({"kind": "transfer_beats_adaptive", "threat_model": "transfer", "norm": norm, "eps": eps,
                        "detail": f"transfer robust accuracy {r['robust_accuracy']:.4f} < adaptive "
                                  f"{a['robust_accuracy']:.4f}: the end-to-end gradients are weaker than a "
                                  "surrogate's (gradient masking)"})
    chance = 1.0 / num_classes
    for threat, norm in sorted({(t, n) for t, n, _ in results}):
        curve = sorted((e, results[(t, n, e)]["robust_accuracy"]) for t, n, e in results if (t, n) == (threat, norm))
        where = {"threat_model": threat, "norm": norm}
        for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
            if a1 > a0:
                out.append({"kind": "accuracy_rises_with_eps", **where, "eps": e1, "detail":
                            f"robust accuracy {a1:.4f} at eps {e1:g} > {a0:.4f} at eps {e0:g}: a stronger attacker "
                            "should never do worse (unreliable attack or gradient masking)"})
        if len(curve) > 1 and curve[-1][1] > chance:
            out.append({"kind": "above_chance_at_largest_eps", **where, "eps": curve[-1][0], "detail":
                        f"robust accuracy {curve[-1][1]:.4f} at the largest eps {curve[-1][0]:g} is above chance "
                        f"({chance:.3f}); suspicious if that eps is large enough to erase the image"})
    return out


# --- the driver ------------------------------------------------------------------------------------------------


def _validate_attacks(cfg: ExperimentConfig) -> None:
    for norm in cfg.eval_norms():
        if norm not in NORMS:
            raise ConfigError(f"eval.norms={norm!r} is not accepted; choose one of: {', '.join(NORMS)}")
        for eps in cfg.eval_eps():
            _check_eps("eval.eps", eps, norm)
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size!r} must be >= 1")


def _translator_state(cfg: ExperimentConfig, checkpoint: str | Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's (config, translator, gate) and its sha256; checks it fits the requested dataset/classifier."""
    from oodray.classifier import classifier_key
    from oodray.train import CHECKPOINT_FILE, load_translator_checkpoint

    if checkpoint is None:
        if cfg.translator.arch not in BASELINES:
            raise ConfigError(f"translator '{cfg.translator.arch}' needs a trained checkpoint (--checkpoint PATH); "
                              f"without one choose --translator {' or '.join(BASELINES)}")
        return None, None
    state = load_translator_checkpoint(checkpoint)
    ckpt_cfg = ExperimentConfig.from_dict(state["config"])
    if ckpt_cfg.data.name != cfg.data.name:
        raise ConfigError(f"checkpoint '{checkpoint}' was trained on dataset '{ckpt_cfg.data.name}', "
                          f"not '{cfg.data.name}'")
    want, have = classifier_key(cfg), state.get("classifier_key") or classifier_key(ckpt_cfg)
    if want != have:
        raise ConfigError(f"checkpoint '{checkpoint}' defends classifier '{have}', not '{want}'")
    p = Path(checkpoint)
    sha = _sha256(p / CHECKPOINT_FILE if p.is_dir() else p)
    return {"config": state["config"], "translator": state["translator"], "gate": state.get("gate"),
            "path": str(checkpoint)}, sha


@dataclass
class _Inputs:
    """Everything the tasks need, loaded and validated on the driver before any work starts."""

    cfg: ExperimentConfig
    x: torch.Tensor
    y: torch.Tensor
    block: int
    classifier_state: dict[str, Any]
    translator_state: dict[str, Any] | None
    surrogate_state: dict[str, Any] | None
    surrogate_sha256: str | None
    fingerprint: dict[str, Any]  # what makes results comparable; a finished result with another one is not reused
    meta: dict[str, Any]  # written into every result
    stochastic: bool
    gated: bool
    num_classes: int
    notes: list[dict[str, Any]] = field(default_factory=list)  # sanity records found while loading


def _load_inputs(cfg: ExperimentConfig, checkpoint: str | Path | None, label: str) -> _Inputs:
    from oodray.classifier import classifier_key, get_classifier
    from oodray.data import eval_subset, load_dataset

    _validate_attacks(cfg)
    translator_state, translator_sha = _translator_state(cfg, checkpoint)
    splits = load_dataset(cfg.data)
    x, y = eval_subset(splits.test, cfg.eval.n_examples, cfg.eval.seed)
    block = block_size(len(y), cfg.eval.batch_size)
    classifier, cpath = get_classifier(cfg, splits, train=checkpoint is None)
    classifier_state = load_checkpoint(cpath, what="classifier checkpoint")
    defended = build_defended(cfg, classifier, translator_state)  # a checkpoint that does not fit fails before work
    surrogate_state, surrogate_sha, notes = None, None, []
    if "transfer" in cfg.eval.threat_models:
        _, spath = get_classifier(cfg.replace(**{"classifier.seed": cfg.classifier.seed + 1}), splits)
        surrogate_state, surrogate_sha = load_checkpoint(spath, what="surrogate classifier checkpoint"), _sha256(spath)
        same = all(torch.equal(a, b) for a, b in zip(classifier_state["state_dict"].values(),
                                                      surrogate_state["state_dict"].values()))
        if same:  # e.g. pretrained weights with classifier.epochs=0: the seed changes nothing
            notes.append({"kind": "surrogate_equals_classifier", "threat_model": "transfer", "detail":
                          "the surrogate has C's exact weights, so 'transfer' is a white-box attack on C"})
    arch = ExperimentConfig.from_dict(translator_state["config"]).translator.arch if translator_state \
        else cfg.translator.arch
    fingerprint = {"format": RESULT_FORMAT, "data": cfg.to_dict()["data"] | {"data_dir": None},
                   "classifier": classifier_key(cfg), "classifier_sha256": _sha256(cpath), "translator": arch,
                   "translator_sha256": translator_sha, "n_examples": len(y), "eval_seed": cfg.eval.seed,
                   "block": block}
    meta = {"label": label, "translator": arch, "checkpoint": str(checkpoint) if checkpoint else None,
            "n_examples": len(y), "config": cfg.to_dict()}
    return _Inputs(cfg, x, y, block, classifier_state, translator_state, surrogate_state, surrogate_sha, fingerprint,
                   meta, is_stochastic(defended, x[:block]), getattr(defended, "gate", None) is not None,
                   splits.info.num_classes, notes)


@dataclass
class _Job:
    """One (threat model, norm, eps) result still to compute."""

    key: tuple[str, str, float]
    path: Path
    fingerprint: dict[str, Any]
    version: str
    version_note: str | None
    state_dir: Path
    parts: list[dict[str, Any]] = field(default_factory=list)


def _plan(inp: _Inputs, out_dir: Path) -> tuple[list[_Job], dict[tuple[str, str, float], dict[str, Any]]]:
    """The attack results still to compute, and the finished ones to reuse (a different finished one is an error)."""
    cfg = inp.cfg
    todo, done = [], {}
    for threat in dict.fromkeys(cfg.eval.threat_models):
        version, note = cfg.eval.version, None
        if threat == "adaptive" and inp.stochastic and version != "rand":
            version, note = "rand", (f"translator is stochastic in eval mode: AutoAttack version 'rand' (EoT) "
                                     f"replaces '{cfg.eval.version}'")
            log.warning("%s", note)
        for norm in dict.fromkeys(cfg.eval_norms()):
            for eps in dict.fromkeys(cfg.eval_eps()):
                key = (threat, norm, eps)
                fp = {**inp.fingerprint, "threat_model": threat, "norm": norm, "eps": eps, "version": version}
                if threat == "transfer":
                    fp["surrogate_sha256"] = inp.surrogate_sha256
                path = out_dir / f"{result_name(*key)}.json"
                prev = _read_result(path, fp)
                if prev is not None:
                    log.info("reusing finished result %s", path)
                    done[key] = prev
                    continue
                digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
                todo.append(_Job(key, path, fp, version, note, out_dir / "state" / f"{result_name(*key)}-{digest}"))
    return todo, done


def run_evaluation(cfg: ExperimentConfig, *, checkpoint: str | Path | None, out_dir: Path, label: str,
                   ) -> dict[str, Any]:
    """Evaluates C(T(.)) (T from `checkpoint`, or the identity/bitdepth baseline when None) and returns the summary.

    Everything is validated before any work starts; finished results in out_dir are reused. Tasks run on the
    current Ray (started locally, or RAY_ADDRESS, when none is). Raises `EvaluationFailed` after draining the
    remaining tasks if some failed; what finished is on disk and a rerun resumes.
    """
    from oodray.shifts import SEVERITIES, SHIFTS

    t0 = time.time()
    inp = _load_inputs(cfg, checkpoint, label)
    out_dir = hold_lock(out_dir, "evaluation output directory").dir  # #15: one writer per out_dir, inputs checked
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
        _fan_out(inp, todo, done, on_clean if clean is None or need_shifts else None, need_shifts)
    summary = _summary(inp, clean, shifts, done)
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def _fan_out(inp: _Inputs, todo: list[_Job], done: dict[tuple[str, str, float], dict[str, Any]],
             on_clean: Callable[[dict[str, Any]], None] | None, shifts: bool) -> None:
    """Submits every shard of every job (and the clean/shift task when `on_clean`) up front, drains them with ray.wait
    and writes each result as soon as its shards are in."""
    import ray

    from oodray.attacks import autoattack_settings
    from oodray.train import init_ray

    init_ray()
    cfg, e, n = inp.cfg, inp.cfg.eval, len(inp.y)
    if e.gpus_per_task > 0 and not ray.cluster_resources().get("GPU"):
        log.warning("eval.gpus_per_task=%g but this Ray cluster has no GPU now: tasks wait until one joins",
                    e.gpus_per_task)
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
        log.info("%s [%d, %d) done in %.1fs: robust %d/%d | %d/%d examples attacked, robust so far %.4f",
                 result_name(*job.key), res["start"], res["stop"], res["seconds"], sum(res["robust"]),
                 len(res["robust"]), n_done, total, n_robust / n_done)
        if sum(len(r["robust"]) for r in job.parts) == n:
            done[job.key] = _merge(job, inp.meta, n)
            _write_result(job.path, done[job.key])
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
    from oodray.attacks import autoattack_settings

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
                    "cpu_seconds": round(r["cpu_seconds"], 2), "node_id": r.get("node_id")} for r in parts],
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


# --- CLI -------------------------------------------------------------------------------------------------------


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.1,0.2") from None


def config_for_checkpoint(args: argparse.Namespace, state: dict[str, Any], eval_layer: dict[str, Any],
                          ) -> ExperimentConfig:
    """The checkpoint's resolved config with the YAML's eval section, CLI eval flags and --set overrides on top;
    dataset, classifier and translator must stay the checkpoint's."""
    from oodray.classifier import classifier_key

    base = ExperimentConfig.from_dict(state["config"])
    if args.dataset and args.dataset != base.data.name:
        raise ConfigError(f"--dataset {args.dataset} disagrees with the checkpoint, which was trained on "
                          f"'{base.data.name}'")
    dotted: dict[str, Any] = {}
    if args.config:
        dotted.update(flatten({"eval": load_yaml(args.config).get("eval") or {}}, drop_none=True))
    dotted.update(flatten({"eval": eval_layer, "data": {"data_dir": args.data_dir}, "cache_dir": args.cache_dir},
                          drop_none=True))
    dotted.update(dict(parse_override(o) for o in args.overrides))
    cfg = base.replace(**dotted)
    if classifier_key(cfg) != classifier_key(base) or cfg.data.name != base.data.name:
        raise ConfigError(f"the requested classifier '{classifier_key(cfg)}' disagrees with the checkpoint's "
                          f"'{classifier_key(base)}' (the translator was trained in front of that one)")
    if cfg.translator != base.translator:
        raise ConfigError("translator.* comes from the checkpoint and cannot be overridden")
    return cfg


def default_out_and_label(cfg: ExperimentConfig, checkpoint: str | None, epoch: int | None) -> tuple[Path, str]:
    """`<run dir>/eval/epoch<N>` for a checkpoint in a Ray run, else `runs/eval/<dataset>-<translator>`."""
    if checkpoint is None:
        root = Path(cfg.storage) if "://" not in cfg.storage else Path("runs")
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
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its INFO lines repeat the settings per object
    eval_layer = {"threat_models": args.threat_models, "norms": args.norm, "eps": _floats(args.eps, "--eps"),
                  "n_examples": args.n_examples, "version": args.version, "shards": args.shards,
                  "batch_size": args.batch_size, "gpus_per_task": args.gpus_per_task,
                  "cpus_per_task": args.cpus_per_task, "seed": args.seed, "shifts": False if args.no_shifts else None}
    if args.checkpoint and args.translator:
        raise ConfigError("give either --checkpoint PATH or --translator identity|bitdepth, not both")
    epoch = None
    if args.checkpoint:
        from oodray.train import load_translator_checkpoint

        state = load_translator_checkpoint(args.checkpoint)
        epoch = state.get("epoch")
        cfg = config_for_checkpoint(args, state, eval_layer)
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
    try:
        summary = run_evaluation(cfg, checkpoint=args.checkpoint, out_dir=out, label=label)
    except EvaluationFailed as e:
        print(f"error: {e}", flush=True)
        return 1
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


if __name__ == "__main__":
    run(main)
