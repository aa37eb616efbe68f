"""SeLa: the Sinkhorn-Knopp solver against a slow float64 reference, its float32 safety and sharding,
the relabelling schedule and hook, label export and reuse, cluster metrics, the AlexNet backbone."""

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo import free_port, init_gloo, leave_gloo
from scipy.special import logsumexp
from torch import nn

from instdisc.checkpoint import run_files_saver
from instdisc.cli import main
from instdisc.cluster import (
    adjusted_rand,
    cluster_grid,
    cluster_metrics,
    contingency,
    hungarian_accuracy,
    nmi,
    purity,
)
from instdisc.methods import resolve_config
from instdisc.methods.base import EpochContext
from instdisc.methods.sela import SeLa, balanced_random_labels, relabel_schedule
from instdisc.models import build_backbone
from instdisc.sinkhorn import sinkhorn_knopp, transport_plan


def random_log_p(n, k, std, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * std, 1).to(dtype)


def reference_plan(log_p, lamb, iters=100_000, tol=1e-13):
    """The entropic OT solution written from the paper, slowly: float64, log domain, alternate exact
    row and column normalisations of log Q = lamb log P + f + g until both marginals hold to tol."""
    a = np.asarray(log_p, dtype=np.float64) * lamb  # (N, K)
    n, k = a.shape
    f, g = np.zeros(n), np.zeros(k)
    for _ in range(iters):
        g = -np.log(k) - logsumexp(a + f[:, None], axis=0)  # columns sum to 1/K
        f = -np.log(n) - logsumexp(a + g[None, :], axis=1)  # rows sum to 1/N
        q = np.exp(a + f[:, None] + g[None, :])
        if np.abs(q.sum(0) * k - 1).max() < tol and np.abs(q.sum(1) * n - 1).max() < tol:
            break
    return q


# --------------------------------------------------------------------------- the solver


@pytest.mark.parametrize("std", [0.5, 2.0])
def test_matches_slow_float64_reference(std):
    log_p = random_log_p(60, 7, std, seed=1)
    q_ref = reference_plan(log_p.numpy(), 25.0)
    for dtype, rtol in [(torch.float64, 1e-6), (torch.float32, 2e-3)]:
        res = sinkhorn_knopp(log_p.to(dtype), 25.0, tol=1e-9 if dtype == torch.float64 else 1e-4, max_iter=20_000)
        assert res.converged
        q = transport_plan(log_p.double(), 25.0, res).numpy()
        np.testing.assert_allclose(q, q_ref, rtol=rtol, atol=rtol / (60 * 7))
        assert res.labels.tolist() == q_ref.argmax(1).tolist()


def test_marginals_within_tolerance_and_labels_balanced():
    n, k, tol = 3000, 12, 0.05
    log_p = random_log_p(n, k, 3.0, seed=2)
    res = sinkhorn_knopp(log_p, 10.0, tol=tol)
    assert res.converged and res.err <= tol
    q = transport_plan(log_p.double(), 10.0, res)
    assert (q.sum(0) * k - 1).abs().max() < 1e-4  # every cluster gets mass 1/K (the last update is on clusters)
    assert (q.sum(1) * n - 1).abs().sum() <= tol  # images: the solver's own stopping criterion
    sizes = torch.bincount(res.labels, minlength=k)
    assert sizes.min() > 0.8 * n / k and sizes.max() < 1.2 * n / k, sizes
    # Without the balance constraint, argmax P would be far from equal sizes here.
    skewed = log_p + torch.linspace(0, 4, k)  # clusters with a larger prior
    res = sinkhorn_knopp(torch.log_softmax(skewed, 1), 10.0, tol=tol)
    assert torch.bincount(torch.log_softmax(skewed, 1).argmax(1), minlength=k).max() > 2 * n / k
    assert torch.bincount(res.labels, minlength=k).max() < 1.2 * n / k


