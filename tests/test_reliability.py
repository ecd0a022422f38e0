"""Reliability round 2 (#15): explicit data dirs, damaged IDX/YAML files, atomic writes on a full disk, checkpoints
cut short on resume, run locks, and local Ray bound to loopback. See docs/reliability.md for what each guarantees.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import oodray
from oodray.config import DataConfig, load_yaml
from oodray.data import DEBIAN_FASHION_MNIST, load_dataset, read_idx
from oodray.errors import ConfigError, DataError

CODE = Path(oodray.__file__).resolve().parents[1]  # subprocesses run the oodray this test imported


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _write_mnist(d: Path, n: int = 20, labels: np.ndarray | None = None) -> None:
    rng = np.random.default_rng(0)
    for split, m in (("train", n), ("t10k", n // 2)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (m, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, m) if labels is None else labels[:m])


# --- item 4: an explicit --data-dir is the only place looked -------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs the system copy that must NOT be used")
@pytest.mark.parametrize("layout", ["empty", "partial"])
def test_explicit_data_dir_without_the_data_is_an_error_not_the_system_copy(tmp_path, layout):
    d = tmp_path / "fm"
    d.mkdir()
    if layout == "partial":  # the training files only, as after an interrupted copy
        _write_mnist(d)
        for f in d.glob("t10k-*"):
            f.unlink()
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="fashion-mnist", data_dir=str(d)))
    msg = str(err.value)
    assert str(d) in msg and "fashion-mnist not found" in msg and "t10k-images-idx3-ubyte" in msg, msg
    assert str(DEBIAN_FASHION_MNIST) not in msg
    if layout == "partial":
        assert "train-images-idx3-ubyte," not in msg.split("missing there:")[1], msg  # only what is missing


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_without_data_dir_the_system_copy_is_still_used():
    assert len(load_dataset(DataConfig(name="fashion-mnist")).test) == 10000


# --- item 8: damaged IDX files and YAML files are one line naming the file -----------------------------------------


def test_corrupt_deflate_stream_names_the_file(tmp_path):
    _write_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    z = bytearray(p.read_bytes())
    for i in range(20, len(z) - 8):  # keep the gzip header, damage the deflate stream
        z[i] ^= 0x55
    p.write_bytes(bytes(z))
    with pytest.raises(DataError, match=f"cannot read '{p}'"):
        read_idx(p)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))


def test_label_out_of_range_names_the_file(tmp_path):
    labels = np.arange(20) % 10
    labels[7] = 200
    _write_mnist(tmp_path, labels=labels)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path)))
    msg = str(err.value)
    assert "train-labels-idx1-ubyte.gz" in msg and "label 200 at index 7" in msg and "0..9" in msg, msg


def test_non_utf8_yaml_names_the_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  lr: 0.001  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file '{p}' is not UTF-8"):
        load_yaml(p)


# --- item 3: the local Ray that oodray starts listens on loopback only ---------------------------------------------

LISTEN_PROBE = r"""
import json, sys, time
import ray
import psutil  # vendored by ray (ray/thirdparty_files), importable once ray is
from oodray.runtime import init_ray

init_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process, with its own gRPC server
session = ray._private.worker._global_node.get_session_dir_path()
me = psutil.Process()
want = {"gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ray::IDLE"}


