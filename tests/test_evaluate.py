"""Tests for oodray.evaluate: shards merge to the single-process answer, killed tasks resume, threat models order,
the identity translator reproduces C, shifts are seeded, finished results are reused and bad CLI input exits 2.

Everything runs on the `synthetic` dataset with a tiny CNN (trained for 30 epochs so that it is accurate) against a
real local Ray. AutoAttack's cost is driven by the points that survive (~6 s per 8-point block that keeps survivors
through the whole cascade here), so the attacked sets are small and the radii are chosen to keep survivors rare
except where a test needs them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oodray.config import resolve_config
from oodray.errors import OodrayError

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["classifier.epochs=30", "classifier.lr=0.01", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private OODRAY_CACHE holding the fixed classifier, set before Ray starts so that workers share it."""
    from oodray.classifier import get_classifier

    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OODRAY_CACHE", str(d))
        torch.set_num_threads(1)
        get_classifier(resolve_config("synthetic", overrides=OVERRIDES))
        yield d


@pytest.fixture(scope="module")
def ray_local(cache):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _cfg(*extra: str):
    return resolve_config("synthetic", overrides=[*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def translator_ckpt(cache, tmp_path_factory) -> Path:
    """A tiny translator trained for 200 Adam steps to undo PGD (eps 0.2) on C, saved in oodray.train's format."""
    from oodray.attacks import pgd
    from oodray.classifier import get_classifier
    from oodray.data import load_dataset, stack
    from oodray.io import save_checkpoint
    from oodray.models.translator import build_translator

    cfg = _cfg("attack.eps=0.2")
    classifier, _ = get_classifier(cfg, train=False)
    x, y = stack(load_dataset(cfg.data).train)
    g = torch.Generator().manual_seed(0)
    x_adv = pgd(classifier, x, y, eps=0.2, steps=10, generator=g)
    torch.manual_seed(0)
    t = build_translator(cfg.translator, 1, (8, 8))
    opt = torch.optim.Adam(t.parameters(), lr=3e-3)
    for _ in range(200):
        i = torch.randint(len(x), (64,), generator=g)
        loss = (F.l1_loss(t(x_adv[i]), x[i]) + F.cross_entropy(classifier(t(x_adv[i])), y[i])
                + F.l1_loss(t(x[i]), x[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "translator.pt"
    save_checkpoint({"format": "oodray.translator/1", "epoch": 1, "config": cfg.to_dict(), "translator": t.state_dict(),
                     "optimizer": opt.state_dict(), "gate": None, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def trained_eval(ray_local, translator_ckpt, tmp_path_factory):
    """All three threat models and the shifts on 24 examples, in 3 shards of one 8-example block each."""
    from oodray.evaluate import run_evaluation

    cfg = _cfg("attack.eps=0.2", "eval.n_examples=24", "eval.shards=3")
    out = tmp_path_factory.mktemp("eval-tiny")
    summary = run_evaluation(cfg, checkpoint=translator_ckpt, out_dir=out, label="tiny")
    return cfg, out, summary


@pytest.fixture(scope="module")
def identity_eval(ray_local, tmp_path_factory):
    """Identity translator at Linf 0.07, where about two thirds of C's points survive AutoAttack: 2 shards x 8."""
    from oodray.evaluate import run_evaluation

    cfg = _cfg("translator.arch=identity", "attack.eps=0.07", "eval.n_examples=16", "eval.shards=2",
               "eval.threat_models=[oblivious,adaptive]")
    out = tmp_path_factory.mktemp("eval-identity")
    return cfg, out, run_evaluation(cfg, checkpoint=None, out_dir=out, label="identity")


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _job(cfg, threat: str, state_dir: Path, n: int) -> dict:
    from oodray.attacks import autoattack_settings
    from oodray.evaluate import block_size

    norm, eps = cfg.attack.norm, cfg.attack.eps
    return {"config": cfg.to_dict(), "threat": threat, "norm": norm, "eps": eps, "version": "standard",
            "attacks": autoattack_settings("standard", norm, eps)["attacks"], "seed": cfg.eval.seed,
            "block": block_size(n, cfg.eval.batch_size), "start": 0, "stop": n, "state_dir": str(state_dir)}


def _inputs(cfg, checkpoint: Path | None):
    """What run_evaluation hands a task: classifier state, translator state, the subset."""
    from oodray.classifier import classifier_path
    from oodray.data import eval_subset, load_dataset
    from oodray.evaluate import _translator_state
    from oodray.io import load_checkpoint

    x, y = eval_subset(load_dataset(cfg.data).test, cfg.eval.n_examples, cfg.eval.seed)
    return load_checkpoint(classifier_path(cfg)), _translator_state(cfg, checkpoint)[0], x, y


# --- pure functions --------------------------------------------------------------------------------------------


def test_blocks_depend_on_the_subset_only_and_shards_are_contiguous_whole_blocks():
    from oodray.evaluate import block_size, shard_ranges

    assert block_size(100, 250) == 50 and block_size(100, 30) == 25 and block_size(24, 8) == 8
    assert block_size(1, 250) == 1 and block_size(5000, 250) == 250
    assert shard_ranges(100, 8, 3) == [(0, 40), (40, 72), (72, 100)]
    assert shard_ranges(16, 8, 5) == [(0, 8), (8, 16)]  # at most one shard per block
    assert shard_ranges(5, 8, 2) == [(0, 5)]
    for n, block, k in [(360, 250, 2), (97, 10, 4), (64, 32, 2)]:
        r = shard_ranges(n, block, k)
        assert r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in zip(r, r[1:]))
        assert all(start % block == 0 for start, _ in r)


def test_sanity_checks_flag_gradient_masking_tells():
    from oodray.evaluate import sanity_checks

    def res(robust, stages=None, messages=()):
        return {"robust_accuracy": robust, "target": "defended", "messages": list(messages),
                "target_stage_accuracy": stages or {"clean": 1.0, "apgd-ce": robust}}

    results = {
        ("adaptive", "Linf", 0.1): res(0.5, {"clean": 0.9, "apgd-ce": 0.7, "apgd-t": 0.7, "fab-t": 0.7,
                                             "square": 0.5}, ["Square Attack has decreased ..."]),
        ("adaptive", "Linf", 0.3): res(0.6),
        ("transfer", "Linf", 0.1): res(0.4),
        ("transfer", "Linf", 0.3): res(0.05),
    }
    kinds = {(s["kind"], s["threat_model"], s["eps"]) for s in sanity_checks(results, num_classes=10)}
    assert ("autoattack_message", "adaptive", 0.1) in kinds
    assert ("square_beats_whitebox", "adaptive", 0.1) in kinds
    assert ("transfer_beats_adaptive", "transfer", 0.1) in kinds and ("transfer_beats_adaptive", "transfer", 0.3) \
        in kinds
    assert ("accuracy_rises_with_eps", "adaptive", 0.3) in kinds
    assert ("above_chance_at_largest_eps", "adaptive", 0.3) in kinds
    assert ("above_chance_at_largest_eps", "transfer", 0.3) not in kinds  # 0.05 < chance
    assert ("accuracy_rises_with_eps", "transfer", 0.3) not in kinds
    healthy = {("adaptive", "Linf", 0.1): res(0.3, {"clean": 0.9, "apgd-ce": 0.4, "square": 0.4})}
    assert sanity_checks(healthy, num_classes=10) == []


def test_stochastic_translator_is_detected(cache):
    from oodray.classifier import get_classifier
    from oodray.evaluate import is_stochastic
    from oodray.models.defended import DefendedModel
    from oodray.models.translator import IdentityTranslator

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return (x + 0.01 * torch.randn_like(x)).clamp(0, 1)

    classifier, _ = get_classifier(_cfg(), train=False)
    x = torch.rand(4, 1, 8, 8)
    assert not is_stochastic(DefendedModel(classifier, IdentityTranslator()), x)
    assert is_stochastic(DefendedModel(classifier, Noisy()), x)


# --- the evaluation on Ray -------------------------------------------------------------------------------------


def test_outputs_are_labelled_and_complete(trained_eval):
    cfg, out, summary = trained_eval
    names = {p.stem for p in out.glob("*.json")}
    assert names == {"clean", "shifts", "summary", "wall", "oblivious-Linf-0.2", "adaptive-Linf-0.2",
                     "transfer-Linf-0.2"}
    for name in names - {"summary", "wall"}:
        r = _load(out, name)
        assert r["label"] == "tiny" and r["config"] == cfg.to_dict() and r["complete"]
        assert r["threat_model"] == name.split("-")[0].replace("shifts", "natural-shift")
    assert set(summary["robust"]) == {"oblivious/Linf/0.2", "adaptive/Linf/0.2", "transfer/Linf/0.2"}
    assert summary["n_examples"] == 24 and summary["gate_flag_rate"] is None
    assert set(summary["shifts"]) == {"darker", "brighter", "contrast", "sharpen", "blur", "noise"}
    assert json.loads((out / "summary.json").read_text())["robust"] == summary["robust"]
    assert [s["start"] for s in _load(out, "adaptive-Linf-0.2")["shards"]] == [0, 8, 16]
    assert all(s["channels_last"] for s in _load(out, "adaptive-Linf-0.2")["shards"])  # the layout used: CPU, 8 px
    assert summary["attempts"] == 1 and 0 < summary["wall_seconds_total"] <= summary["seconds"]
    assert summary["surrogate_train_seconds"] > 0  # the transfer surrogate was trained for this evaluation


def test_adaptive_is_not_weaker_than_oblivious(trained_eval):
    _, _, s = trained_eval
    oblivious, adaptive = s["robust"]["oblivious/Linf/0.2"], s["robust"]["adaptive/Linf/0.2"]
    assert oblivious >= 0.4, "the translator should undo most attacks crafted on C alone"
    assert adaptive <= oblivious - 0.3, (adaptive, oblivious)
    assert s["attack_target_accuracy"]["oblivious/Linf/0.2"] <= 0.1  # AutoAttack does break C itself
    assert adaptive <= s["clean_accuracy_defended"]


def test_shards_merge_to_the_single_process_answer(trained_eval, translator_ckpt, tmp_path):
    from oodray.evaluate import attack_shard

    cfg, out, _ = trained_eval
    classifier_state, translator_state, x, y = _inputs(cfg, translator_ckpt)
    for threat in ("oblivious", "adaptive"):
        merged = _load(out, f"{threat}-Linf-0.2")["per_example"]
        single = attack_shard(_job(cfg, threat, tmp_path / threat, len(y)), classifier_state, translator_state,
                              None, x, y)
        assert single["robust"] == merged["robust"] and single["adv_correct"] == merged["adv_correct"]
        assert single["target_robust"] == merged["target_robust"]
    flags = _load(out, "oblivious-Linf-0.2")["per_example"]["robust"]
    assert 0 < sum(flags) < len(flags), "the comparison needs both robust and broken points"


def test_shifts_are_deterministic_per_seed(trained_eval, translator_ckpt):
    from oodray.classifier import get_classifier
    from oodray.data import eval_subset, load_dataset
    from oodray.evaluate import build_defended, shift_accuracies

    cfg, out, _ = trained_eval
    classifier, _ = get_classifier(cfg, train=False)
    defended = build_defended(cfg, classifier, _inputs(cfg, translator_ckpt)[1])
    x, y = eval_subset(load_dataset(cfg.data).test, 100, 0)
    a, b, c = (shift_accuracies(classifier, defended, x, y, seed, 8) for seed in (0, 0, 1))
    assert a == b
    assert a["noise"] != c["noise"]  # the noise is drawn from the seed ...
    assert all(a[s] == c[s] for s in a if s != "noise")  # ... and nothing else is random
    assert a["darker"]["severity"]["5"]["classifier"] < a["darker"]["severity"]["1"]["classifier"]
    ray_shifts = _load(out, "shifts")["shifts"]  # the Ray task computed the same numbers on its 24 examples
    x24, y24 = eval_subset(load_dataset(cfg.data).test, 24, 0)
    assert ray_shifts == json.loads(json.dumps(shift_accuracies(classifier, defended, x24, y24, 0, 8)))


def test_identity_translator_reproduces_the_classifier(identity_eval):
    _, out, s = identity_eval
    oblivious, adaptive = _load(out, "oblivious-Linf-0.07"), _load(out, "adaptive-Linf-0.07")
    flags = adaptive["per_example"]["robust"]
    assert 0 < sum(flags) < len(flags), "the test needs both robust and broken points"
    assert flags == oblivious["per_example"]["target_robust"] == oblivious["per_example"]["robust"]
    assert adaptive["target_stage_accuracy"] == oblivious["target_stage_accuracy"]
    assert s["clean_accuracy_classifier"] == s["clean_accuracy_defended"]
    assert all(v["classifier"] == v["defended"] for v in s["shifts"].values())


def test_gated_defence_records_flag_rates(ray_local, translator_ckpt, tmp_path):
    from oodray.classifier import get_classifier
    from oodray.data import load_dataset, stack
    from oodray.evaluate import run_evaluation, summary_tables
    from oodray.io import load_checkpoint, save_checkpoint
    from oodray.models.defended import MahalanobisGate

    cfg = _cfg("attack.eps=0.2", "eval.n_examples=16", "eval.threat_models=[oblivious,adaptive]", "eval.shifts=false")
    classifier, _ = get_classifier(cfg, train=False)
    splits = load_dataset(cfg.data)
    gate = MahalanobisGate.fit(classifier, stack(splits.train)[0], stack(splits.val)[0], 95.0)
    state = load_checkpoint(translator_ckpt)
    state["gate"] = {k: v.clone() for k, v in gate.state_dict().items()}
    save_checkpoint(state, tmp_path / "gated.pt")
    s = run_evaluation(cfg, checkpoint=tmp_path / "gated.pt", out_dir=tmp_path / "out", label="gated")
    rates = s["gate_flag_rate"]
    assert set(rates) == {"clean", "oblivious/Linf/0.2", "adaptive/Linf/0.2"}
    assert all(0.0 <= r <= 1.0 for r in rates.values())
    assert rates["clean"] <= 0.25 < rates["oblivious/Linf/0.2"]  # ~5% of clean inputs are flagged, attacks far more
    flags = _load(tmp_path / "out", "adaptive-Linf-0.2")["per_example"]["gate_flags"]
    assert len(flags) == 16 and sum(flags) / 16 == rates["adaptive/Linf/0.2"]
    assert "gate_flag_rate" in summary_tables(s)[0].columns


def _result_stamps(out: Path) -> dict[str, int]:
    """Modification times of the result files (summary.json and the wall-time record are rewritten by every run)."""
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name not in ("summary.json", "wall.json")}


def test_finished_results_are_reused_and_never_overwritten(identity_eval):
    from oodray.evaluate import run_evaluation

    cfg, out, first = identity_eval
    stamps = _result_stamps(out)
    again = run_evaluation(cfg, checkpoint=None, out_dir=out, label="identity")  # reuse: unchanged stamps, no clock
    timing = ("seconds", "wall_seconds_total", "attempts")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert again["attempts"] == first["attempts"] == 1  # a run that finds everything done is not an attempt
    assert again["wall_seconds_total"] == first["wall_seconds_total"]
    assert stamps == _result_stamps(out)
    with pytest.raises(OodrayError, match="another evaluation"):
        run_evaluation(cfg.replace(**{"eval.n_examples": 8}), checkpoint=None, out_dir=out, label="identity")
    assert stamps == _result_stamps(out)


@pytest.mark.slow
def test_killed_task_resumes_from_its_state_file(identity_eval, tmp_path, caplog):
    """The task body runs in a subprocess, is SIGKILLed once its first block's state is saved, then reruns."""
    from oodray.evaluate import attack_shard

    cfg, out, _ = identity_eval
    state_dir = tmp_path / "state"
    job = _job(cfg, "oblivious", state_dir, 16)
    script = (
        "import json, sys, torch\n"
        "from oodray.config import ExperimentConfig\n"
        "from oodray.classifier import classifier_path\n"
        "from oodray.data import eval_subset, load_dataset\n"
        "from oodray.io import load_checkpoint\n"
        "from oodray.evaluate import attack_shard\n"
        "job = json.loads(sys.argv[1]); cfg = ExperimentConfig.from_dict(job['config'])\n"
        "x, y = eval_subset(load_dataset(cfg.data).test, 16, 0)\n"
        "attack_shard(job, load_checkpoint(classifier_path(cfg)), None, None, x, y)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(job)], cwd=REPO, env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = state_dir / "block-000000.pt"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    assert not (state_dir / "block-000008.pt").exists(), "the task finished before it could be killed"
    saved = torch.load(first, weights_only=True)
    assert "square" not in saved["done"]
    caplog.set_level(logging.INFO, logger="oodray.attacks")
    classifier_state, _, x, y = _inputs(cfg, None)
    res = attack_shard(job, classifier_state, None, None, x, y)
    assert any("resuming AutoAttack" in r.getMessage() for r in caplog.records)
    assert res["target_robust"] == _load(out, "oblivious-Linf-0.07")["per_example"]["target_robust"]
    assert res["robust"] == _load(out, "oblivious-Linf-0.07")["per_example"]["robust"]


def test_wall_time_counts_every_attempt_a_killed_one_too(tmp_path):
    """An attempt SIGKILLed mid-way leaves its wall time in wall.json; the next attempt adds its own to it."""
    from oodray.evaluate.wall import AttemptClock, read_attempts

    path = tmp_path / "wall.json"
    script = ("import sys, time\nfrom pathlib import Path\nfrom oodray.evaluate.wall import AttemptClock\n"
              "with AttemptClock(Path(sys.argv[1]), interval=0.1):\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while (not read_attempts(path) or read_attempts(path)[0]["seconds"] < 1.0) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = read_attempts(path)
    assert len(killed) == 1 and killed[0]["seconds"] >= 1.0
    with AttemptClock(path, interval=0.1) as clock:
        time.sleep(0.3)
        totals = clock.totals()
    assert totals["attempts"] == 2 and totals["wall_seconds_total"] >= killed[0]["seconds"] + 0.3
    assert [a["seconds"] for a in read_attempts(path)][:1] == [killed[0]["seconds"]] and len(read_attempts(path)) == 2
    assert read_attempts(path)[1]["seconds"] >= 0.3
    path.write_text("{not json")  # an unreadable record leaves the total short, never stops the evaluation
    with AttemptClock(path) as clock:
        assert clock.totals()["attempts"] == 1


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_bad_input_exits_2_with_one_line_and_keeps_results(cache, translator_ckpt, tmp_path, capsys):
    """Each bad input: exit 2, one `error:` line naming the problem, nothing in out_dir touched. Five run as real
    subprocesses (`python -m oodray.evaluate`), the rest through the same `run(main)` in-process (2 s faster each)."""
    from oodray.cli import run
    from oodray.evaluate import main

    out = tmp_path / "out"
    out.mkdir()
    kept = out / "adaptive-Linf-0.1.json"
    kept.write_text('{"complete": true, "fingerprint": {}}')
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    base = ["--out", str(out)]
    ident = ["--translator", "identity", "--dataset", "synthetic", *base]
    ckpt = ["--checkpoint", str(translator_ckpt), *base]
    in_subprocess = {
        "does not exist": ["--checkpoint", str(tmp_path / "missing.pt"), *base],
        "trained on 'synthetic'": [*ckpt, "--dataset", "digits"],
        "eval.threat_models='bogus'": [*ident, "--threat-models", "oblivious,bogus"],
        "eval.eps=0.0": [*ident, "--eps", "0"],
        "n-examples=101": [*ident, "--n-examples", "101"],
    }
    in_process = {
        "corrupt": ["--checkpoint", str(corrupt), *base],
        "disagrees with the checkpoint's": [*ckpt, "--set", "classifier.seed=7"],
        "translator.* comes from the checkpoint": [*ckpt, "--set", "translator.width=4"],
        "eval.norms='L7'": [*ident, "--norm", "L7"],
        "eval.eps=1.5": [*ident, "--eps", "0.1,1.5"],
        "eval.eps=-0.1": [*ident, "--norm", "L2", "--eps", "-0.1"],
        "--eps 'x'": [*ident, "--eps", "x"],
        "needs a trained checkpoint": ["--translator", "unet", "--dataset", "synthetic", *base],
        "either --checkpoint": [*ckpt, "--translator", "identity"],
        "give --checkpoint PATH": ["--dataset", "synthetic", *base],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "oodray.evaluate", *args], cwd=REPO, env={**os.environ},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, args in in_subprocess.items()}
    results = {}
    for expected, args in in_process.items():
        with pytest.raises(SystemExit) as exit_info:
            run(main, args)
        results[expected] = (exit_info.value.code, capsys.readouterr().err)
    for expected, proc in procs.items():
        results[expected] = (proc.wait(timeout=600), proc.stderr.read())
    for expected, (code, stderr) in results.items():
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == 2, (expected, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, lines)
    assert kept.read_text() == '{"complete": true, "fingerprint": {}}'
    assert sorted(p.name for p in out.iterdir()) == ["adaptive-Linf-0.1.json"]