@pytest.mark.parametrize("std", [5.0, 20.0])
def test_float32_never_nan_on_peaked_posteriors_at_lambda_25(std):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 100, generator=g) * std
    logits[:, 0] -= 4 * std  # a cluster the network never favours (common after a few epochs)
    log_p = torch.log_softmax(logits, 1)
    # A float32 solver working on P**lambda directly would divide by zero: the column underflows.
    assert (log_p.exp() ** 25).sum(0)[0] == 0
    res = sinkhorn_knopp(log_p, 25.0, tol=0.1, max_iter=300)
    assert torch.isfinite(res.log_u).all() and torch.isfinite(res.log_v).all() and math.isfinite(res.err)
    assert res.labels.min() >= 0 and res.labels.max() < 100
    q = transport_plan(log_p.double(), 25.0, res)
    assert torch.isfinite(q).all() and (q.sum(0) * 100 - 1).abs().max() < 1e-3


def test_absorption_and_overrelaxation_leave_the_solution_unchanged():
    log_p = random_log_p(500, 20, 4.0, seed=4)
    base = sinkhorn_knopp(log_p, 25.0, tol=1e-3, max_iter=5000)
    plain = sinkhorn_knopp(log_p, 25.0, tol=1e-3, max_iter=20_000, overrelax=False)
    tiny = sinkhorn_knopp(log_p, 25.0, tol=1e-3, max_iter=5000, absorb_at=0.5)  # absorbs almost every step
    q = transport_plan(log_p.double(), 25.0, base)
    for other in (plain, tiny):
        assert other.converged
        torch.testing.assert_close(transport_plan(log_p.double(), 25.0, other), q, rtol=5e-3, atol=1e-7)
        assert (other.labels == base.labels).float().mean() > 0.99
    assert base.iters < plain.iters / 2, (base.iters, plain.iters)  # over-relaxation pays on peaked input


def test_max_iter_cap_and_bad_input():
    log_p = random_log_p(400, 10, 5.0, seed=5)
    res = sinkhorn_knopp(log_p, 25.0, tol=0.0, max_iter=7)
    assert res.iters == 7 and not res.converged
    q = transport_plan(log_p.double(), 25.0, res)
    assert (q.sum(0) * 10 - 1).abs().max() < 1e-4  # still balanced over clusters
    bad = log_p.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_knopp(bad, 25.0)
    with pytest.raises(ValueError):
        sinkhorn_knopp(log_p[0], 25.0)


# --------------------------------------------------------------------------- 2 processes


def _tiny_images(n, seed=0):
    from instdisc.sources import ArrayImageSet

    rng = np.random.default_rng(seed)
    return ArrayImageSet(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), labels=np.arange(n) % 3)


def _tiny_sela(n, **kw):
    cfg = resolve_config({"arch": "resnet18", "width": 4, "hc": 2, "ncl": [5, 3], "lamb": 25.0, **kw}, {}, "sela")
    torch.manual_seed(0)
    net, dim = build_backbone("resnet18", width=4)
    return SeLa(net, dim, n, cfg.method)


def _predict_all(images):
    from instdisc.features import extract_features

    return lambda fn: extract_features(fn, images, size=16, batch_size=16)


def _sharded_worker(rank, world, port, out):
    init_gloo(rank, world, port)
    log_p = random_log_p(101, 6, 2.0, seed=6)  # 101 rows: shards of 51 and 50
    rows = log_p[:51] if rank == 0 else log_p[51:]
    res = sinkhorn_knopp(rows, 25.0, tol=1e-4, max_iter=2000, sharded=True)
    m = _tiny_sela(37)  # 37 images: predict_all pads one rank's shard
    logs = m.on_epoch_start(EpochContext(epoch=0, num_epochs=1, predict_all=_predict_all(_tiny_images(37))))
    torch.save({"res": res, "labels": m.labels.clone(), "logs": logs}, f"{out}/rank{rank}.pt")
    leave_gloo()