def scan():
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):  # Ray's daemons (the autoscaler monitor...), wherever reparented
        if any(session in a for a in (p.info["cmdline"] or [])):
            procs.setdefault(p.pid, p)
    rows = []
    for p in procs.values():
        try:
            cmd = " ".join(p.cmdline())
            rows += [[c.laddr.ip, c.laddr.port, p.pid, cmd[:160]] for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return rows


deadline = time.time() + 600  # agents open their ports shortly after start; generous under load
while {w for w in want if any(w in r[3] for r in scan())} != want and time.time() < deadline:
    time.sleep(0.5)
time.sleep(3)  # late listeners (the autoscaler's metrics server) get their chance to show
rows = scan()
print("NODE_IP", ray.util.get_node_ip_address())
print("URL", ray._private.worker._global_node.webui_url)
print("LISTEN", json.dumps(rows))
ray.shutdown()
"""
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only():
    """Every listening socket of the local Ray that `init_ray` starts (GCS, raylet with its object manager, dashboard,
    dashboard agent with its metrics export, runtime-env agent, the driver's and a worker's gRPC servers) is bound to
    loopback, the node IP is 127.0.0.1 and the dashboard's URL is on 127.0.0.1."""
    import json
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LISTEN_PROBE], capture_output=True, text=True, timeout=900,
                          cwd=CODE, env={**env, "PYTHONPATH": str(CODE)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(re.search(r"^LISTEN (.*)$", proc.stdout, re.M).group(1))
    listening = " ".join(r[3] for r in rows)
    for name in ("gcs_server", "raylet", "dashboard", "DashboardAgent", "RuntimeEnvAgent", "ray::IDLE"):
        assert name in listening, (name, rows)  # the probe saw every component, so the check below is not vacuous
    exposed = [r for r in rows if r[0] not in LOOPBACK]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(f"{ip}:{port} pid {pid} {cmd}"
                                                                     for ip, port, pid, cmd in exposed)
    assert re.search(r"^NODE_IP 127\.0\.0\.1$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^URL 127\.0\.0\.1:\d+$", proc.stdout, re.M), proc.stdout


SIGTERM_PROBE = r"""
import time
from oodray.cli import run
from oodray.runtime import init_ray


def main(argv):
    init_ray(num_cpus=1)
    print("READY", flush=True)
    time.sleep(600)


run(main)
"""


@pytest.mark.ray
def test_sigterm_after_ray_starts_stops_as_ctrl_c_does():
    """ray.init sets the driver's SIGTERM handler to sys.exit(15); a command's own (stop as Ctrl-C does: exit 130,
    a line saying finished work is kept) must survive it, or a SIGTERM outside the search exits 15 without one."""
    import os
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=CODE, env={**env, "PYTHONPATH": str(CODE)})
    try:
        ready = proc.stdout.readline().strip() == "READY"  # "" at EOF: the probe died before Ray was up
        if ready:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)  # reads stderr while waiting: Ray's lines cannot fill the pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert ready, err[-3000:]
    assert proc.returncode == 130, err[-3000:]
    assert "finished work is kept" in [ln for ln in err.splitlines() if ln.strip()][-1], err[-3000:]


LAST_LINE_PROBE = r"""
import sys
import ray
from oodray.cli import end_ray, run, setup_logging
from oodray.runtime import init_ray


@ray.remote
def chatty(i):
    import time
    time.sleep(0.2 * i)
    print("the same line from every task", file=sys.stderr, flush=True)


def main(argv):
    setup_logging()
    init_ray(num_cpus=2)
    ray.get([chatty.remote(i) for i in range(6)])
    end_ray()
    print("LAST LINE", flush=True)
    return 0


run(main)
"""


