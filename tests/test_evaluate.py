"""Evaluation protocols: kNN sweep (torch and faiss), linear probe, low-shot, per-stage, and the
commands that run them on a run directory or exported features."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from instdisc import evaluate as E
from instdisc.cli import main
from instdisc.errors import UserError
from instdisc.evaluate import knn_eval
from instdisc.knn import knn_accuracy, weighted_knn
from instdisc.visual import (
    AGREE,
    DISAGREE,
    QUERY,
    embed_2d,
    neighbour_grid,
    scatter_map,
    svg_line_chart,
)

needs_faiss = pytest.mark.skipif(not E.faiss_available(), reason="faiss-cpu is not installed (pip install faiss-cpu)")


def blobs(n_per, n_cls, dim, *, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cls, dim, generator=g) * sep
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), dim, generator=g), y


# ---------------------------------------------------------------------------------------------
# kNN sweep


def test_sweep_is_one_search_and_equals_single_runs(monkeypatch):
    bank, by = blobs(40, 5, 16, sep=0.7, seed=1)
    query, qy = blobs(10, 5, 16, sep=0.7, seed=2)
    calls = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk",
                        lambda self, *a, **k: calls.append(tuple(self.shape)) or real_topk(self, *a, **k))
    rows = E.knn_table(bank, by, query, qy, ks=(10, 20, 100, 200), ts=(0.07, 0.5), backend="torch")
    # One top-k over the (Q, N) similarities serves all 8 (k, t) pairs (the rest rank class scores).
    assert [c for c in calls if c[-1] == len(bank)] == [(len(query), len(bank))]
    monkeypatch.undo()
    assert [(r["k"], r["t"]) for r in rows] == [(k, t) for t in (0.07, 0.5) for k in (10, 20, 100, 200)]
    for r in rows:
        assert r["top1"] == pytest.approx(knn_accuracy(query, qy, bank, by, k=r["k"], t=r["t"])["top1"])


@needs_faiss
@pytest.mark.parametrize("chunk", [None, 37])
def test_faiss_backend_gives_identical_predictions(chunk):
    bank, by = blobs(300, 10, 32, sep=0.5, seed=3)
    query, _ = blobs(40, 10, 32, sep=0.5, seed=4)
    ks, ts = (1, 10, 50, 200), (0.07, 0.3)
    a = E.knn_scores(query, bank, by, ks=ks, ts=ts, num_classes=10, backend="torch")
    b = E.knn_scores(query, bank, by, ks=ks, ts=ts, num_classes=10, backend="faiss", chunk_size=chunk)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].argmax(1), b[key].argmax(1)), key
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


@needs_faiss
def test_auto_backend_switches_to_faiss_for_large_banks(monkeypatch):
    import faiss

    bank, by = blobs(50, 4, 8, seed=5)
    used = []
    real = faiss.IndexFlatIP
    monkeypatch.setattr(faiss, "IndexFlatIP", lambda d: used.append(d) or real(d))
    E.knn_scores(bank[:5], bank, by, ks=(5,), backend="auto")
    assert not used  # 200 rows: torch
    monkeypatch.setattr(knn_eval, "FAISS_MIN_ROWS", 100)  # read where resolve_backend lives
    E.knn_scores(bank[:5], bank, by, ks=(5,), backend="auto")
    assert used == [8]
    assert E.resolve_backend("auto", 99) == "torch" and E.resolve_backend("auto", 100) == "faiss"


def test_faiss_request_without_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(knn_eval, "faiss_available", lambda: False)  # looked up by resolve_backend
    with pytest.raises(UserError, match="pip install"):
        E.resolve_backend("faiss", 10)
    assert E.resolve_backend("auto", 10**9) == "torch"


def test_nearest_matches_brute_force():
    bank, _ = blobs(30, 3, 6, seed=6)
    query, _ = blobs(4, 3, 6, seed=7)
    sims, idx = E.nearest(query, bank, 5, chunk_size=3)
    full = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).t()
    ref = full.sort(1, descending=True)
    assert torch.equal(idx, ref.indices[:, :5]) and torch.allclose(sims, ref.values[:, :5])


# ---------------------------------------------------------------------------------------------
# Linear probe


def slow_sgd_linear(x, y, c, lr, *, epochs, batch_size, momentum, wd, seed):
    """nn.Linear + torch.optim.SGD + autograd, the same batches and per-step cosine lr."""
    lin = torch.nn.Linear(x.shape[1], c)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    steps = epochs * -(-len(x) // batch_size)
    g = torch.Generator().manual_seed(seed)
    s = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * s / steps))
            opt.zero_grad()
            F.cross_entropy(lin(x[idx]), y[idx]).backward()
            opt.step()
            s += 1
    return lin.weight.detach(), lin.bias.detach()


def test_batched_lr_training_equals_torch_sgd_per_lr():
    x, y = blobs(13, 3, 5, sep=1.0, seed=8)  # 39 rows: the last batch of 16 is short
    lrs = (0.05, 0.5)
    w, b = E.train_linear(x, y, 3, lrs=lrs, epochs=3, batch_size=16, momentum=0.9, weight_decay=1e-3, seed=4)
    assert w.shape == (2, 3, 5) and b.shape == (2, 3)
    for i, lr in enumerate(lrs):
        rw, rb = slow_sgd_linear(x, y, 3, lr, epochs=3, batch_size=16, momentum=0.9, wd=1e-3, seed=4)
        assert torch.allclose(w[i], rw, atol=1e-5) and torch.allclose(b[i], rb, atol=1e-5)


def test_linear_probe_separates_clusters_and_is_deterministic():
    tx, ty = blobs(60, 4, 20, sep=1.5, seed=9)
    qx, qy = blobs(20, 4, 20, sep=1.5, seed=9)  # same centres (same seed), fresh noise below
    qx = qx + torch.randn(qx.shape, generator=torch.Generator().manual_seed(10))
    a = E.linear_probe(tx, ty, qx, qy, epochs=20)
    assert a["top1"] > 90 and a["top5"] == 100.0
    assert set(a["val_top1"]) == {"0.001", "0.01", "0.1", "1.0"} and str(a["lr"]) in a["val_top1"]
    b = E.linear_probe(tx, ty, qx, qy, epochs=20)
    assert a["top1"] == b["top1"] and a["lr"] == b["lr"]
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))]
    c = E.linear_probe(tx, shuffled, qx, qy, epochs=20, lrs=[0.1])
    assert c["top1"] < 60 and c["val_top1"] == {}


@pytest.mark.parametrize("norm", ["bn", "l2", "none"])
def test_feature_norm_uses_training_statistics_only(norm):
    tx = torch.randn(50, 4) * 3 + 7
    fn = E.FeatureNorm.fit(norm, tx)
    q = torch.randn(5, 4)
    out = fn(q)
    if norm == "bn":
        assert torch.allclose(out, (q - tx.mean(0)) / tx.std(0, unbiased=False))
    elif norm == "l2":
        assert torch.allclose(out.norm(dim=1), torch.full((5,), 2.0))
    else:
        assert torch.equal(out, q)


def test_linear_probe_rejects_bad_settings():
    x, y = blobs(5, 2, 3)
    with pytest.raises(UserError):
        E.linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(UserError):
        E.linear_probe(x, y, x, y, lrs=[-1.0])


# ---------------------------------------------------------------------------------------------
# Low-shot


def test_sample_per_class_draws_k_distinct_per_class():
    labels = np.repeat(np.arange(4), [5, 9, 7, 12])
    idx = E.sample_per_class(labels, 3, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 12 and np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    again = E.sample_per_class(labels, 3, np.random.default_rng(0))
    assert np.array_equal(idx, again)


def test_low_shot_rows_match_a_direct_fit():
    from sklearn.svm import LinearSVC

    tx, ty = blobs(30, 3, 10, sep=1.0, seed=11)
    qx, qy = blobs(10, 3, 10, sep=1.0, seed=11)
    qx = qx + 0.5 * torch.randn(qx.shape, generator=torch.Generator().manual_seed(12))
    rows = E.low_shot(tx, ty, qx, qy, shots=(1, 4, 31), draws=3, seed=5)
    assert [r["k"] for r in rows] == [1, 4, 31] and "skipped" in rows[2]
    r4 = rows[1]
    assert len(r4["runs"]) == 3 and r4["mean"] == pytest.approx(np.mean(r4["runs"]))
    assert r4["std"] == pytest.approx(np.std(r4["runs"])) and r4["n_train"] == 12
    # Draw 1 of k = 4, redone by hand.
    idx = E.sample_per_class(ty.numpy(), 4, np.random.default_rng([5, 4, 1]))
    xs = F.normalize(tx[idx], dim=1) * np.sqrt(10)
    clf = LinearSVC(C=1.0, max_iter=5000).fit(xs.numpy(), ty.numpy()[idx])
    acc = 100.0 * float((clf.predict((F.normalize(qx, dim=1) * np.sqrt(10)).numpy()) == qy.numpy()).mean())
    assert r4["runs"][1] == pytest.approx(acc)
    assert rows[1]["mean"] > 80  # separable clusters
    logreg = E.low_shot(tx, ty, qx, qy, shots=(4,), draws=2, classifier="logreg")
    assert 0 <= logreg[0]["mean"] <= 100


# ---------------------------------------------------------------------------------------------
# Pictures


def test_neighbour_grid_frames_agree_green_and_disagree_red():
    img = lambda v: np.full((8, 8, 3), v, np.uint8)  # noqa: E731
    grid = neighbour_grid([img(10), img(20)], [[img(30), img(40)], [img(50), img(60)]],
                         [[True, False], [False, True]], cell=20, border=2, gap=4)
    a = np.asarray(grid)
    assert a.shape == (4 + 2 * 24, 4 + 24 * 3 + 4, 3)
    x_of = lambda j: 4 + 24 * j + (4 if j else 0)  # noqa: E731
    assert tuple(a[4, x_of(0)]) == QUERY
    assert tuple(a[4, x_of(1)]) == AGREE and tuple(a[4, x_of(2)]) == DISAGREE
    assert tuple(a[28, x_of(1)]) == DISAGREE and tuple(a[28, x_of(2)]) == AGREE
    assert tuple(a[4 + 10, x_of(1) + 10]) == (30, 30, 30)  # the image inside the frame


def test_embed_2d_pca_matches_sklearn_and_scatter_draws_every_class():
    from sklearn.decomposition import PCA

    x, y = blobs(20, 3, 6, seed=13)
    ours = embed_2d(x, "pca")
    ref = PCA(n_components=2).fit_transform(x.numpy().astype(np.float64))
    for j in range(2):
        assert np.allclose(np.abs(ours[:, j]), np.abs(ref[:, j]), atol=1e-6)
    img = np.asarray(scatter_map(ours, y.numpy(), ["a", "b", "c"], size=200))
    from instdisc.visual import class_colours

    for c in class_colours(3):
        assert (img == np.array(c, np.uint8)).all(-1).any()


def test_svg_chart_is_valid_xml_with_one_line_per_series():
    import xml.etree.ElementTree as ET

    svg = svg_line_chart({"a": ([0, 1, 2], [1.0, float("nan"), 3.0]), "b": ([0, 1], [2, 2])}, title="t <x>")
    root = ET.fromstring(svg)
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and lines[0].get("points").count(",") == 2  # the NaN point is dropped
    empty = ET.fromstring(svg_line_chart({}, title="nothing"))
    assert "no data" in ET.tostring(empty, encoding="unicode")


# ---------------------------------------------------------------------------------------------
# From a run / files, through the command line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    out = root / "run"
    assert main(["train", "--method", "npid", "--data", "synthetic:120", "--out", str(out), "--width", "8",
                 "--batch-size", "40", "--nce-k", "16", "--knn-k", "10", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--milestones", "100"]) == 0
    return out


def test_commands_on_a_run_write_results_and_reuse_features(run, capsys, monkeypatch):
    assert main(["knn", str(run), "-k", "5", "20", "-t", "0.07", "0.5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads((run / "eval" / "knn.json").read_text())
    assert len(res["rows"]) == 4 and float(out[-1]) == pytest.approx(
        next(r["top1"] for r in res["rows"] if r["k"] == 20 and r["t"] == 0.5), abs=0.006)
    cached = [p for p in (run / "eval" / "features").glob("*-embedding-*.npy") if not p.name.endswith(".labels.npy")]
    assert len(cached) == 2

    # A second command reads the cached features instead of embedding again.
    import instdisc.features as feats

    monkeypatch.setattr(feats, "extract_features", lambda *a, **k: pytest.fail("re-embedded"))
    assert main(["knn", str(run), "-k", "5"]) == 0
    monkeypatch.undo()

    assert main(["linear", str(run), "--epochs", "3", "--lr", "0.1"]) == 0
    lin = json.loads((run / "eval" / "linear.json").read_text())
    assert lin["features"] == "backbone" and 0 <= lin["top1"] <= 100 and lin["epochs"] == 3
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(lin["top1"], abs=0.01)

    assert main(["lowshot", str(run), "--shots", "1", "2", "--draws", "2"]) == 0
    low = json.loads((run / "eval" / "lowshot.json").read_text())
    assert [r["k"] for r in low["rows"]] == [1, 2] and all(len(r["runs"]) == 2 for r in low["rows"])

    assert main(["stages", str(run), "--epochs", "2", "--lr", "0.1", "--knn-k", "5"]) == 0
    st = json.loads((run / "eval" / "stages.json").read_text())
    assert [r["dim"] for r in st["rows"]] == [8, 16, 32, 64]

    png = run.parent / "nb.png"
    assert main(["neighbours", str(run), "--ids", "0", "3", "-k", "5", "--out", str(png)]) == 0
    assert Image.open(png).size[1] > Image.open(png).size[0] / 5  # two rows of six cells
    assert main(["map", str(run), "--out", str(run.parent / "map.png")]) == 0
    assert Image.open(run.parent / "map.png").mode == "RGB"


def test_files_and_run_give_the_same_knn(run, tmp_path, capsys):
    for split in ("train", "test"):
        assert main(["embed", str(run), "--split", split, "--out", str(tmp_path / f"{split}.npy")]) == 0
    capsys.readouterr()
    assert main(["knn", "--train", str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy"), "-k", "7"]) == 0
    a = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["knn", str(run), "-k", "7", "--no-cache"]) == 0
    assert a == pytest.approx(float(capsys.readouterr().out.strip().splitlines()[-1]))
    with pytest.raises(UserError, match="needs a run directory"):
        E.features_for(train=str(tmp_path / "train.npy"), test=str(tmp_path / "test.npy"), kind="stages")


def test_newer_weights_replace_their_cached_features(run):
    import os

    cache = run / "eval" / "features"
    E.features_for(str(run), device="cpu")
    before = {p.name for p in cache.glob("*-embedding-*.meta.json")}
    ck = run / "checkpoints" / "last.pt"
    st = ck.stat()
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as if training wrote a newer checkpoint
    E.features_for(str(run), device="cpu")
    after = {p.name for p in cache.glob("*-embedding-*.meta.json")}
    assert len(before) == len(after) == 2 and not before & after
    assert len(list(cache.glob("*-embedding-*"))) == 6  # .npy, .labels.npy, .meta.json per split


def test_stage_features_split_back_into_the_backbone_stages(run):
    ev = E.features_for(str(run), kind="stages", device="cpu")
    parts = E.split_stages(ev.train_x, ev.stage_dims)
    bb = E.features_for(str(run), kind="backbone", device="cpu")
    assert torch.allclose(parts[-1], bb.train_x, atol=1e-5)  # the last stage is the pooled output


def test_augmented_linear_probe_trains_a_head(run):
    subject = E.load_subject(run, device="cpu")
    tr = E.open_images(subject, None, "train")
    te = E.open_images(subject, None, "test")
    res = E.linear_probe_augmented(subject, tr, te, epochs=1, batch_size=40, lr=0.1)
    assert 0 <= res["top1"] <= 100 and res["augmentation"].startswith("RandomResizedCrop")


def test_user_errors_are_one_paragraph(run, tmp_path, capsys):
    assert main(["linear"]) == 2
    assert "--train and --test" in capsys.readouterr().err
    np.save(tmp_path / "a.npy", np.zeros((4, 3), np.float32))
    assert main(["knn", "--train", str(tmp_path / "a.npy"), "--test", str(tmp_path / "a.npy")]) == 2
    assert "labels.npy" in capsys.readouterr().err
    assert main(["neighbors", str(run), "--ids", "100000", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "outside the test set" in err and "Traceback" not in err


def test_weighted_knn_reference_still_agrees_with_sweep_rows():
    bank, by = blobs(25, 4, 8, sep=0.8, seed=14)
    query, qy = blobs(5, 4, 8, sep=0.8, seed=15)
    rows = E.knn_table(bank, by, query, qy, ks=(7,), ts=(0.1,))
    ref = weighted_knn(query, bank, by, k=7, t=0.1, num_classes=4)
    assert rows[0]["top1"] == pytest.approx(100.0 * float((ref.argmax(1) == qy).float().mean()))


def test_linear_probe_and_low_shot_show_their_progress(capsys):
    """Long on large feature sets (minutes at ImageNet size): each shows a progress line that ends
    at 100%, and the numbers do not depend on it."""
    from instdisc.evaluate import linear_probe, low_shot

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    quiet = linear_probe(x, y, x, y, num_classes=3, epochs=3)
    shown = linear_probe(x, y, x, y, num_classes=3, epochs=3, progress=True)
    assert "linear probe 100.0% 6/6" in capsys.readouterr().err  # 3 epochs of grid search + 3 of the final fit
    assert {k: v for k, v in shown.items() if k != "time_s"} == {k: v for k, v in quiet.items() if k != "time_s"}
    rows = low_shot(x, y, x, y, shots=[1, 2, 100], draws=2, progress=True)
    assert "low-shot 100.0% 4/4" in capsys.readouterr().err  # k = 100 is skipped: 2 shots x 2 draws
    assert [r["k"] for r in rows if "mean" in r] == [1, 2]
