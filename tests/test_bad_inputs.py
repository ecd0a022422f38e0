"""Bad input, one table for every CLI: exit 2, one `error:` line naming the problem, nothing written or lost.

Each row runs `python -m oodray.<cli>` on one bad input and checks that: the exit code is 2; stderr ends with one line
`error: ...` holding the row's words and no traceback; not one file under the workspace (an earlier run, an earlier
evaluation, an earlier results table) or under the oodray cache was created, changed or deleted (a directory left
empty by a writability check is allowed); and Ray was never started (`ray.init` raises in-process).
Rows run in-process through the same `oodray.cli.run` the modules use; one row per CLI also runs as a real subprocess.

NaN/Inf pixels: no input format a CLI reads can carry them (IDX files, ImageFolder images and CIFAR batches hold
uint8; digits and synthetic are generated), so the rows feed NaN where tensors do enter: a cached classifier's
weights, and a translator checkpoint's weights, whose outputs are the pixels C classifies.

The security tests at the end: pickles carrying code are refused without running (translator checkpoint, cache
shard, AutoAttack state), no module but oodray/io.py calls torch.load or pickle, local Ray binds its dashboard to
127.0.0.1, and run/experiment names cannot climb out of the storage directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, assert_one_line_error, forbid_ray, run_cli

from oodray.config import resolve_config
from oodray.errors import CheckpointError

CLIS = ("classifier", "train", "evaluate", "tune", "results")
RUN_AS_SUBPROCESS = {("classifier", "yaml-unknown-key"), ("train", "empty-data-dir"),
                     ("evaluate", "truncated-checkpoint"), ("tune", "yaml-wrong-type"), ("results", "yaml-unknown-key"),
                     ("train", "run-in-use"), ("tune", "corrupt-deflate-stream")}


class _Boom:
    """Unpickling this runs `touch <marker>`: the file's existence tells whether a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _idx(path: Path, arr: Any) -> None:
    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.tobytes())