@pytest.mark.ray
def test_a_command_s_last_line_comes_after_every_worker_line():
    """Ray relays repeated worker lines late, as one "[repeated Nx across cluster]" line some seconds on (seen after a
    search's last line: an AutoAttack shard's). `end_ray`, which every command calls before its closing lines,
    disconnects from the command's Ray first. Without it the relayed line comes after "LAST LINE" here."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LAST_LINE_PROBE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=CODE, env={**env, "PYTHONPATH": str(CODE)}, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert any("the same line from every task" in ln for ln in lines), proc.stdout[-3000:]  # relayed: not vacuous
    assert lines[-1] == "LAST LINE", proc.stdout[-3000:]


# --- item 6: atomic, durable writes; a full disk is one line and leaves no temp files ------------------------------


@pytest.fixture
def full_fs(tmp_path):
    """A real, full filesystem: a 256 KiB tmpfs (needs root, as in CI) filled to the last page."""
    import os
    import subprocess

    d = tmp_path / "full"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched ENOSPC tests still run")
    try:
        fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.name != "filler" and p.is_file())


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    import os

    from oodray.io import atomic_write_text

    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert len(synced) == 2 and Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".a.json.")
    assert synced[1] == str(tmp_path), synced  # the rename is made durable too
    assert (tmp_path / "a.json").read_text() == "{}" and _leftovers(tmp_path) == ["a.json"]


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_full_disk_while_writing_is_one_line_naming_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch, code):
    import errno
    import os

    from oodray.errors import StorageFullError
    from oodray.io import atomic_write_text

    (tmp_path / "a.json").write_text("old")

    def full(_fd: int) -> None:  # where NFS and quotas report it: at flush/fsync
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageFullError) as err:
        atomic_write_text(tmp_path / "a.json", "new")
    assert str(tmp_path / "a.json") in str(err.value) and "\n" not in str(err.value)
    assert (tmp_path / "a.json").read_text() == "old" and _leftovers(tmp_path) == ["a.json"]


def test_real_full_disk_autoattack_state_and_checkpoints(full_fs):
    """On a real full tmpfs: AutoAttack's state file (written by `attacks._save_state`) and a checkpoint fail with one
    line naming the file, and leave neither a temp file nor a cut file behind."""
    import torch

    from oodray.attacks.autoattack import _Progress, _save_state
    from oodray.errors import StorageFullError
    from oodray.io import save_checkpoint

    p = _Progress(x_adv=torch.rand(4, 1, 8, 8), y_adv=torch.arange(4), robust=torch.ones(4, dtype=torch.bool),
                  fooled=torch.zeros(4, dtype=torch.bool), done=[], pending=None, accuracy={}, messages=[])
    with pytest.raises(StorageFullError, match=f"'{full_fs / 'state' / 'block-000000.pt'}'"):
        _save_state(full_fs / "state" / "block-000000.pt", {"n": 4}, torch.arange(4), p)
    with pytest.raises(StorageFullError, match="translator.pt"):
        save_checkpoint({"w": torch.rand(64, 64)}, full_fs / "run" / "translator.pt")
    assert _leftovers(full_fs) == []


def test_real_full_disk_cli_is_one_line_and_exit_2(full_fs):
    """`python -m oodray.classifier` training into a full cache: exit 2, one `error:` line naming the file."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "oodray.classifier", "--dataset", "synthetic", "--seed", "11",
                           "--cache-dir", str(full_fs / "cache")], capture_output=True, text=True, timeout=900,
                          cwd=CODE, env={**os.environ, "PYTHONPATH": str(CODE)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no space left" in lines[0] and str(full_fs / "cache") in lines[0], lines
    assert _leftovers(full_fs) == []


# --- item 2: one writer per run directory ---------------------------------------------------------------------------

HOLDER = r"""
import sys, time
from oodray.locks import RunLock
with RunLock(sys.argv[1], "run directory"):
    print("held", flush=True)
    time.sleep(3600)
"""


@pytest.fixture
def held(tmp_path):
    """Holds a directory's lock from a live subprocess (as a running oodray command would); yields (dir, pid)."""
    import os
    import subprocess
    import sys

    procs = []

    def hold(d: Path) -> int:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True, cwd=CODE,
                             env={**os.environ, "PYTHONPATH": str(CODE)})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p.pid

    yield hold
    for p in procs:
        p.kill()
        p.wait(timeout=600)


