"""The streamed ImageFolder dataset: its index (torchvision's order, built once, rebuilt when a folder changes), the
bad inputs it refuses before Ray starts, the loader knobs, and a toy ImageNet (generated JPEG files) run end to end
through every CLI as a user would: classifier, train (oblivious and adaptive), evaluate and a tiny tune."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from conftest import forbid_ray, run_cli

from oodray.config import ExperimentConfig, config_hash, resolve_config
from oodray.config.schema import DataConfig
from oodray.data import IN_MEMORY, is_in_memory, is_streamed, load_dataset, stack
from oodray.errors import ConfigError, DataError
from oodray.imagefolder import ImageFiles, index_path, load_index, one_line
from oodray.toydata import make_toy_imagefolder

SIZE = 32  # data.image_size of the end-to-end runs (the toy JPEGs are 48 px: resized, then centre-cropped)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """10 classes, 200 train and 50 val JPEG files of 48 px."""
    return make_toy_imagefolder(tmp_path_factory.mktemp("toy") / "imagenet", classes=10, per_class=20,
                                val_per_class=5, size=48)


def _data(root, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", data_dir=str(root), image_size=SIZE, **kw)


# --- the dataset and its index -----------------------------------------------------------------------------------


def test_same_files_labels_and_pixels_as_torchvision_imagefolder(toy):
    import torchvision
    from torchvision import transforms

    s = load_dataset(_data(toy))
    assert s.info.num_classes == 10 and s.info.channels == 3 and s.info.image_size == (SIZE, SIZE)
    assert len(s.train) + len(s.val) == 200 and len(s.test) == 50
    tf = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE),
                             transforms.ToTensor()])
    ref = torchvision.datasets.ImageFolder(str(toy / "val"), transform=tf)
    assert [p.decode() for p in s.test.paths] == [os.path.relpath(p, toy) for p, _ in ref.samples]
    assert s.test.labels.tolist() == ref.targets
    for i in (0, 17, 49):
        x, y = s.test[i]
        assert y == ref[i][1] and torch.equal(x, ref[i][0])
    # imagenet is the same builder under its old name
    assert load_dataset(DataConfig(name="imagenet", data_dir=str(toy), image_size=SIZE)).test.paths.tolist() == \
        s.test.paths.tolist()


def test_registry_declares_what_is_held_in_memory(toy):
    assert IN_MEMORY == {"digits", "mnist", "fashion-mnist", "cifar10", "synthetic"}
    assert not is_in_memory("imagefolder") and not is_in_memory("imagenet") and is_in_memory("digits")
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'"):
        is_in_memory("svhn")
    s = load_dataset(_data(toy))
    assert is_streamed(s.train) and is_streamed(s.test) and not is_streamed(load_dataset(DataConfig()).train)
    with pytest.raises(DataError, match="refusing to load all 50 images of a streamed split"):
        stack(s.test)
    x, y = stack(s.test, [3, 4])
    assert x.shape == (2, 3, SIZE, SIZE) and y.tolist() == [s.test[3][1], s.test[4][1]]


def test_index_is_built_once_and_rebuilt_when_a_folder_changes(tmp_path):
    root = make_toy_imagefolder(tmp_path / "d", classes=3, per_class=4, val_per_class=2, size=16)
    first = load_index(root)
    assert first.scan_seconds > 0 and index_path(root.resolve()).is_file()
    again = load_index(root)
    assert again.scan_seconds == 0.0  # read from the cached index, no walk
    assert again.paths["train"].tolist() == first.paths["train"].tolist()
    (root / "train" / "class_01" / "00000.JPEG").rename(root / "train" / "class_01" / "zz.JPEG")
    renamed = load_index(root)
    assert renamed.scan_seconds > 0 and b"train/class_01/zz.JPEG" in renamed.paths["train"].tolist()
    (root / "train" / "class_02" / "00001.JPEG").unlink()
    assert len(load_index(root).labels["train"]) == 11


def test_loader_knobs_are_validated_and_leave_run_names_alone():
    cfg = resolve_config("digits")
    same = cfg.replace(**{"data.loader_workers": 3, "data.prefetch_factor": 4, "data.pin_memory": True,
                          "data.persistent_workers": False})
    assert config_hash(same) == config_hash(cfg)
    assert ExperimentConfig.from_dict(same.to_dict()) == same
    for key, bad in (("data.loader_workers", -1), ("data.prefetch_factor", 0)):
        with pytest.raises(ConfigError, match=re.escape(key)):
            cfg.replace(**{key: bad})
    with pytest.raises(ConfigError, match="data.loader_workers"):
        cfg.replace(**{"data.loader_workers": "many"})


# --- bad input: one line naming the problem, before Ray ----------------------------------------------------------


def test_layout_problems_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_index(tmp_path / "nowhere")
    root = make_toy_imagefolder(tmp_path / "d", classes=3, per_class=2, val_per_class=1, size=16)
    (root / "val" / "class_02").rename(root / "val" / "class_09")
    with pytest.raises(DataError, match=r"only in train/: class_02 \(1\); only in val/: class_09 \(1\)"):
        load_index(root)
    (root / "val" / "class_09").rename(root / "val" / "class_02")
    for f in (root / "val" / "class_01").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder '.*val/class_01' holds no image file"):
        load_index(root)


def test_unreadable_file_is_named_at_index_time(tmp_path):
    root = make_toy_imagefolder(tmp_path / "d", classes=2, per_class=3, val_per_class=1, size=16)
    bad = root / "train" / "class_01" / "00002.JPEG"
    bad.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(DataError, match=re.escape(f"cannot read '{bad}' as an image")) as e:
        load_index(root)
    assert "\n" not in str(e.value)


def test_file_cut_after_its_header_is_named_when_decoded(tmp_path):
    """A header check cannot see a cut scan: decoding names the file in one line, also through a decode process."""
    root = make_toy_imagefolder(tmp_path / "d", classes=2, per_class=3, val_per_class=1, size=64)
    cut = root / "val" / "class_00" / "00000.JPEG"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])  # the header and part of the scan
    s = load_dataset(DataConfig(name="imagefolder", data_dir=str(root), image_size=SIZE))  # header still reads
    with pytest.raises(DataError, match=re.escape(f"cannot decode '{cut}'")):
        s.test[0]
    loader = torch.utils.data.DataLoader(s.test, batch_size=2, num_workers=1)
    with pytest.raises(DataError) as e:
        list(loader)
    assert "\n" in str(e.value)  # what torch makes of it: the decode process's traceback
    assert str(one_line(e.value)).startswith(f"cannot decode '{cut}'") and "\n" not in str(one_line(e.value))


def test_dataset_pickles_without_its_transform(toy):
    import pickle

    ds = load_dataset(_data(toy)).test
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert isinstance(copy, ImageFiles) and copy._tf is None and torch.equal(copy[5][0], ds[5][0])
    assert isinstance(copy.paths, np.ndarray) and copy.paths.dtype.kind == "S"


@pytest.mark.parametrize("case, needles", [
    ("missing-root", ["does not exist"]),
    ("classes-differ", ["same class folders", "only in val/: extra"]),
    ("bad-jpeg", ["cannot read", "00001.JPEG"]),
])
def test_cli_refuses_bad_folders_before_ray(tmp_path, monkeypatch, capsys, case, needles):
    from oodray.cli import run
    from oodray.train import main

    root = make_toy_imagefolder(tmp_path / "d", classes=2, per_class=2, val_per_class=1, size=16)
    if case == "missing-root":
        root = tmp_path / "nope"
    elif case == "classes-differ":
        (root / "val" / "extra").mkdir()
    else:
        (root / "train" / "class_00" / "00001.JPEG").write_bytes(b"")
    forbid_ray(monkeypatch)
    with pytest.raises(SystemExit) as e:
        run(main, ["--dataset", "imagefolder", "--data-dir", str(root), "--storage", str(tmp_path / "runs"),
                   "--set", "classifier.arch=tiny_cnn", "--set", "classifier.epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0]


# --- an object-store root (s3:// through a local S3 server, file://) -------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 API (moto's server on a local port) and a function that uploads a local folder under a key prefix
    and returns its s3:// URI, with the endpoint as pyarrow's URI options."""
    import logging

    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    fs = pyarrow.fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                                 allow_bucket_creation=True, allow_bucket_deletion=True)
    fs.create_dir("toy-bucket")

    def upload(local, prefix: str) -> str:
        pyarrow.fs.copy_files(str(local), f"toy-bucket/{prefix}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        return f"s3://toy-bucket/{prefix}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    yield upload, fs
    server.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_s3_and_file_uri_roots_give_the_local_roots_files_labels_and_pixels(toy, s3):
    upload, _ = s3
    local = load_dataset(_data(toy))
    for uri in (upload(toy, "toy"), f"file://{toy}"):
        remote = load_dataset(_data(uri))
        assert remote.info == local.info
        for a, b in ((remote.train, local.train), (remote.val, local.val), (remote.test, local.test)):
            assert list(getattr(a, "indices", range(len(a)))) == list(getattr(b, "indices", range(len(b))))
        assert remote.test.paths.tolist() == local.test.paths.tolist()
        assert remote.test.labels.tolist() == local.test.labels.tolist()
        for i in (0, 17, 49):
            x, y = remote.test[i]
            assert y == local.test[i][1] and torch.equal(x, local.test[i][0])
        # the cached index is used again (no listing of the files), and the dataset pickles without its connection
        again = load_index(uri)
        assert again.scan_seconds == 0 and again.root == uri
        loader = torch.utils.data.DataLoader(remote.test, batch_size=10, num_workers=1)
        xs = torch.cat([x for x, _ in loader])
        assert torch.equal(xs[17], local.test[17][0])


def test_bad_s3_roots_are_one_line_data_errors_naming_the_object(tmp_path, s3):
    upload, fs = s3
    root = make_toy_imagefolder(tmp_path / "d", classes=3, per_class=2, val_per_class=1, size=16)
    uri = upload(root, "bad")
    endpoint = uri.split("?", 1)[1]
    with pytest.raises(DataError, match=r"data root 's3://toy-bucket/nowhere' does not exist"):
        load_index(f"s3://toy-bucket/nowhere?{endpoint}")
    with pytest.raises(DataError, match=r"cannot open data root 'nosuch://x/y'"):
        load_index("nosuch://x/y")
    fs.create_dir("toy-bucket/bad/val/class_09")
    with fs.open_output_stream("toy-bucket/bad/val/class_09/00000.JPEG") as f:
        f.write((root / "val" / "class_00" / "00000.JPEG").read_bytes())
    with pytest.raises(DataError, match=r"only in val/: class_09 \(1\)"):
        load_index(uri)
    fs.delete_dir("toy-bucket/bad/val/class_09")
    with fs.open_output_stream("toy-bucket/bad/train/class_01/00001.JPEG") as f:
        f.write(b"<html>403 Forbidden</html>")
    with pytest.raises(DataError, match=re.escape("cannot read 's3://toy-bucket/bad/train/class_01/00001.JPEG' "
                                                  "as an image")) as e:
        load_index(uri)
    assert "\n" not in str(e.value) and "endpoint_override" not in str(e.value)  # the URI's options stay out


# --- a toy ImageNet end to end, as a user runs it ----------------------------------------------------------------

COMMON = ["--dataset", "imagefolder", "--set", f"data.image_size={SIZE}", "--set", "classifier.arch=small_cnn",
          "--set", "classifier.epochs=4", "--set", "classifier.lr=3e-3", "--set", "classifier.batch_size=32",
          "--set", "attack.eps=0.25", "--set", "attack.steps=2", "--set", "train.batch_size=16",
          "--set", "train.max_batches=2", "--set", "train.proxy_examples=16", "--set", "train.proxy_steps=2",
          "--set", "train.cpus_per_worker=0.5", "--set", "eval.n_examples=8", "--set", "eval.shards=1"]


@pytest.mark.ray
def test_toy_imagenet_end_to_end(toy, tmp_path):
    data = ["--data-dir", str(toy)]
    proc = run_cli("oodray.classifier", *COMMON, *data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(re.search(r"clean test accuracy ([0-9.]+) on 50 images", proc.stdout).group(1))
    assert acc >= 0.6, proc.stdout  # the classes are learnable from the decoded JPEG files (chance: 0.1)

    # The oblivious regime (its cache built from the decoded files) on 2 workers here; the adaptive regime on 1 worker
    # is the search's trial below.
    proc = run_cli("oodray.train", *COMMON, *data, "--set", "train.regime=oblivious", "--set", "translator.arch=tiny",
                   "--workers", "2", "--epochs", "1", "--storage", str(tmp_path), "--name", "oblivious")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained tiny on imagefolder for 1 epochs" in proc.stdout, proc.stdout
    ckpt = re.search(r"checkpoint: (\S+)", proc.stdout).group(1)

    out = tmp_path / "eval"
    proc = run_cli("oodray.evaluate", *COMMON, *data, "--checkpoint", ckpt,
                   "--threat-models", "oblivious,adaptive", "--no-shifts", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.json").is_file() and (out / "adaptive-Linf-0.25.json").is_file()

    # A one-trial search in the adaptive regime (its final AutoAttack is the evaluation above, already covered: left
    # out, -1 min).
    proc = run_cli("oodray.tune", *COMMON, *data, "--num-samples", "1", "--epochs", "1", "--final-top-k", "0",
                   "--set", "tune.space={translator.arch: [resnet], translator.width: [8], translator.blocks: [1], "
                   "attack.steps: [5], train.regime: [adaptive]}",
                   "--storage", str(tmp_path / "tune"), "--name", "toy")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(tmp_path / "tune" / "toy" / "results.csv")
    trials = table[table["trial"] != "undefended"]
    assert len(trials) == 1 and trials["clean acc (proxy)"].notna().all() and (trials["arch"] == "resnet").all()
    assert (trials["regime"] == "adaptive").all(), trials.columns.tolist()


@pytest.mark.ray
@pytest.mark.slow
def test_file_damaged_after_indexing_stops_training_with_one_line(tmp_path):
    """A file cut after the index was built (its folder's mtime does not change, so the header check does not run
    again) fails in a Train worker's decode process: the run ends with one line naming the file and exit 2."""
    root = make_toy_imagefolder(tmp_path / "d", classes=2, per_class=8, val_per_class=2, size=48)
    flags = [*COMMON, "--data-dir", str(root), "--set", "classifier.epochs=1"]
    proc = run_cli("oodray.classifier", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = root / "train" / "class_01" / "00003.JPEG"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    proc = run_cli("oodray.train", *flags, "--set", "train.regime=adaptive", "--set", "translator.arch=tiny",
                   "--set", "train.max_batches=100", "--set", "train.max_failures=0", "--workers", "1", "--epochs",
                   "1", "--storage", str(tmp_path / "runs"))
    # Ray's own log lines (printed asynchronously, even after oodray's) may show the worker's traceback; oodray's
    # verdict is its one `error:` line.
    assert proc.returncode == 2, proc.stderr[-3000:]
    verdict = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(verdict) == 1, proc.stderr[-3000:]
    assert verdict[0].startswith(f"error: cannot decode '{cut}'") and verdict[0].endswith("replace or remove that file")
