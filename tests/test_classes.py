"""One class mapping: the training split's class names define the label ids of every evaluation split.

The trees below hold one solid colour per class and test images identical to training images, so
1-NN is right on every test image whatever the network: 100% is the only correct score. Numbering
a test split that lacks a class (or has one more) from its own folders scored 0.00% here.
"""

import json

import numpy as np
import pytest
from PIL import Image

from instdisc.cli import main
from instdisc.errors import DataError
from instdisc.sources import ArrayImageSet, align_classes, open_source

COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220), "d": (220, 220, 30)}
PER_CLASS = 4


def make_tree(root, splits, colours=None):
    """splits: {"train": "abc", "test": "bc"} -> root/<split>/<class>/<i>.png, one colour per class
    (`colours` may give a class another class's colour)."""
    colours = {**COLOURS, **(colours or {})}
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(PER_CLASS):
                px = np.full((8, 8, 3), colours[c], dtype=np.uint8)
                px[0, 0] = i  # files differ, classes stay far apart
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def train_run(run, data, *extra):
    return main(["train", "--method", "npid", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--batch-size", "4", "--width", "4", "--nce-k", "0", "--knn-k", "1", "--aug-size", "8",
                 "--no-progress", "--device", "cpu", *extra])


def last_number(capsys):
    return float(capsys.readouterr().out.strip().splitlines()[-1])


def test_align_classes_maps_by_name_refuses_unknown_and_drops_on_request(capsys):
    imgs = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    test = ArrayImageSet(imgs, np.array([0, 1, 1, 0]), ["b", "c"], name="t", split="test")
    got = align_classes(test, ["a", "b", "c"])
    assert got.classes == ["a", "b", "c"] and got.labels.tolist() == [1, 2, 2, 1]

    extra = ArrayImageSet(imgs, np.array([0, 1, 2, 3]), ["a", "b", "c", "d"], name="t", split="test")
    with pytest.raises(DataError, match="'d'") as e:
        align_classes(extra, ["a", "b", "c"])
    assert "--drop-unknown-classes" in str(e.value)
    kept = align_classes(extra, ["a", "b", "c"], drop_unknown=True)
    assert len(kept) == 3 and kept.labels.tolist() == [0, 1, 2] and kept.meta["dropped_unknown"] == 1
    assert "left out 1 of 4 images" in capsys.readouterr().err
    with pytest.raises(DataError, match="left no image"):
        align_classes(ArrayImageSet(imgs[:1], np.array([0]), ["d"], split="test"), ["a"], drop_unknown=True)


def test_streamed_test_split_is_renumbered_and_subset(tmp_path, cache):
    root = make_tree(tmp_path / "tree", {"train": "abc", "test": "abd"})
    train = open_source(str(root), "train", in_memory=False)
    test = open_source(str(root), "test", in_memory=False)
    kept = align_classes(test, train.classes, drop_unknown=True)
    assert len(kept) == 2 * PER_CLASS and set(kept.labels.tolist()) == {0, 1}
    np.testing.assert_array_equal(kept.read(0), test.read(0))
    assert kept.path(PER_CLASS).endswith("/b/0.png")


def test_test_split_missing_a_class_scores_what_it_should(tmp_path, cache, capsys):
    root = make_tree(tmp_path / "tree", {"train": "abc", "test": "bc"})
    run = tmp_path / "run"
    assert train_run(run, root) == 0
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in recs if r["type"] == "final")
    assert final["knn_top1"] == pytest.approx(100.0)  # the training loop's final kNN

    capsys.readouterr()
    assert main(["knn", str(run), "-k", "1"]) == 0
    assert last_number(capsys) == pytest.approx(100.0)

    for split in ("train", "test"):
        assert main(["embed", str(run), "--split", split, "--out", str(tmp_path / f"{split}.npy")]) == 0
    meta = json.loads((tmp_path / "test.meta.json").read_text())
    assert meta["classes"] == ["a", "b", "c"]
    assert set(np.load(tmp_path / "test.labels.npy").tolist()) == {1, 2}
    capsys.readouterr()
    assert main(["knn", "--train", str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy"), "-k", "1"]) == 0
    assert last_number(capsys) == pytest.approx(100.0)


def test_extra_test_class_is_an_error_unless_dropped(tmp_path, cache, capsys):
    good = make_tree(tmp_path / "good", {"train": "abc", "test": "abc"})
    extra = make_tree(tmp_path / "extra", {"train": "abc", "test": "abcd"})
    run = tmp_path / "run"
    assert train_run(run, good) == 0
    capsys.readouterr()

    assert main(["knn", str(run), "--data", str(extra), "-k", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instdisc: error:") and "'d'" in err and "Traceback" not in err

    assert main(["knn", str(run), "--data", str(extra), "-k", "1", "--drop-unknown-classes"]) == 0
    out = capsys.readouterr()
    assert f"left out {PER_CLASS} of {4 * PER_CLASS} images" in out.err
    assert float(out.out.strip().splitlines()[-1]) == pytest.approx(100.0)

    # training itself refuses such a test split, or drops it when asked
    assert train_run(tmp_path / "r2", extra) == 2
    assert "'d'" in capsys.readouterr().err
    assert train_run(tmp_path / "r3", extra, "--drop-unknown-classes") == 0
    assert f"left out {PER_CLASS}" in capsys.readouterr().err


def test_feature_files_with_different_class_lists_are_refused(tmp_path, cache, capsys):
    x = np.eye(4, dtype=np.float32)
    for name, classes in (("tr", ["a", "b", "c"]), ("te", ["b", "c"])):
        np.save(tmp_path / f"{name}.npy", x)
        np.save(tmp_path / f"{name}.labels.npy", np.array([0, 1, 1, 0]))
        (tmp_path / f"{name}.meta.json").write_text(json.dumps({"classes": classes}))
    for cmd in (["knn", "-k", "1"], ["linear", "--epochs", "1"], ["lowshot", "--shots", "1"]):
        argv = [cmd[0], "--train", str(tmp_path / "tr.npy"), "--test", str(tmp_path / "te.npy"), *cmd[1:]]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "different class lists" in err and "only in --train: 'a'" in err