def _cli(cli: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Runs a CLI in-process through `oodray.cli.run`; Ray must not start: ray.init raises an oodray error, so a run
    that gets that far exits 2 with "error: reached Ray"."""
    import importlib

    import ray

    from oodray.cli import run
    from oodray.errors import OodrayError

    def reached_ray(*_a, **_k):
        raise OodrayError("reached Ray")

    monkeypatch.setattr(ray, "init", reached_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run(importlib.import_module(f"oodray.{cli}").main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("cli", ["train", "tune", "evaluate"])
def test_second_writer_is_refused_with_one_line_naming_the_holder(cli, tmp_path, held, monkeypatch, capsys):
    import socket

    storage = tmp_path / "storage"
    target = tmp_path / "out" if cli == "evaluate" else storage / "same"
    pid = held(target)
    argv = {"train": ["--dataset", "synthetic", "--storage", str(storage), "--name", "same"],
            "tune": ["--dataset", "synthetic", "--storage", str(storage), "--name", "same"],
            "evaluate": ["--translator", "identity", "--dataset", "synthetic", "--threat-models", "oblivious",
                         "--out", str(target)]}[cli]
    code, err = _cli(cli, argv, monkeypatch, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for words in (str(target), "is in use by", f"pid {pid}", f"host {socket.gethostname()}", "since"):
        assert words in lines[0], (words, lines[0])
    assert sorted(p.name for p in target.iterdir()) == [".oodray.lock"]  # the holder's lock, nothing else


@pytest.mark.slow
def test_real_second_train_process_is_refused_while_the_first_runs(tmp_path):
    """Two real `python -m oodray.train` on one run: the second exits 2 with the holder's line while the first
    trains (its lock is held across Ray), and the first finishes and removes its lock."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(CODE), PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "oodray.train", "--dataset", "synthetic", "--storage", str(tmp_path), "--name",
            "run", "--epochs", "1", "--set", "train.max_batches=2", "--set", "train.proxy_examples=16"]
    lock = tmp_path / "run" / ".oodray.lock"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=CODE, env=env)
    try:
        deadline = time.time() + 600
        while not lock.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        holder = json.loads(lock.read_text())
        second = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=CODE, env=env)
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
    assert f"pid {first.pid}" in lines[0] and holder["pid"] == first.pid and "oodray.train" in lines[0], lines
    assert first.returncode == 0, out[-3000:]
    assert not lock.exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, monkeypatch, capsys, caplog):
    import json
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "storage" / "run"
    run.mkdir(parents=True)
    stale = {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00 +0000",
             "command": "python -m oodray.train --name run"}
    (run / ".oodray.lock").write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="oodray.locks"):
        code, err = _cli("train", ["--dataset", "synthetic", "--storage", str(tmp_path / "storage"), "--name", "run"],
                         monkeypatch, capsys)
    assert code == 2 and "error: reached Ray" in err, err  # it went on, past the lock, to start Ray
    assert any("took over the stale lock" in r.message and f"pid {dead.pid}" in r.message for r in caplog.records)
    assert not (run / ".oodray.lock").exists()  # released when the command ended


