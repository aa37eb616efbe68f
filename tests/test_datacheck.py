"""Tests of `instdisc data check` (instdisc.datacheck.check_source)."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instdisc.datacheck import CheckReport, check_source
from instdisc.errors import DataError
from instdisc.sources import open_source


def rand_img(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rand_img(seed, size, size)).save(buf, format="JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def clean_tree(root: Path) -> Path:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                write(root / split / cls / f"{i}.png", png(rand_img(hash((split, cls, i)) % 1000)))
    return root


def test_clean_folder_is_ok(tmp_path):
    r = check_source(str(clean_tree(tmp_path / "ds")), progress=False)
    assert isinstance(r, CheckReport) and r.ok()
    assert (r.total, r.counts, r.bad, r.odd_modes) == (10, {"train": 6, "test": 4}, [], [])
    assert r.kind == "imagefolder"
    text = r.format()
    assert "10 images" in text and "OK: every image decodes." in text


def test_bad_files_reported_with_reasons(tmp_path):
    root = clean_tree(tmp_path / "ds")
    trunc = write(root / "train" / "a" / "trunc.jpg", jpeg(1, 64)[:700])
    empty = write(root / "test" / "b" / "empty.png", b"")
    junk = write(root / "train" / "b" / "junk.png", b"definitely not a png")
    r = check_source(str(root), progress=False)
    assert not r.ok()
    reasons = dict(r.bad)
    assert reasons[str(trunc)] == "truncated"
    assert reasons[str(empty)] == "empty"
    assert reasons[str(junk)].startswith("unreadable")
    assert [p for p, _ in r.bad] == [str(trunc), str(junk), str(empty)]  # split, then index order
    text = r.format()
    assert all(str(p) in text for p in (trunc, empty, junk)) and "NOT OK" in text
    # open_source agrees on what is bad
    with pytest.raises(DataError) as e:
        open_source(str(root), "train", cache_dir=tmp_path / "cache")
    assert str(trunc) in str(e.value) and str(junk) in str(e.value)
    with pytest.raises(DataError, match="empty.png"):
        open_source(str(root), "test", cache_dir=tmp_path / "cache")


def test_odd_modes_reported(tmp_path):
    root = tmp_path / "m"
    write(root / "c" / "1_grey.png", png(np.zeros((8, 8), np.uint8), "L"))
    write(root / "c" / "2_rgba.png", png(np.zeros((8, 8, 4), np.uint8), "RGBA"))
    pal = io.BytesIO()
    Image.fromarray(rand_img(3)).convert("P", palette=Image.ADAPTIVE, colors=4).save(pal, format="PNG")
    write(root / "c" / "3_pal.png", pal.getvalue())
    write(root / "c" / "4_16bit.png", png(np.full((8, 8), 40000, np.uint16)))
    write(root / "c" / "5_rgb.png", png(rand_img(4)))
    r = check_source(str(root), progress=False)
    assert r.ok() and r.total == 5
    modes = {Path(p).name: m for p, m in r.odd_modes}
    assert modes["1_grey.png"] == "L" and modes["2_rgba.png"] == "RGBA" and modes["3_pal.png"] == "P"
    assert modes["4_16bit.png"].startswith("I")
    assert "5_rgb.png" not in modes
    assert "converted to RGB" in r.format()
    s = open_source(str(root), cache_dir=tmp_path / "cache")
    assert s.images.shape == (5, 8, 8, 3)


def test_archive_members_reported(tmp_path):
    root = clean_tree(tmp_path / "ds")
    write(root / "train" / "a" / "trunc.jpg", jpeg(2, 64)[:500])
    arch = tmp_path / "ds.tar.gz"
    with tarfile.open(arch, "w:gz") as tf:
        tf.add(root, arcname="top")
    r = check_source(str(arch), progress=False)
    assert r.bad == [(f"{arch}:top/train/a/trunc.jpg", "truncated")]
    assert r.counts == {"train": 7, "test": 4}


def test_pic_layout_missing_member(tmp_path):
    root = tmp_path / "pic"
    with zipfile.ZipFile(write(root / "train.zip", b""), "w") as zf:
        zf.writestr("n0/a.png", png(rand_img(1)))
        zf.writestr("n1/b.png", b"broken")
    (root / "train_map.txt").write_text("n0/a.png\t0\nn1/b.png\t1\nn1/ghost.png\t1\n")
    r = check_source(str(root), progress=False)
    assert r.counts == {"train": 3} and r.kind == "pic-zip"
    reasons = {p.rsplit(":", 1)[1]: why for p, why in r.bad}
    assert reasons["n1/ghost.png"] == "missing from the archive"
    assert reasons["n1/b.png"].startswith("unreadable")


def test_builtins_report_counts(tmp_path):
    r = check_source("digits", progress=False)
    assert r.ok() and r.counts == {"train": 1437, "test": 360} and r.total == 1797
    r = check_source("synthetic:40", progress=False)
    assert r.ok() and r.total == 50
    with pytest.raises(DataError, match="cifar10"):
        check_source("cifar10", progress=False, cache_dir=tmp_path)


def test_cifar_batches_report_counts(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        d = {b"data": np.zeros((n, 3072), np.uint8), b"labels": [1] * n}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2))
    r = check_source(str(tmp_path), progress=False)
    assert r.ok() and r.counts == {"train": 10, "test": 3}
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        check_source(str(tmp_path), progress=False)


def test_structural_errors_raise(tmp_path):
    with pytest.raises(DataError, match="not found"):
        check_source(str(tmp_path / "missing"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        check_source(str(tmp_path / "empty"), progress=False)
    fake = write(tmp_path / "fake.tar.gz", b"nope" * 100)
    with pytest.raises(DataError, match="fake.tar.gz"):
        check_source(str(fake), progress=False)
    root = clean_tree(tmp_path / "ds")
    (root / "train" / "c_empty").mkdir()
    with pytest.raises(DataError, match="c_empty"):
        check_source(str(root), progress=False)
