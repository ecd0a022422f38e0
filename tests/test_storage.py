"""oodray.storage's mirroring between a staging directory and a URI (file:// here; s3:// and gs:// take the same
pyarrow path): files the URI already holds are not sent again, and anything changed or missing there is."""

from __future__ import annotations

import os
from pathlib import Path

from oodray.locks import LOCK_FILE
from oodray.storage import MIRRORED, mirror_down, mirror_up

OLD = 1_000_000_000  # a file-time in 2001: a file re-sent gets the current time


def _stage(local: Path) -> None:
    (local / "eval" / "undefended").mkdir(parents=True)
    (local / "eval" / "undefended" / "summary.json").write_text('{"acc": 0.5}')
    (local / "eval" / "undefended" / "shard-0.json").write_text('{"n": 8}')
    (local / "results.csv").write_text("trial,acc\na,0.5\n")
    (local / "eval" / "undefended" / LOCK_FILE).write_text('{"pid": 1, "host": "here"}')  # held while it evaluates


def _age(bucket: Path) -> None:
    for p in bucket.rglob("*"):
        if p.is_file():
            os.utime(p, (OLD, OLD))


def _resent(bucket: Path) -> set[str]:
    return {p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file() and p.stat().st_mtime != OLD}


def test_mirror_up_sends_only_what_changed_or_is_missing(tmp_path):
    local, bucket = tmp_path / "stage", tmp_path / "bucket"
    uri = f"file://{bucket}"
    _stage(local)
    mirror_up(local, uri, ["eval", "results.csv", "absent.png"])
    assert (bucket / "eval" / "undefended" / "summary.json").read_text() == '{"acc": 0.5}'
    assert (bucket / "results.csv").exists() and not (bucket / "absent.png").exists()
    assert not (bucket / MIRRORED).exists()  # the record stays in the staging directory
    assert not (bucket / "eval" / "undefended" / LOCK_FILE).exists()  # so does a lock: it names a local process

    _age(bucket)
    mirror_up(local, uri, ["eval", "results.csv"])  # e.g. a finished experiment resumed: nothing new
    assert _resent(bucket) == set()

    (local / "results.csv").write_text("trial,acc\na,0.6\n")  # same size, other bytes
    (bucket / "eval" / "undefended" / "shard-0.json").unlink()  # gone from the URI
    (local / "eval" / "undefended" / "shard-1.json").write_text('{"n": 4}')  # new
    mirror_up(local, uri, ["eval", "results.csv"])
    assert _resent(bucket) == {"results.csv", "eval/undefended/shard-0.json", "eval/undefended/shard-1.json"}
    assert (bucket / "results.csv").read_text() == "trial,acc\na,0.6\n"


def test_what_was_fetched_is_not_sent_back(tmp_path):
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}"
    _stage(tmp_path / "first")
    mirror_up(tmp_path / "first", uri, ["eval", "results.csv"])
    (bucket / "eval" / "undefended" / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere"}')  # sent by old oodray
    _age(bucket)
    fresh = mirror_down(uri, tmp_path / "second")  # another machine reads the experiment back
    assert (fresh / "results.csv").read_text() == "trial,acc\na,0.5\n"
    assert not (fresh / "eval" / "undefended" / LOCK_FILE).exists()  # it would refuse this host's evaluation
    mirror_up(fresh, uri, ["eval", "results.csv"])
    assert _resent(bucket) == set()


def test_a_record_for_another_uri_or_a_damaged_one_sends_everything(tmp_path):
    local = tmp_path / "stage"
    _stage(local)
    mirror_up(local, f"file://{tmp_path / 'a'}", ["eval", "results.csv"])
    mirror_up(local, f"file://{tmp_path / 'b'}", ["eval", "results.csv"])
    assert (tmp_path / "b" / "results.csv").exists() and (tmp_path / "b" / "eval" / "undefended").is_dir()

    _age(tmp_path / "b")
    (local / MIRRORED).write_text("{not json")
    mirror_up(local, f"file://{tmp_path / 'b'}", ["eval", "results.csv"])
    assert len(_resent(tmp_path / "b")) == 3