@pytest.mark.dist
def test_sharded_solve_equals_single_process(tmp_path):
    mp.spawn(_sharded_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = sinkhorn_knopp(random_log_p(101, 6, 2.0, seed=6), 25.0, tol=1e-4, max_iter=2000)
    torch.testing.assert_close(r0["res"].log_v, r1["res"].log_v, rtol=0, atol=0)  # the same on every rank
    assert r0["res"].iters == r1["res"].iters == single.iters
    centred = [x - x.mean() for x in (r0["res"].log_v, single.log_v)]  # scalings are unique up to a constant
    torch.testing.assert_close(centred[0], centred[1], rtol=1e-5, atol=1e-4)
    assert torch.cat([r0["res"].labels, r1["res"].labels]).tolist() == single.labels.tolist()
    # The method's relabelling: identical labels on both ranks, equal to one process doing it all.
    assert torch.equal(r0["labels"], r1["labels"])
    m = _tiny_sela(37)
    m.on_epoch_start(EpochContext(epoch=0, num_epochs=1, predict_all=_predict_all(_tiny_images(37))))
    assert torch.equal(m.labels, r0["labels"])
    assert r0["logs"]["relabel_heads"] == 2


# --------------------------------------------------------------------------- the method


def test_initial_labels_are_random_and_balanced():
    torch.manual_seed(0)
    lab = balanced_random_labels(3, 103, [10, 10, 7])
    assert lab.shape == (3, 103) and lab.dtype == torch.int64
    for h, k in enumerate([10, 10, 7]):
        counts = torch.bincount(lab[h], minlength=k)
        assert len(counts) == k and counts.max() - counts.min() <= 1
    assert not torch.equal(lab[0], lab[1])  # each head its own shuffle
    torch.manual_seed(0)
    assert torch.equal(balanced_random_labels(3, 103, [10, 10, 7]), lab)  # same seed, same labels (all ranks)


def test_relabel_schedule_spacing():
    lin = relabel_schedule(400, 400, "linear")  # the paper's CIFAR recipe: one per epoch
    assert lin == [1] * 400
    assert relabel_schedule(10, 5, "linear") == [1, 0] * 5
    quad = relabel_schedule(400, 100, "quadratic")  # the paper's ImageNet recipe
    assert sum(quad) == 100 and len(quad) == 400
    epochs = [e for e, c in enumerate(quad) for _ in range(c)]
    # Optimisation j at floor(400 (j/100)^2): 0, 0.04, 0.16, ... -> epochs 0, 0, 0, 0, 0, 1, 1, 1, 2, ...
    assert epochs[:9] == [0, 0, 0, 0, 0, 1, 1, 1, 2] and epochs[-1] == 392
    gaps = np.diff([400 * (j / 100) ** 2 for j in range(100)])
    assert np.all(np.diff(gaps) > 0)  # denser early: the gaps grow
    assert sum(quad[:200]) > 2 * sum(quad[200:])
    assert relabel_schedule(3, 10, "quadratic")[0] > relabel_schedule(3, 10, "linear")[0]
    assert sum(relabel_schedule(7, 0, "linear")) == 0


def test_round_robin_and_all_heads(monkeypatch):
    m = _tiny_sela(40, hc=3, ncl=[4], nopts=7, spacing="linear", relabel_heads="round-robin")
    seen = []
    monkeypatch.setattr(m, "relabel", lambda ctx, heads: seen.append((ctx.epoch, heads)) or {})
    for e in range(7):
        m.on_epoch_start(EpochContext(epoch=e, num_epochs=7, predict_all=None))
    assert seen == [(e, [e % 3]) for e in range(7)]  # optimisation j relabels head j mod H
    seen.clear()
    m.cfg.nopts = 6  # two optimisations at each of epochs 0, 1, 2 of 3: two distinct heads each
    for e in range(3):
        m.on_epoch_start(EpochContext(epoch=e, num_epochs=3, predict_all=None))
    assert seen == [(0, [0, 1]), (1, [0, 2]), (2, [1, 2])]
    m.cfg.relabel_heads = "all"
    seen.clear()
    m.on_epoch_start(EpochContext(epoch=1, num_epochs=3, predict_all=None))
    assert seen == [(1, [0, 1, 2])]


def test_final_labels_exported_even_without_relabelling(tmp_path):
    m = _tiny_sela(30, nopts=0)
    assert m.on_epoch_start(EpochContext(epoch=0, num_epochs=2, predict_all=None, save=run_files_saver(tmp_path))) == {}
    assert not (tmp_path / "pseudo_labels").exists()
    m.on_epoch_start(EpochContext(epoch=1, num_epochs=2, predict_all=None, save=run_files_saver(tmp_path)))
    assert np.load(tmp_path / "pseudo_labels" / "head1.npy").tolist() == m.labels[1].tolist()


def test_loss_is_mean_cross_entropy_over_heads():
    m = _tiny_sela(20)
    x = torch.randn(6, 3, 16, 16)
    idx = torch.tensor([0, 3, 5, 7, 11, 19])
    out = m([x], idx)
    logits = m.heads(m.backbone(x))  # train mode again: BatchNorm uses this batch's statistics, as above
    ce0 = nn.functional.cross_entropy(logits[:, :5], m.labels[0, idx])
    ce1 = nn.functional.cross_entropy(logits[:, 5:], m.labels[1, idx])
    torch.testing.assert_close(out.loss, (ce0 + ce1) / 2)


def test_relabel_recovers_separable_classes_and_logs_metrics(tmp_path):
    """Features that encode the class and a head that reads them: the solver must return the classes."""
    n, k = 60, 3
    true = torch.arange(n) % k
    cfg = resolve_config({"hc": 1, "ncl": [k], "lamb": 25.0, "sk_tol": 1e-3}, {}, "sela").method
    m = SeLa(nn.Identity(), k, n, cfg)
    with torch.no_grad():
        m.heads.weight.copy_(torch.eye(k) * 2.0)
        m.heads.bias.zero_()
    feats = nn.functional.one_hot((true + 1) % k, k).float() + 0.1 * torch.randn(n, k)  # class c -> cluster c+1
    logs = m.on_epoch_start(EpochContext(epoch=0, num_epochs=1, predict_all=lambda fn: fn(feats),
                                         save=run_files_saver(tmp_path), labels=true))
    assert torch.equal(m.labels[0], (true + 1) % k)
    assert logs["nmi_h0"] == pytest.approx(1.0) and logs["acc_h0"] == pytest.approx(1.0)
    assert logs["ari"] == pytest.approx(1.0) and logs["purity"] == pytest.approx(1.0)
    assert logs["sk_iters"] >= 1 and 0 <= logs["changed"] <= 1
    # Exported: one int64 file per head, row i = image i, plus meta.json.
    saved = np.load(tmp_path / "pseudo_labels" / "head0.npy")
    assert saved.dtype == np.int64 and saved.tolist() == m.labels[0].tolist()
    meta = json.loads((tmp_path / "pseudo_labels" / "meta.json").read_text())
    assert meta["clusters"] == [k] and meta["num_samples"] == n and meta["epoch"] == 0


def test_config_errors_are_clear():
    from instdisc.errors import ConfigError

    for kw, msg in [({"ncl": [500]}, "ncl"), ({"hc": 2, "ncl": [4, 4, 4]}, "one per head"), ({"lamb": 0.0}, "lamb")]:
        with pytest.raises(ConfigError, match=msg):
            _tiny_sela(40, **kw)


# --------------------------------------------------------------------------- bounded-memory relabelling


def _feature_sela(n, d, sizes, logit_std, seed, **kw):
    """SeLa on fixed features (identity backbone) with a random head whose logits have about `logit_std`."""
    cfg = resolve_config({"hc": len(sizes), "ncl": sizes, "lamb": 25.0, **kw}, {}, "sela").method
    m = SeLa(nn.Identity(), d, n, cfg)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    with torch.no_grad():
        m.heads.weight.copy_(torch.randn(sum(sizes), d, generator=g) * logit_std / d**0.5)
        m.heads.bias.copy_(torch.randn(sum(sizes), generator=g) * 0.5)
    return m, feats


def _full_matrix_labels(m, feats, heads):
    """The earlier relabel, kept as the reference: every head's whole (N, K) log-posterior matrix
    in memory, solved by the tensor solver."""
    out = m.labels.clone()
    weights, biases = m.heads.weight.float().split(m.sizes), m.heads.bias.float().split(m.sizes)
    for h in heads:
        log_p = torch.log_softmax(feats.float() @ weights[h].t() + biases[h], dim=1)  # (N, K_h)
        out[h] = sinkhorn_knopp(log_p, m.cfg.lamb, m.cfg.sk_tol, m.cfg.sk_max_iter, overrelax=m.cfg.sk_overrelax).labels
    return out


def test_rows_solver_recomputes_fixed_blocks_and_equals_the_tensor_solver():
    from instdisc.sinkhorn import sinkhorn_knopp_rows

    for seed, (n, k, std, absorb_at) in enumerate([(1000, 30, 4.0, 2.0), (537, 9, 10.0, 15.0), (250, 40, 2.0, 0.5)]):
        log_p = random_log_p(n, k, std, seed=10 + seed)
        calls = []

        def rows(lo, hi, log_p=log_p, calls=calls):
            calls.append((lo, hi))
            return log_p[lo:hi].clone()  # a fresh block each time, as a recomputation gives

        res = sinkhorn_knopp_rows(rows, n, k, 25.0, 1e-3, 3000, chunk=100, absorb_at=absorb_at)
        ref = sinkhorn_knopp(log_p, 25.0, 1e-3, 3000, absorb_at=absorb_at)
        assert res.converged and res.iters == ref.iters and res.rebuilds == ref.rebuilds
        assert torch.equal(res.labels, ref.labels)
        assert torch.equal(res.log_u, ref.log_u) and torch.equal(res.log_v, ref.log_v)
        blocks = [(i, min(i + 100, n)) for i in range(0, n, 100)]
        # Built once, rebuilt at each absorption, read once for the argmax: always the same blocks.
        assert calls == blocks * (res.rebuilds + 2), (len(calls), res.rebuilds)
        if absorb_at < 15:
            assert res.rebuilds > 0  # the rebuild path ran


@pytest.mark.parametrize("n,d,sizes,std,tol", [
    (3000, 16, [50, 20], 2.0, 0.1),
    (2000, 32, [100], 8.0, 0.1),  # peaked posteriors: absorptions rebuild the kernel
    (777, 8, [7, 13], 20.0, 1e-3),
    (9000, 8, [40], 5.0, 0.1),  # more rows than one block of the solver (8192)
])
def test_relabel_labels_equal_the_full_matrix_path(n, d, sizes, std, tol):
    m, feats = _feature_sela(n, d, sizes, std, seed=n, sk_tol=tol)
    expected = _full_matrix_labels(m, feats, list(range(len(sizes))))
    logs = m.relabel(EpochContext(epoch=0, num_epochs=1, predict_all=lambda fn: fn(feats)), list(range(len(sizes))))
    assert torch.equal(m.labels, expected)
    m2, _ = _feature_sela(n, d, sizes, std, seed=n, sk_tol=tol)

    def no_full_matrix(fn):
        raise AssertionError("predict_all called although predict_shard is given")

    logs2 = m2.relabel(EpochContext(epoch=0, num_epochs=1, predict_all=no_full_matrix, predict_shard=lambda fn: fn(feats)),
                       list(range(len(sizes))))
    assert torch.equal(m2.labels, expected)
    assert logs2["sk_rebuilds"] == logs["sk_rebuilds"]
    if std == 8.0:
        assert logs["sk_rebuilds"] > 0


def _shard_relabel_worker(rank, world, port, out):
    from instdisc.features import extract_features

    init_gloo(rank, world, port)
    n = 1001  # shards of 501 and 500
    shard = -(-n // world)
    results = {}
    for name, (d, sizes, std) in {"flat": (16, [30, 12], 2.0), "peaked": (8, [25], 12.0)}.items():
        m, feats = _feature_sela(n, d, sizes, std, seed=len(name))
        logs = m.relabel(EpochContext(epoch=0, num_epochs=1, predict_all=None,
                                      predict_shard=lambda fn, feats=feats: fn(feats[rank * shard : (rank + 1) * shard])),
                         list(range(len(sizes))))
        results[name] = (m.labels.clone(), logs)
    images = _tiny_images(37)  # through the engine's feature extraction, unpadded shards of 19 and 18
    m = _tiny_sela(37)
    ctx = EpochContext(epoch=0, num_epochs=1, predict_all=None,
                       predict_shard=lambda fn: extract_features(fn, images, size=16, batch_size=16, gather=False))
    m.on_epoch_start(ctx)
    results["images"] = (m.labels.clone(), {})
    torch.save(results, f"{out}/rank{rank}.pt")
    leave_gloo()


@pytest.mark.dist
def test_sharded_relabel_from_feature_shards_equals_the_full_matrix_path(tmp_path):
    mp.spawn(_shard_relabel_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, (d, sizes, std) in {"flat": (16, [30, 12], 2.0), "peaked": (8, [25], 12.0)}.items():
        m, feats = _feature_sela(1001, d, sizes, std, seed=len(name))
        expected = _full_matrix_labels(m, feats, list(range(len(sizes))))
        assert torch.equal(r0[name][0], expected) and torch.equal(r1[name][0], expected), name
    assert r0["peaked"][1]["sk_rebuilds"] > 0
    # The engine path: shards from extract_features(gather=False) give what one process gets from all images.
    m = _tiny_sela(37)
    m.on_epoch_start(EpochContext(epoch=0, num_epochs=1, predict_all=_predict_all(_tiny_images(37))))
    assert torch.equal(r0["images"][0], m.labels) and torch.equal(r1["images"][0], m.labels)


def test_relabel_memory_benchmark_runs_and_both_paths_agree():
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sela_relabel_memory.py"
    res = subprocess.run([sys.executable, str(script), "--points", "600:12", "--d", "8"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "N=600 K=12: identical labels: yes" in res.stdout
    rows = {r["path"]: r for r in json.loads(res.stdout.strip().splitlines()[-1])["results"]}
    assert rows.keys() == {"full", "rows"} and rows["full"]["iters"] == rows["rows"]["iters"] > 0
    assert rows["full"]["peak_growth_bytes"] >= 0 and rows["rows"]["peak_growth_bytes"] >= 0


# --------------------------------------------------------------------------- CLI: labels reused


COMMON = ["--data", "synthetic:96", "--arch", "resnet18", "--width", "4", "--batch-size", "32", "--knn-k", "5",
          "--no-progress", "--device", "cpu", "--milestones", "100", "--image-size", "16", "--aug-size", "16"]


def test_train_sela_then_supervised_from_its_labels(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "sela"
    assert main(["train", "--method", "sela", "--out", str(run), "--epochs", "2", "--hc", "2", "--ncl", "10", "6",
                 "--lamb", "10", "--nopts", "2", "--spacing", "linear", *COMMON]) == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [ln for ln in lines if ln["type"] == "epoch"]
    assert all("nmi_h0" in ln and "acc_h0" in ln and "nmi_h1" in ln and "acc_h1" not in ln for ln in epochs)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    head1 = np.load(run / "pseudo_labels" / "head1.npy")
    assert head1.dtype == np.int64 and head1.tolist() == ck["model"]["labels"][1].tolist() and head1.max() < 6

    capsys.readouterr()
    assert main(["clusters", str(run), "--top", "4", "--per-cluster", "3"]) == 0
    assert "head 1:" in capsys.readouterr().out
    assert (run / "clusters" / "head0.png").is_file()

    sup = tmp_path / "sup"
    assert main(["train", "--method", "supervised", "--labels", str(run / "pseudo_labels" / "head1.npy"),
                 "--out", str(sup), "--epochs", "1", *COMMON]) == 0
    ck = torch.load(sup / "checkpoints" / "last.pt", weights_only=True)
    assert ck["config"]["method"]["num_classes"] == 6  # inferred from the file, kept in the config
    assert ck["model"]["targets"].tolist() == head1.tolist()
    assert ck["model"]["classifier.weight"].shape[0] == 6


@pytest.mark.dist
def test_torchrun_two_processes_relabel_from_feature_shards_as_one_process(tmp_path):
    """Under torchrun each rank embeds only its own shard for the label pass (the engine's
    predict_shard); the labels agree across ranks (the engine checks every buffer at each
    checkpoint) and equal a one-process run's: the label pass at epoch 0 sees the same
    initial network in both."""
    import os
    import subprocess
    import sys

    from gloo import free_port

    args = ["-m", "instdisc", "train", "--method", "sela", "--epochs", "1", "--hc", "2", "--ncl", "10", "6",
            "--lamb", "10", "--nopts", "1", "--cache-dir", str(tmp_path / "cache"), *COMMON]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {
        "one": [sys.executable, *args, "--out", str(tmp_path / "one")],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
                *args, "--out", str(tmp_path / "two")],
    }
    for name, cmd in runs.items():
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, name + res.stdout[-3000:] + res.stderr[-3000:]
    for h in (0, 1):
        one, two = (np.load(tmp_path / r / "pseudo_labels" / f"head{h}.npy") for r in ("one", "two"))
        assert one.shape == (96,) and one.tolist() == two.tolist(), h
    ck = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["world_size"] == 2
    assert ck["model"]["labels"][1].tolist() == np.load(tmp_path / "two" / "pseudo_labels" / "head1.npy").tolist()


def test_supervised_and_clusters_user_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(10, dtype=np.int64))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(96, dtype=np.float32))
    for extra, msg in [(["--labels", str(short)], "expected (96,)"), (["--labels", str(floats)], "integers"),
                       (["--labels", str(tmp_path / "none.npy")], "does not exist")]:
        capsys.readouterr()
        code = main(["train", "--method", "supervised", "--out", str(tmp_path / "x"), "--epochs", "1",
                     "--overwrite", *extra, *COMMON])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and "Traceback" not in err, err
    # ground truth without --num-classes: the training split's classes (no longer an error)
    assert main(["train", "--method", "supervised", "--out", str(tmp_path / "x"), "--epochs", "1", "--overwrite",
                 *COMMON]) == 0
    assert "--num-classes 10 (the training split's classes)" in capsys.readouterr().out
    npid = tmp_path / "npid"
    assert main(["train", "--method", "npid", "--nce-k", "8", "--out", str(npid), "--epochs", "1", *COMMON]) == 0
    capsys.readouterr()
    assert main(["clusters", str(npid)]) == 2
    assert "only SeLa runs" in capsys.readouterr().err


# --------------------------------------------------------------------------- cluster metrics


def test_cluster_metrics_on_hand_checked_cases():
    true = np.array([0, 0, 1, 1])
    # Same partition under other names: every score is perfect.
    for f in (nmi, adjusted_rand, purity, hungarian_accuracy):
        assert f(np.array([1, 1, 0, 0]), true) == pytest.approx(1.0)
    pred = np.array([0, 0, 0, 1])  # contingency [[2, 1], [0, 1]]
    assert contingency(pred, true).tolist() == [[2, 1], [0, 1]]
    assert purity(pred, true) == pytest.approx(3 / 4)  # majorities 2 + 1
    assert hungarian_accuracy(pred, true) == pytest.approx(3 / 4)  # 0->0 (2), 1->1 (1)
    # ARI by its definition: index sum_ij C(n_ij, 2) = 1, rows C(3,2)+C(1,2) = 3, columns 1+1 = 2,
    # expected 3*2/C(4,2) = 1, max (3+2)/2 = 2.5 -> (1 - 1) / (2.5 - 1) = 0.
    assert adjusted_rand(pred, true) == pytest.approx(0.0)
    h_true = math.log(2)
    h_pred = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.25 * 0.5))
    assert nmi(pred, true) == pytest.approx(mi / ((h_true + h_pred) / 2))
    # Singletons: purity is trivially 1, but a one-to-one matching can only cover 2 of 4.
    single = np.arange(4)
    assert purity(single, true) == 1.0 and hungarian_accuracy(single, true) == pytest.approx(0.5)
    assert "acc" not in cluster_metrics(single, true) and "acc" in cluster_metrics(pred, true)
    assert set(cluster_metrics(pred, true, num_clusters=2, num_classes=2)) == {"nmi", "ari", "purity", "acc"}
    with pytest.raises(ValueError):
        nmi(np.array([0, 1]), true)


def test_cluster_grid_puts_the_purest_cluster_first():
    true = np.array([0] * 6 + [1] * 6 + [0, 1] * 3)
    pred = np.array([2] * 6 + [0] * 3 + [1] * 3 + [1] * 6)  # cluster 2 pure, 0 pure but smaller, 1 mixed
    images = np.zeros((18, 4, 4, 3), dtype=np.uint8)
    images[:, :, :, 0] = (pred * 100)[:, None, None]  # red channel encodes the cluster
    img = cluster_grid(images, pred, true, clusters=3, per_cluster=2, tile=8)
    assert img.size == (120 + 2 * (8 + 2), 3 * (8 + 2))
    px = np.asarray(img)
    reds = [int(px[r * 10 + 4, 120 + 4, 0]) for r in range(3)]
    assert reds == [200, 0, 100]  # purity 1 (6 images), purity 1 (3 images), then the mixed cluster
    no_truth = cluster_grid(images, pred, None, clusters=3, per_cluster=2, tile=8)
    assert int(np.asarray(no_truth)[4, 124, 0]) == 100  # without labels: the largest cluster first (9)


# --------------------------------------------------------------------------- AlexNet


@pytest.mark.parametrize(("cifar_stem", "side", "width", "dim"), [(True, 32, 8, 512), (False, 224, 4, 256)])
def test_alexnet_layouts(cifar_stem, side, width, dim):
    net, feat_dim = build_backbone("alexnet", width=width, cifar_stem=cifar_stem)
    assert feat_dim == dim == net.feat_dim
    x = torch.randn(2, 3, side, side)
    net.eval()
    with torch.no_grad():
        out = net(x)
        trunk = x
        for conv in net.convs:
            trunk = conv(trunk)
    assert out.shape == (2, dim)
    assert trunk.shape[-2:] == ((3, 3) if cifar_stem else (6, 6))  # the layouts' nominal grids
    first = net.convs[0][0]
    assert first.kernel_size == ((5, 5) if cifar_stem else (11, 11)) and first.stride == ((1, 1) if cifar_stem else (4, 4))
    assert [f.shape[1] for f in net.forward_stages(x)] == [c * width // 64 for c in (96, 256, 384, 384, 256)]
    assert build_backbone("alexnet")[1] == 4096