def test_lock_is_released_on_exceptions_and_pid_reuse_is_not_a_holder(tmp_path):
    import json
    import os
    import socket

    from oodray.locks import LockedError, RunLock

    with pytest.raises(RuntimeError):
        with RunLock(tmp_path, "run directory"):
            assert json.loads((tmp_path / ".oodray.lock").read_text())["pid"] == os.getpid()
            with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
                RunLock(tmp_path, "run directory").acquire()  # a second open file: refused even in one process
            raise RuntimeError("boom")
    assert not (tmp_path / ".oodray.lock").exists()
    # A live pid whose start time differs from the recorded one is a reused pid: the lock is stale.
    (tmp_path / ".oodray.lock").write_text(json.dumps({"pid": os.getpid(), "pid_start": -1,
                                                       "host": socket.gethostname()}))
    with RunLock(tmp_path):
        pass
    # A lock written on another host is never taken over: its pid cannot be checked from here.
    (tmp_path / ".oodray.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(LockedError, match="another host"):
        RunLock(tmp_path).acquire()


# --- item 6: a checkpoint cut short is never resumed from ----------------------------------------------------------


def _snapshot(run: Path, names: list[str]) -> None:
    """Ray Train 2.60's checkpoint index, as its CheckpointManager writes it (the keys oodray reads)."""
    import json

    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": results, "latest_checkpoint_result": results[-1]}))


def _state(epoch: int) -> dict:
    from oodray.config import resolve_config
    from oodray.models.translator import build_translator

    cfg = resolve_config("synthetic")
    return {"format": "oodray.translator/1", "epoch": epoch, "config": cfg.to_dict(), "optimizer": {},
            "translator": build_translator(cfg.translator, 1, (8, 8)).state_dict(), "gate": None, "metrics": {}}


def test_resume_skips_unregistered_partial_checkpoints_and_uses_what_ray_registered(tmp_path, caplog):
    from oodray.config import resolve_config
    from oodray.io import save_checkpoint
    from oodray.train import check_resumable

    run = tmp_path / "run"
    for i, name in enumerate(["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"], 1):
        save_checkpoint(_state(i), run / name / "translator.pt")
    _snapshot(run, ["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"])
    cut = run / "checkpoint_2026-01-01_00-00-03.000000"  # the upload a full disk cut short
    cut.mkdir()
    (cut / "translator.pt").write_bytes((run / "checkpoint_2026-01-01_00-00-02.000000" / "translator.pt")
                                        .read_bytes()[:300])
    with caplog.at_level("WARNING", logger="oodray.io"):
        check_resumable(resolve_config("synthetic"), run)  # no error: Ray resumes from the registered epoch 2
    assert not cut.exists() and (run / ".incomplete-checkpoint_2026-01-01_00-00-03.000000" / "translator.pt").exists()
    assert any("skipped incomplete checkpoint" in r.message and str(cut) in r.message for r in caplog.records)


def test_damaged_registered_checkpoint_or_index_is_one_line(tmp_path):
    from oodray.config import resolve_config
    from oodray.errors import CheckpointError
    from oodray.io import save_checkpoint
    from oodray.train import check_resumable

    run = tmp_path / "run"
    name = "checkpoint_2026-01-01_00-00-01.000000"
    save_checkpoint(_state(1), run / name / "translator.pt")
    data = (run / name / "translator.pt").read_bytes()
    (run / name / "translator.pt").write_bytes(data[:300])
    _snapshot(run, [name])
    with pytest.raises(CheckpointError, match=f"{name}/translator.pt' is corrupt"):  # Ray would load this one
        check_resumable(resolve_config("synthetic"), run)
    assert (run / name).exists()  # registered: never moved
    (run / "checkpoint_manager_snapshot.json").write_text('{"ray_version": "2.6')  # cut short
    with pytest.raises(CheckpointError, match="checkpoint_manager_snapshot.json' is cut short or damaged"):
        check_resumable(resolve_config("synthetic"), run)


@pytest.mark.ray
@pytest.mark.slow
def test_real_train_resumes_past_a_checkpoint_cut_short(tmp_path):
    """A real run of 2 epochs, then a checkpoint directory cut short as a full disk leaves it: the re-run (3 epochs)
    reports and sets it aside, and resumes from epoch 2, which is what Ray Train registered."""
    import os
    import subprocess
    import sys

    from oodray.io import load_checkpoint
    from oodray.train import ray_train_checkpoints

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(CODE), PYTHONUNBUFFERED="1")

    def train(epochs: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "oodray.train", "--dataset", "synthetic", "--storage",
                               str(tmp_path), "--name", "run", "--epochs", str(epochs), "--set", "train.max_batches=2",
                               "--set", "train.proxy_examples=16"], capture_output=True, text=True, timeout=900,
                              cwd=CODE, env=env)

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    latest, _ = ray_train_checkpoints(run)
    cut = run / "checkpoint_2099-01-01_00-00-00.000000"  # newest by name, as the interrupted upload would be
    cut.mkdir()
    (cut / "translator.pt").write_bytes((run / latest / "translator.pt").read_bytes()[:1000])
    second = train(3)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipped incomplete checkpoint" in second.stderr and str(cut) in second.stderr, second.stderr[-3000:]
    newest, _ = ray_train_checkpoints(run)
    metrics = load_checkpoint(run / newest / "translator.pt")["metrics"]
    assert metrics["epoch"] == 3 and metrics["resumed_from_epoch"] == 2, metrics
    assert not cut.exists() and (run / f".incomplete-{cut.name}").is_dir()