def _translator_state(cfg, arch_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from oodray.classifier import classifier_key
    from oodray.models.translator import build_translator

    cfg = cfg.replace(**(arch_overrides or {}))
    t = build_translator(cfg.translator, 1, (8, 8))
    return {"format": "oodray.translator/1", "epoch": 1, "config": cfg.to_dict(), "translator": t.state_dict(),
            "optimizer": {}, "gate": None, "metrics": {}, "classifier_key": classifier_key(cfg)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, request) -> Path:
    """A workspace holding every bad input, beside earlier good results that must survive each bad command."""
    from oodray.classifier import classifier_path, get_classifier
    from oodray.data import DatasetInfo
    from oodray.io import save_checkpoint
    from oodray.models.classifier import build_classifier, save_classifier
    from oodray.results import build_table, write_outputs

    ws = tmp_path_factory.mktemp("bad-inputs")
    cfg = resolve_config("synthetic")
    _, cpath = get_classifier(cfg)  # the real cached C (session cache) that evaluate rows defend

    (ws / "empty").mkdir()
    rgb = ws / "rgb-idx"  # MNIST's IDX layout, but 3x28x28 (RGB) images
    rgb.mkdir()
    for split, n in (("train", 20), ("t10k", 10)):
        _idx(rgb / f"{split}-images-idx3-ubyte", torch.zeros(n, 3, 28, 28))
        _idx(rgb / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    (ws / "unknown-key.yaml").write_text("train:\n  lr: 0.001\n  epochz: 3\n")
    (ws / "latin1.yaml").write_bytes("train:\n  lr: 0.001  # caf\xe9\n".encode("latin-1"))
    for case in ("corrupt-gz", "bad-labels"):  # MNIST layout: a damaged deflate stream; a label of 200
        (ws / case).mkdir()
        for split, n in (("train", 20), ("t10k", 10)):
            labels = torch.arange(n) % 10
            if case == "bad-labels":
                labels[7] = 200
            _idx(ws / case / f"{split}-images-idx3-ubyte", torch.zeros(n, 28, 28))
            _idx(ws / case / f"{split}-labels-idx1-ubyte", labels)
            for f in (ws / case).glob("*-ubyte"):
                f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
                f.unlink()
    gz = bytearray((ws / "corrupt-gz" / "train-images-idx3-ubyte.gz").read_bytes())
    for i in range(20, len(gz) - 8):
        gz[i] ^= 0x55
    (ws / "corrupt-gz" / "train-images-idx3-ubyte.gz").write_bytes(bytes(gz))
    # Directories another live oodray command is writing: its lock is held by a subprocess for the whole module.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom oodray.locks import RunLock\n"
                               "with RunLock(sys.argv[1]), RunLock(sys.argv[2]):\n print('held', flush=True)\n"
                               " time.sleep(3600)", str(ws / "storage" / "locked"), str(ws / "out-locked")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    request.addfinalizer(lambda: (holder.kill(), holder.wait(timeout=600)))
    assert holder.stdout.readline().strip() == "held"
    (ws / "wrong-type.yaml").write_text("train:\n  epochs: three\n")
    (ws / "a-file").write_text("a regular file: nothing can be created below it, even by root\n")

    # Cached classifiers that are damaged: truncated, NaN weights, another architecture under tiny_cnn's key.
    good = cpath.read_bytes()
    for case in ("trunc", "nan", "arch"):
        dst = classifier_path(cfg.replace(cache_dir=str(ws / "caches" / case)))
        dst.parent.mkdir(parents=True)
        if case == "trunc":
            dst.write_bytes(good[: len(good) // 2])
        elif case == "nan":
            state = torch.load(cpath, weights_only=True)
            first = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
            state["state_dict"][first][0] = float("nan")
            save_checkpoint(state, dst)
        else:
            info = DatasetInfo("synthetic", 10, 1, (8, 8), (0.5,), (0.25,))
            save_classifier(build_classifier("small_cnn", info), dst, cfg.to_dict(), {})

    # Translator checkpoints for synthetic's C: truncated, NaN weights, unet weights labelled 'tiny', a classifier.
    ok = _translator_state(cfg)
    save_checkpoint(ok, ws / "translator.pt")
    (ws / "truncated.pt").write_bytes((ws / "translator.pt").read_bytes()[:300])
    nan = _translator_state(cfg)
    first = next(k for k, v in nan["translator"].items() if v.is_floating_point())
    nan["translator"][first].view(-1)[0] = float("inf")
    save_checkpoint(nan, ws / "nan.pt")
    other = _translator_state(cfg)
    other["translator"] = _translator_state(cfg, {"translator.arch": "unet", "translator.depth": 1,
                                                  "translator.width": 4})["translator"]
    save_checkpoint(other, ws / "other-arch.pt")

    # Earlier train runs to resume: one whose newest checkpoint is cut short, one of a unet translator.
    storage = ws / "storage"
    for name, state in (("resume-truncated", None),
                        ("resume-unet", _translator_state(cfg, {"translator.arch": "unet", "translator.depth": 1,
                                                                "translator.width": 4}))):
        ckpt = storage / name / "checkpoint_2026-01-01_00-00-00.000000" / "translator.pt"
        ckpt.parent.mkdir(parents=True)
        if state is None:  # cut short, yet registered in Ray Train's index: the one Ray would resume from
            ckpt.write_bytes((ws / "translator.pt").read_bytes()[:300])
            entry = {"version": 0, "checkpoint_dir_name": ckpt.parent.name, "metrics": {}}
            (storage / name / "checkpoint_manager_snapshot.json").write_text(json.dumps(
                {"ray_version": "2.60.0", "checkpoint_results": [entry], "latest_checkpoint_result": entry}))
        else:
            save_checkpoint(state, ckpt)
    (storage / "earlier" / "oodray_config.json").parent.mkdir()
    (storage / "earlier" / "oodray_config.json").write_text(json.dumps(cfg.to_dict()))

    out = ws / "out"  # an earlier evaluation's result
    out.mkdir()
    (out / "oblivious-Linf-0.1.json").write_text('{"complete": true, "fingerprint": {}}')

    # A small finished experiment with its results table, and damaged copies of it.
    exp = ws / "exp"
    (exp / "trial_a").mkdir(parents=True)
    (exp / "oodray_config.json").write_text(json.dumps(cfg.to_dict()))
    (exp / "trial_a" / "params.json").write_text(json.dumps({"translator.width": 8}))
    (exp / "trial_a" / "result.json").write_text(json.dumps(
        {"trial_id": "a", "epoch": 1, "objective": 0.5, "clean_accuracy": 0.9, "robust_accuracy": 0.5,
         "time_total_s": 1.0}) + "\n")
    write_outputs(build_table(exp), exp)
    for case in ("exp-truncated", "exp-unknown-key", "exp-wrong-type", "exp-unwritable"):
        shutil.copytree(exp, ws / case)
    params = ws / "exp-truncated" / "trial_a" / "params.json"
    params.write_text(params.read_text()[:10])
    bad = cfg.to_dict()
    bad["train"]["epochz"] = 3
    (ws / "exp-unknown-key" / "oodray_config.json").write_text(json.dumps(bad))
    bad = cfg.to_dict()
    bad["train"]["epochs"] = "three"
    (ws / "exp-wrong-type" / "oodray_config.json").write_text(json.dumps(bad))
    (ws / "exp-unwritable" / "results.csv").unlink()
    (ws / "exp-unwritable" / "results.csv").mkdir()  # cannot be replaced by a file (as a read-only mount)
    return ws


def _case(ws: Path, cli: str, case: str) -> tuple[list[str], list[str]] | None:
    """(argv, words the error line must hold) of one row; None where the input does not apply to the CLI."""
    storage, out = str(ws / "storage"), str(ws / "out")
    where = {"classifier": [], "train": ["--storage", storage, "--name", "bad"], "tune": ["--storage", storage,
             "--name", "bad"], "evaluate": ["--translator", "identity", "--threat-models", "oblivious", "--out", out]}
    base = where.get(cli, [])
    cache = {c: ["--dataset", "synthetic", "--cache-dir", str(ws / "caches" / c), *base] for c in ("trunc", "nan",
                                                                                                   "arch")}
    rows: dict[str, dict[str, tuple[list[str], list[str]]]] = {
        "empty-data-dir": {
            **{c: (["--dataset", "mnist", "--data-dir", str(ws / "empty"), *where[c]], ["mnist not found",
                                                                                        str(ws / "empty")])
               for c in where},
            "results": ([str(ws / "empty")], ["not an oodray experiment"]),
        },
        "wrong-channels": {c: (["--dataset", "mnist", "--data-dir", str(ws / "rgb-idx"), *where[c]],
                               ["images have shape", "expected (1, 28, 28)"]) for c in where},
        "nan-weights": {
            **{c: (cache["nan"], ["NaN/Inf", "classifier checkpoint"]) for c in ("classifier", "train", "tune")},
            "evaluate": (["--checkpoint", str(ws / "nan.pt"), "--out", out], ["NaN/Inf", "nan.pt"]),
        },
        "truncated-checkpoint": {
            **{c: (cache["trunc"], ["corrupt", "classifier checkpoint"]) for c in ("classifier", "train", "tune")},
            "evaluate": (["--checkpoint", str(ws / "truncated.pt"), "--out", out], ["corrupt", "truncated.pt"]),
            "results": ([str(ws / "exp-truncated")], ["params.json", "not valid JSON"]),
        },
        "truncated-checkpoint-resume": {
            "train": (["--dataset", "synthetic", "--storage", storage, "--name", "resume-truncated"],
                      ["corrupt", "resume-truncated"]),
        },
        "other-architecture": {
            **{c: (cache["arch"], ["is a 'small_cnn', not 'tiny_cnn'"]) for c in ("classifier", "train", "tune")},
            "evaluate": (["--checkpoint", str(ws / "other-arch.pt"), "--out", out],
                         ["does not fit a 'tiny'", "other-arch.pt"]),
        },
        "other-architecture-resume": {
            "train": (["--dataset", "synthetic", "--storage", storage, "--name", "resume-unet"],
                      ["a 'unet' translator", "another --name"]),
        },
        "yaml-unknown-key": {
            **{c: (["--dataset", "synthetic", "--config", str(ws / "unknown-key.yaml"), *where[c]],
                   ["unknown config key 'train.epochz'"]) for c in where},
            "results": ([str(ws / "exp-unknown-key")], ["oodray_config.json", "unknown config key 'train.epochz'"]),
        },
        "explicit-data-dir-without-data": {  # never a fallback to the system copy (/usr/share/datasets)
            c: (["--dataset", "fashion-mnist", "--data-dir", str(ws / "empty"), *where[c]],
                ["fashion-mnist not found in data directory", str(ws / "empty"), "t10k-images-idx3-ubyte"])
            for c in where},
        "corrupt-deflate-stream": {c: (["--dataset", "mnist", "--data-dir", str(ws / "corrupt-gz"), *where[c]],
                                       ["cannot read", "train-images-idx3-ubyte.gz"]) for c in where},
        "label-out-of-range": {c: (["--dataset", "mnist", "--data-dir", str(ws / "bad-labels"), *where[c]],
                                   ["label 200", "train-labels-idx1-ubyte.gz", "0..9"]) for c in where},
        "yaml-not-utf8": {c: (["--dataset", "synthetic", "--config", str(ws / "latin1.yaml"), *where[c]],
                              ["latin1.yaml", "is not UTF-8"]) for c in where},
        "run-in-use": {
            "train": (["--dataset", "synthetic", "--storage", storage, "--name", "locked"],
                      ["is in use by", "locked", "since"]),
            "tune": (["--dataset", "synthetic", "--storage", storage, "--name", "locked"],
                     ["is in use by", "locked", "since"]),
            "evaluate": (["--translator", "identity", "--dataset", "synthetic", "--threat-models", "oblivious",
                          "--out", str(ws / "out-locked")],
                         ["is in use by", "out-locked", "since"]),
        },
        "non-ascii-name": {c: (["--dataset", "synthetic", "--storage", storage, "--name", "exp-\u00fc"],
                               ["exp-\u00fc", "printable ASCII"]) for c in ("train", "tune")},
        "yaml-wrong-type": {
            **{c: (["--dataset", "synthetic", "--config", str(ws / "wrong-type.yaml"), *where[c]],
                   ["'train.epochs' must be an integer", "three"]) for c in where},
            "results": ([str(ws / "exp-wrong-type")], ["oodray_config.json", "'train.epochs' must be an integer"]),
        },
        "unwritable-output": {
            "classifier": (["--dataset", "synthetic", "--seed", "3", "--cache-dir", str(ws / "a-file" / "c")],
                           ["not writable", "a-file"]),
            "train": (["--dataset", "synthetic", "--storage", str(ws / "a-file" / "s")], ["not writable", "a-file"]),
            "tune": (["--dataset", "synthetic", "--storage", str(ws / "a-file" / "s")], ["not writable", "a-file"]),
            "evaluate": (["--translator", "identity", "--dataset", "synthetic", "--threat-models", "oblivious",
                          "--out", str(ws / "a-file" / "o")], ["not writable", "a-file"]),
            "results": ([str(ws / "exp-unwritable")], ["cannot write the results", "results.csv"]),
        },
    }
    return rows[case].get(cli)


CASES = ("empty-data-dir", "wrong-channels", "nan-weights", "truncated-checkpoint", "truncated-checkpoint-resume",
         "other-architecture", "other-architecture-resume", "yaml-unknown-key", "yaml-wrong-type", "unwritable-output",
         "explicit-data-dir-without-data", "corrupt-deflate-stream", "label-out-of-range", "yaml-not-utf8",
         "run-in-use", "non-ascii-name")


def _files(root: Path, content: bool = True) -> dict[str, tuple[int, Any]]:
    """Every file below root: size and content hash, or modification time (directories are not compared)."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest() if content
                                       else p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# Rows that do not apply are left out (results reads no images or weights; only train resumes a run by name).
ROWS = [(cli, case) for case in CASES for cli in CLIS if _case(Path("/ws"), cli, case) is not None]


@pytest.mark.parametrize("cli, case", ROWS, ids=[f"{cli}-{case}" for cli, case in ROWS])
def test_bad_input(cli, case, ws, oodray_cache, monkeypatch, capsys):
    argv, words = _case(ws, cli, case)
    before = {"ws": _files(ws), "cache": _files(oodray_cache, content=False)}
    if (cli, case) in RUN_AS_SUBPROCESS:
        proc = run_cli(f"oodray.{cli}", *argv, timeout=600)
        assert_one_line_error(proc, *words)
        assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr[-2000:]
    else:
        import importlib

        from oodray.cli import run

        forbid_ray(monkeypatch)
        main = importlib.import_module(f"oodray.{cli}").main
        with pytest.raises(SystemExit) as exit_info:
            run(main, argv)
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert exit_info.value.code == 2, err[-2000:]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err[-2000:]
        for w in words:
            assert w in errors[0], (w, errors[0])
    after = {"ws": _files(ws), "cache": _files(oodray_cache, content=False)}
    assert after == before, "a bad command wrote, changed or deleted files"


# --- security ----------------------------------------------------------------------------------------------------


def test_translator_checkpoint_carrying_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    cfg = resolve_config("synthetic")
    torch.save({"format": "oodray.translator/1", "epoch": 1, "config": cfg.to_dict(), "translator": _Boom(marker)},
               evil)
    proc = run_cli("oodray.evaluate", "--checkpoint", str(evil), "--out", str(tmp_path / "out"), timeout=600)
    assert_one_line_error(proc, "refused to unpickle", "evil.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cache_shard_carrying_code_is_refused_without_running(tmp_path):
    """Even with a manifest whose checksum matches (someone who can write the cache), a shard is only ever read as raw
    uint8 bytes: a pickle put in its place is never unpickled."""
    from oodray.cache import FORMAT, ObliviousCache, cache_dir
    from oodray.classifier import classifier_key, get_classifier

    marker = tmp_path / "pwned"
    cfg = resolve_config("synthetic", overrides=[f"cache_dir={tmp_path / 'cache'}"])
    shutil.copytree(get_classifier(resolve_config("synthetic"))[1].parent,
                    tmp_path / "cache" / "classifiers" / classifier_key(cfg))
    _, cpath = get_classifier(cfg)
    d = cache_dir(cfg, cpath)
    d.mkdir(parents=True)
    torch.save({"x_adv": _Boom(marker), "start": 0, "stop": 400}, d / "shard-00000.u8")
    sha = hashlib.sha256((d / "shard-00000.u8").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "n": 400, "shard_size": 512, "batch_size": 512, "shape": [1, 8, 8], "shards": {
            "00000": {"sha256": sha, "bytes": 400 * 64, "start": 0, "stop": 400}}}))
    with pytest.raises(CheckpointError, match="does not match its recorded size"):
        ObliviousCache(d)[0]  # what a Train worker reads
    assert not marker.exists()


def test_autoattack_state_carrying_code_is_refused_without_running(tmp_path):
    from oodray.attacks import autoattack

    marker = tmp_path / "pwned"
    evil = tmp_path / "block-000000.pt"
    torch.save({"fingerprint": _Boom(marker)}, evil)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with pytest.raises(ValueError, match="not an oodray AutoAttack state"):
        autoattack(model, torch.rand(4, 1, 8, 8), torch.arange(4), norm="Linf", eps=0.1, state_path=evil)
    assert not marker.exists()


UNPICKLING = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|^\s*import (cloud)?pickle|weights_only\s*=\s*False")


def test_only_oodray_io_unpickles():
    """Every checkpoint, cache shard and state file goes through oodray.io.load_checkpoint (weights_only)."""
    offenders = []
    for path in sorted((ROOT / "oodray").rglob("*.py")):
        if path.name == "io.py" and path.parent.name == "oodray":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if UNPICKLING.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("cli", ["train", "tune"])
@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "<absolute>"])
def test_names_cannot_escape_the_storage_directory(cli, name, tmp_path, monkeypatch, capsys):
    from oodray.cli import run

    forbid_ray(monkeypatch)
    storage = tmp_path / "storage"
    name = str(tmp_path / "escape") if name == "<absolute>" else name
    main = __import__(f"oodray.{cli}", fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--dataset", "synthetic", "--storage", str(storage), "--name", name])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must be a relative path inside" in err and name in err, err
    assert not (tmp_path / "escape").exists()
    assert not storage.exists() or not any(storage.rglob("*"))


def test_checkpoint_epoch_cannot_become_a_path(tmp_path):
    """evaluate derives its output directory from the checkpoint's epoch: only an integer epoch is accepted."""
    from oodray.io import save_checkpoint

    state = _translator_state(resolve_config("synthetic"))
    state["epoch"] = "1/../../../escape"
    run_dir = tmp_path / "run" / "checkpoint_x"
    save_checkpoint(state, run_dir / "translator.pt")
    proc = run_cli("oodray.evaluate", "--checkpoint", str(run_dir / "translator.pt"), timeout=600)
    assert_one_line_error(proc, "integer epoch")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint_x", "run", "translator.pt"]
