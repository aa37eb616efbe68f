"""`instdisc search`: the nearest index images of each query, as an HTML page and a CSV, against a
brute-force reference; unlabelled folders; the index's feature cache."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import instdisc
from instdisc.cli import main
from instdisc.evaluate import knn_eval

needs_faiss = pytest.mark.skipif(not knn_eval.faiss_available(), reason="faiss-cpu is not installed")

TINY = ["--data", "digits", "--image-size", "16", "--aug-size", "16", "--width", "4", "--batch-size", "64",
        "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--schedule", "cosine", "--no-progress", "--device", "cpu"]


def _images(n: int, seed: int, side: int = 16) -> list[np.ndarray]:
    """n distinct images: smooth blobs of random colour and place (no two alike, no ties)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        cy, cx, r = g.random(3) * [1, 1, 0.4] + [0, 0, 0.1]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None]  # (S, S, 1)
        img = blob * g.random(3) + (1 - blob) * g.random(3) + 0.05 * g.standard_normal((side, side, 3))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def _write(folder: Path, images: list[np.ndarray], prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{prefix}{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    run = d / "run"
    assert main(["train", "--method", "npid", "--nce-k", "0", "--out", str(run), *TINY]) == 0
    index = _write(d / "index", _images(30, seed=1))  # unlabelled: images only, no class folders
    queries = _write(d / "queries", _images(4, seed=2), prefix="q")
    return {"d": d, "run": run, "index": index, "queries": queries}


def _search(world, tmp_path, *extra: str) -> tuple[list[dict[str, str]], str]:
    out = tmp_path / "out"
    assert main(["search", str(world["run"]), "--device", "cpu", "--out", str(out), *extra]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, (out / "index.html").read_text()


def test_an_index_image_finds_itself_first(world, tmp_path):
    target = world["index"] / "img07.png"
    rows, _ = _search(world, tmp_path, "--query", str(target), "--index", str(world["index"]), "-k", "5")
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["file"] == "img07.png" and rows[0]["index"] == "7" and rows[0]["query"] == str(target)
    assert float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert float(rows[1]["similarity"]) < 1.0 - 1e-4  # the other images are not it
    sims = [float(r["similarity"]) for r in rows]
    assert sims == sorted(sims, reverse=True)


def test_results_agree_with_a_brute_force_reference(world, tmp_path):
    k = 6
    rows, _ = _search(world, tmp_path, "--query", str(world["queries"]), "--index", str(world["index"]), "-k", str(k))
    enc = instdisc.load(world["run"], device="cpu")
    bank = instdisc.embed(enc, str(world["index"]), split="train")
    q = instdisc.embed(enc, str(world["queries"]), split="train")
    assert bank.labels is None and q.labels is None  # both unlabelled folders
    # slow reference: every cosine similarity, one full sort per query
    for qi in range(len(q.paths)):
        sims = [float(torch.dot(q.features[qi], bank.features[j]) / (q.features[qi].norm() * bank.features[j].norm()))
                for j in range(len(bank.paths))]
        order = np.argsort(-np.asarray(sims), kind="stable")[:k]
        mine = [r for r in rows if r["query"] == q.paths[qi]]
        assert [int(r["index"]) for r in mine] == order.tolist()
        assert [r["file"] for r in mine] == [bank.paths[j] for j in order]
        assert [float(r["similarity"]) for r in mine] == pytest.approx([sims[j] for j in order], abs=1e-5)
    assert len(rows) == len(q.paths) * k


def test_the_page_and_the_csv_hold_k_retrievals_per_query(world, tmp_path):
    k = 4
    rows, page = _search(world, tmp_path, "--query", str(world["queries"]), "--index", str(world["index"]), "-k", str(k))
    assert list(rows[0]) == ["query", "rank", "index", "file", "similarity"] and len(rows) == 4 * k
    assert page.count('<div class="q">') == 4 and page.count("<figure") == 4 * (k + 1)
    # each retrieval: its file name and its similarity with three decimals, as in the CSV
    for r in rows:
        assert f"{r['rank']}. {r['file']}" in page and f"{float(r['similarity']):.3f}" in page
    # offline: every picture is a file beside the page, nothing is fetched from elsewhere
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 4 * (k + 1) and "http" not in page
    for s in srcs:
        assert (tmp_path / "out" / s).is_file() and Image.open(tmp_path / "out" / s).size == (96, 96)
    # a smaller search into the same folder leaves only its own thumbnails
    rows, page = _search(world, tmp_path, "--query", str(world["queries"] / "q00.png"), "--index",
                         str(world["index"]), "-k", "2")
    shown = {Path(s).name for s in re.findall(r'<img src="([^"]+)"', page)}
    assert len(rows) == 2 and shown == {p.name for p in (tmp_path / "out" / "thumbs").iterdir()} and len(shown) == 3


def test_default_index_is_the_runs_training_data_and_a_labelled_query_folder_works(world, tmp_path):
    from instdisc.sources import open_source

    train = open_source("digits", "train", image_size=16, progress=False)
    qdir = world["d"] / "labelled"
    for i in (3, 500):  # class folders, as an ImageFolder
        _write(qdir / str(int(train.labels[i])), [train.read(i)], prefix=f"from{i}_")
    rows, page = _search(world, tmp_path, "--query", str(qdir), "-k", "3")
    firsts = [r for r in rows if r["rank"] == "1"]
    assert len(firsts) == 2 and len(rows) == 6
    for r in firsts:  # a training image itself (or an identical duplicate) comes first
        assert float(r["similarity"]) == pytest.approx(1.0, abs=1e-5)
        assert np.array_equal(train.read(int(r["index"])), train.read(int(r["query"].split("from")[1].split("_")[0])))
    assert rows[0]["file"] == ""  # digits come from arrays: no file names, the index row says which
    assert " · " in page  # the index is labelled: each retrieval shows its class


def test_a_second_search_reuses_the_index_features(world, tmp_path, monkeypatch):
    import instdisc.features as features

    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda fn, images, **kw: calls.append(len(images)) or
                        real(fn, images, **kw))
    index = _write(world["d"] / "index2", _images(12, seed=5))
    args = ["--query", str(world["queries"]), "--index", str(index), "-k", "3"]
    first, _ = _search(world, tmp_path, *args)
    assert calls == [12, 4]  # the index, then the queries
    cached = sorted((world["run"] / "eval" / "features").glob("train-embedding-*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    second, _ = _search(world, tmp_path, *args)
    assert calls == [12, 4, 4] and second == first  # only the queries were embedded again
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # and the cache was not rewritten
    assert main(["search", str(world["run"]), "--device", "cpu", "--out", str(tmp_path / "o2"), *args,
                 "--no-cache"]) == 0
    assert calls[-2:] == [12, 4]


def test_an_index_edited_in_place_is_embedded_again(world, tmp_path):
    """The feature cache is keyed by the images' content, not only by the folder's name and size:
    the same number of images, one of them replaced, must not read the old features."""
    index = _write(world["d"] / "index3", _images(10, seed=7))
    query = world["d"] / "index3_query.png"
    Image.fromarray(_images(1, seed=8)[0]).save(query)
    args = ["--query", str(query), "--index", str(index), "-k", "10"]
    before, _ = _search(world, tmp_path, *args)
    Image.fromarray(_images(1, seed=8)[0]).save(index / "img04.png")  # now the query itself is in the index
    after, _ = _search(world, tmp_path, *args)
    assert after[0]["file"] == "img04.png" and float(after[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert float(before[0]["similarity"]) < 1.0 - 1e-4


def test_one_image_gets_the_features_it_gets_inside_a_folder(world, tmp_path):
    """A query file alone is stored as the sources store it in a folder, small or large, with or
    without the run's --image-size."""
    from instdisc.evaluate import extract, load_subject
    from instdisc.search import open_query

    subject = load_subject(world["run"], device="cpu")
    subject.workers = 0  # the streamed folder is read in this process
    for side in (12, 150):  # decoded as it is / streamed through the evaluation view
        folder = _write(tmp_path / f"f{side}", _images(2, seed=side, side=side))
        for image_size in (subject.image_size, None):
            subject.image_size = image_size
            alone = extract(subject, open_query(subject, str(folder / "img01.png")))
            both = extract(subject, open_query(subject, str(folder)))
            assert torch.allclose(alone[0], both[1], atol=1e-5), (side, image_size)


@needs_faiss
def test_faiss_gives_the_torch_neighbours(world, tmp_path):
    args = ["--query", str(world["queries"]), "--index", str(world["index"]), "-k", "7"]
    torch_rows, _ = _search(world, tmp_path, *args, "--backend", "torch")
    faiss_rows, _ = _search(world, tmp_path, *args, "--backend", "faiss")
    assert [(r["query"], r["index"]) for r in faiss_rows] == [(r["query"], r["index"]) for r in torch_rows]
    assert [float(r["similarity"]) for r in faiss_rows] == pytest.approx(
        [float(r["similarity"]) for r in torch_rows], abs=1e-5)


def test_faiss_asked_for_but_missing_is_one_line(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(knn_eval, "faiss_available", lambda: False)
    rc = main(["search", str(world["run"]), "--query", str(world["queries"]), "--index", str(world["index"]),
               "--backend", "faiss", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--backend faiss needs the faiss-cpu package" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "index.html").exists()


def test_released_weights_search_an_index_given_explicitly(world, tmp_path, capsys):
    from test_published import R18, linear, prefixed, resnet_sd

    weights = tmp_path / "ckpt.t7"
    torch.save({"net": prefixed(linear(resnet_sd(**R18, width=8, cifar=True, shortcut="shortcut"), "linear.", 16, 64),
                                "module.")}, weights)
    base = ["search", str(weights), "--query", str(world["queries"]), "--out", str(tmp_path / "o"), "--device", "cpu"]
    capsys.readouterr()
    assert main(base) == 2  # no training data to default to
    err = capsys.readouterr().err
    assert "--index is needed" in err and "Traceback" not in err
    assert main([*base, "--index", str(world["index"]), "-k", "3"]) == 0
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * 3
