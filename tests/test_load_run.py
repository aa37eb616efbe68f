"""One way to load a run (`instdisc.methods.load_run`), and what --resume checks with it: the
run's own method, its data by content (from any working directory, by any path), and its epochs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_classes import PER_CLASS, make_tree

from instdisc.cli import main
from instdisc.methods import load_run
from instdisc.sources import open_source
from instdisc.sources.fingerprint import data_fingerprint, difference

TINY = ["--epochs", "1", "--batch-size", "4", "--width", "4", "--knn-k", "1", "--aug-size", "8",
        "--no-progress", "--device", "cpu"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def epochs_done(run):
    return load_run(run, "cpu")[2]["state"]["epoch"]


def test_load_run_rebuilds_the_trained_model(tmp_path, cache):
    run = tmp_path / "run"
    assert main(["train", "--method", "npid", "--data", "synthetic:16", "--out", str(run), "--nce-k", "0", *TINY]) == 0
    method, cfg, ck = load_run(run, "cpu")
    assert cfg.run.method == "npid" and not method.training and ck["state"]["epoch"] == 1
    for name, t in method.state_dict().items():
        torch.testing.assert_close(t, ck["model"][name], rtol=0, atol=0, equal_nan=True, msg=name)
    same, _, _ = load_run(run / "checkpoints" / "last.pt", "cpu")
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(method.embed(x), same.embed(x))


def test_evaluation_does_not_import_the_training_engine(tmp_path, cache):
    run = tmp_path / "run"
    assert main(["train", "--method", "npid", "--data", "synthetic:16", "--out", str(run), "--nce-k", "0", *TINY]) == 0
    code = ("import sys; from instdisc.cli import main; rc = main(['knn', sys.argv[1], '-k', '1']); "
            "assert rc == 0, rc; assert 'instdisc.engine' not in sys.modules, 'engine imported'")
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "INSTDISC_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr


def test_resume_needs_no_method(tmp_path, cache, capsys):
    run = tmp_path / "run"
    args = ["--data", "synthetic:16", "--out", str(run), "--moco-k", "8", *TINY]
    assert main(["train", "--method", "moco", *args]) == 0
    capsys.readouterr()
    assert main(["train", *args[:-len(TINY)], "--resume", "--epochs", "2", "--no-progress", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    assert epochs_done(run) == 2 and load_run(run, "cpu")[1].run.method == "moco"


def test_resume_from_another_directory_and_by_another_path(tmp_path, cache, monkeypatch):
    make_tree(tmp_path / "data", {"train": "abc", "test": "abc"})
    monkeypatch.chdir(tmp_path)
    common = ["--method", "npid", "--nce-k", "0", "--batch-size", "4", "--width", "4", "--knn-k", "1",
              "--aug-size", "8", "--no-progress", "--device", "cpu"]
    assert main(["train", "--data", "data", "--out", "run", "--epochs", "1", *common]) == 0
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"]["data"] == str(tmp_path / "data") and stored["run"]["out"] == str(tmp_path / "run")

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths of the first command mean nothing here
    assert main(["train", "--out", "../run", "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert epochs_done(tmp_path / "run") == 2
    # the same images by another path: a symlink, then a copy (new mtimes; same pixels)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert main(["train", "--out", "../run", "--data", "../link", "--resume", "--epochs", "3", "--no-progress"]) == 0
    shutil.copytree(tmp_path / "data", tmp_path / "copy", copy_function=shutil.copyfile)
    assert main(["train", "--out", "../run", "--data", "../copy", "--resume", "--epochs", "4", "--no-progress"]) == 0
    assert epochs_done(tmp_path / "run") == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["data"] == str(tmp_path / "copy")


def test_resume_refuses_changed_images_with_the_reason(tmp_path, cache, capsys):
    data = make_tree(tmp_path / "data", {"train": "abc", "test": "abc"})
    run = tmp_path / "run"
    args = ["train", "--method", "npid", "--data", str(data), "--out", str(run), "--nce-k", "0", *TINY]
    assert main(args) == 0
    px = np.asarray(Image.open(data / "train" / "b" / "1.png")).copy()
    px[4, 4] = 255 - px[4, 4]
    Image.fromarray(px).save(data / "train" / "b" / "1.png")  # same count, same names: other pixels
    capsys.readouterr()
    assert main([*args, "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "the training set changed" in err and f"1 of its {3 * PER_CLASS} images differ" in err
    assert f"image {PER_CLASS + 1}" in err and "Traceback" not in err
    assert epochs_done(run) == 1


def test_streamed_fingerprint_names_the_changed_file(tmp_path, cache):
    data = make_tree(tmp_path / "data", {"train": "ab"})
    before = open_source(str(data), "train", in_memory=False)
    saved = data_fingerprint(before)
    assert difference(saved, data_fingerprint(before), before) is None
    with open(data / "train" / "a" / "2.png", "ab") as f:
        f.write(b"\0" * 7)  # another size
    after = open_source(str(data), "train", in_memory=False)
    why = difference(saved, data_fingerprint(after), after)
    assert why.startswith("1 of its 8 images differ") and "a/2.png" in why


def test_resume_with_fewer_epochs_is_an_error_not_a_rewrite(tmp_path, cache, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "npid", "--data", "synthetic:16", "--out", str(run), "--nce-k", "0", *TINY]
    assert main([*args[:-len(TINY)], *TINY[2:], "--epochs", "2"]) == 0
    config, metrics = (run / "config.json").read_text(), (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2  # TINY says --epochs 1
    err = capsys.readouterr().err
    assert "--resume --epochs 1" in err and "past 1" in err
    assert (run / "config.json").read_text() == config and (run / "metrics.jsonl").read_text() == metrics
    assert epochs_done(run) == 2
