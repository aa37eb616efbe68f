"""PIC: sparse-row SGD with the weight-update correction, the queue, multi-crop, the sliding-window
scheduler, host rows, learning, two processes and the command line."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo import free_port, init_gloo, leave_gloo
from torch import nn

from instdisc import dist, sparse_sgd
from instdisc.augment import AugmentConfig, augment, preprocess
from instdisc.cli import main
from instdisc.config import OptimConfig
from instdisc.engine import build_method, lr_schedule
from instdisc.errors import ConfigError
from instdisc.loader import TrainLoader, make_order, sliding_window_order
from instdisc.methods import resolve_config
from instdisc.methods.pic import PIC, PICConfig, sampled_classes, small_crop_size
from instdisc.sources import open_source
from instdisc.sparse_sgd import SampledRows, SampledRowSGD, range_products


# ---------------------------------------------------------------- references written from the paper
def sgd_matrix(lr, mu, wd):
    """One SGD step of a row with zero loss gradient: u' = mu u + wd w, w' = w - lr u'."""
    return torch.tensor([[1 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64)


def pic_loss_ref(f, w, target, t):
    """-log softmax_j(cos(f, w_j) / t)[target], averaged; one row at a time."""
    out = []
    for b in range(f.shape[0]):
        cos = torch.stack([torch.dot(f[b], w[j]) / (f[b].norm() * w[j].norm()) for j in range(w.shape[0])])
        out.append(-(cos / t).log_softmax(0)[target[b]])
    return torch.stack(out).mean()


def cosine_lrs(steps):
    return lr_schedule(OptimConfig(epochs=steps, lr=0.5, schedule="cosine", warmup_epochs=steps / 4), 1).tolist()


# ---------------------------------------------------------------- the correction
def test_range_products_equal_step_by_step_products_across_growth(monkeypatch):
    monkeypatch.setattr(sparse_sgd, "_INITIAL_STEPS", 4)  # forces the tree to grow several times
    rows = SampledRows(5, 2)
    g = torch.Generator().manual_seed(0)
    lrs = torch.rand(37, generator=g, dtype=torch.float64).tolist()
    for lr in lrs:
        rows.apply_step(lr, 0.9, 0.1)
    assert rows.capacity == 64 and rows.steps == 37
    starts = torch.tensor([0, 1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 36, 37])
    got = range_products(rows.tree, rows.capacity, starts, 37)
    for p, a in zip(got, starts.tolist(), strict=True):
        ref = torch.eye(2, dtype=torch.float64)
        for t in range(a, 37):
            ref = sgd_matrix(lrs[t], 0.9, 0.1) @ ref
        assert torch.allclose(p, ref, rtol=1e-12, atol=1e-15), a


def _run_sparse_vs_dense(correct, steps=60, n=40, d=6, resume_at=None):
    """Train a cosine classifier whose loss only involves sampled rows, two ways:
    dense nn.Parameter + torch.optim.SGD (unsampled rows get zero gradient but still decay), and
    SampledRows + SampledRowSGD. Returns both classifiers' weight and momentum."""
    torch.manual_seed(0)  # the Linear layers' init
    g = torch.Generator().manual_seed(1)
    # float64 throughout, so that "equal" can mean 1e-10 rather than float32's chaotic rounding.
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    init_w = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3
    lin_dense, lin_sparse = nn.Linear(5, d).double(), nn.Linear(5, d).double()
    lin_sparse.load_state_dict(lin_dense.state_dict())
    w_dense = nn.Parameter(init_w.clone())
    opt_dense = torch.optim.SGD([*lin_dense.parameters(), w_dense], lr=0.1, momentum=0.9, weight_decay=0.05)
    rows = SampledRows(n, d, correct=correct).double()
    rows.weight.copy_(init_w)
    opt_sparse = SampledRowSGD(lin_sparse.parameters(), rows, lr=0.1, momentum=0.9, weight_decay=0.05)
    lrs = cosine_lrs(steps)
    for step in range(steps):
        batch = torch.randperm(n, generator=g)[:4]
        cls, cols = sampled_classes(batch, torch.randperm(n, generator=g)[: int(torch.randint(0, 8, (1,), generator=g))])
        for opt in (opt_dense, opt_sparse):
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        loss = F.cross_entropy(F.normalize(lin_dense(x[batch])) @ F.normalize(w_dense[cls]).t() / 0.2, cols)
        opt_dense.zero_grad()
        loss.backward()
        opt_dense.step()
        leaf = rows.fetch(cls, "cpu")
        loss = F.cross_entropy(F.normalize(lin_sparse(x[batch])) @ F.normalize(leaf).t() / 0.2, cols)
        opt_sparse.zero_grad()
        loss.backward()
        opt_sparse.step()
        if resume_at == step:  # checkpoint and continue from fresh objects
            state, ostate = rows.state_dict(), opt_sparse.state_dict()
            rows = SampledRows(n, d, correct=correct).double()
            rows.load_state_dict(state)
            opt_sparse = SampledRowSGD(lin_sparse.parameters(), rows, lr=0.1, momentum=0.9, weight_decay=0.05)
            opt_sparse.load_state_dict(ostate)
    dense_mom = opt_dense.state[w_dense]["momentum_buffer"]
    w, u = rows.current(torch.arange(n))
    return (w_dense.detach(), dense_mom, lin_dense.weight.detach()), (w, u, lin_sparse.weight.detach()), rows


def test_correction_makes_sampled_sgd_equal_dense_sgd_under_a_changing_lr():
    (w_d, u_d, lin_d), (w_s, u_s, lin_s), rows = _run_sparse_vs_dense(correct=True)
    stale = rows.last_step < rows.steps
    assert stale.sum() > 10  # many rows were last touched long ago: the correction matters
    assert torch.allclose(w_s, w_d, rtol=1e-10, atol=1e-12)
    assert torch.allclose(u_s, u_d, rtol=1e-10, atol=1e-12)
    assert torch.allclose(lin_s, lin_d, rtol=1e-10, atol=1e-12)


def test_without_correction_sampled_sgd_drifts_from_dense_sgd():
    (w_d, _, _), (w_s, _, _), _ = _run_sparse_vs_dense(correct=False)
    assert (w_s - w_d).abs().max() > 1e-2


def test_rows_and_optimizer_state_resume_exactly():
    _, (w_a, u_a, lin_a), _ = _run_sparse_vs_dense(correct=True)
    _, (w_b, u_b, lin_b), _ = _run_sparse_vs_dense(correct=True, resume_at=29)
    assert torch.equal(w_a, w_b) and torch.equal(u_a, u_b) and torch.equal(lin_a, lin_b)


# ---------------------------------------------------------------- queue and sampled classes
def test_sampled_classes_are_unique_and_columns_point_at_the_batch_ids():
    batch = torch.tensor([7, 3, 7, 11])  # a repeat, as a sliding window can produce
    queue = torch.tensor([3, 5, 20, 11, 5])
    cls, cols = sampled_classes(batch, queue)
    assert cls.tolist() == [3, 5, 7, 11, 20]
    assert torch.equal(cls[cols], batch)


def make_pic(n=32, queue_size=0, small_crops=1, **kw):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))
    return PIC(backbone, 16, n, PICConfig(dim=8, queue_size=queue_size, small_crops=small_crops, **kw))


def test_queue_holds_the_last_k_visited_ids_and_sampling_uses_batch_plus_queue():
    m = make_pic(n=64, queue_size=6)
    start = m.queue.clone()
    x = torch.randn(4, 3, 4, 4)
    seen = []
    for step in range(3):
        idx = torch.arange(4) + 10 * step
        before = m.queue.clone()
        m([x, x], idx)
        # This step's classes: the batch and the queue as it was (the batch is enqueued after).
        assert torch.equal(m.rows._pending[0], torch.unique(torch.cat([idx, before])))
        seen += idx.tolist()
        assert sorted(m.queue.tolist()) == sorted((start.tolist() + seen)[-6:])
    m([x[:4].repeat(3, 1, 1, 1), x[:4].repeat(3, 1, 1, 1)], torch.arange(40, 52))  # batch of 12 > queue of 6
    assert sorted(m.queue.tolist()) == list(range(46, 52))


# ---------------------------------------------------------------- multi-crop
@pytest.mark.parametrize("queue_size", [0, 8])
def test_row_init_from_features_only_at_the_first_epoch(queue_size):
    from instdisc.methods.base import EpochContext

    m = make_pic(queue_size=queue_size, row_init="features", init_std=0.05)
    images = torch.randn(m.num_samples, 3, 4, 4)

    def rows():
        return (m.classifier if queue_size == 0 else m.rows.weight).detach().clone()

    def ctx(epoch):
        return EpochContext(epoch=epoch, num_epochs=3, predict_all=lambda fn: fn(images))

    random_rows = rows()
    assert m.on_epoch_start(ctx(0)) == {"row_init": 1.0}
    # Each row points at its own image's embedding, with the norm random rows have on average.
    assert torch.allclose(rows(), m.embed(images) * 0.05 * 8**0.5, atol=1e-6)
    # ...so at step 0 every image is already its own nearest class.
    logits = m.embed(images) @ F.normalize(rows(), dim=1).t()  # (N, N)
    assert torch.equal(logits.argmax(1), torch.arange(m.num_samples))
    assert not torch.allclose(rows(), random_rows)
    trained = rows()
    assert m.on_epoch_start(ctx(1)) == {}  # later epochs (and resumed runs) keep the trained rows
    assert torch.equal(rows(), trained)
    paper = make_pic(queue_size=queue_size)
    assert paper.on_epoch_start(ctx(0)) == {}  # the default keeps the paper's random init


@pytest.mark.parametrize("queue_size", [0, 8])
def test_small_crops_give_no_gradient_to_the_classifier(queue_size):
    m = make_pic(queue_size=queue_size, small_crops=2)
    g = torch.Generator().manual_seed(3)
    large, s1, s2 = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    idx = torch.tensor([1, 5, 9, 30])
    w = m.classifier if queue_size == 0 else None
    out = m([large, s1, s2], idx)
    out.loss.backward()
    grad_all = (m.classifier if w is not None else m.rows.leaf).grad.clone()
    bb_all = m.backbone[1].weight.grad.clone()
    # Reference: only the large crop's term reaches the classifier, with weight 1/3 in the mean.
    cls = torch.arange(32) if w is not None else m.rows._pending[0]
    rows = (m.classifier if w is not None else m.rows.leaf).detach().clone().requires_grad_()
    f = m.embed(large).detach()
    target = torch.searchsorted(cls, idx)
    (pic_loss_ref(f, rows, target, m.cfg.temperature) / 3).backward()
    assert torch.allclose(grad_all, rows.grad, atol=1e-6)
    # ... while the small crops do train the backbone.
    m.zero_grad()
    if w is None:
        m.rows.leaf.grad = None
    m([large, large, large], idx).loss.backward()
    assert not torch.allclose(bb_all, m.backbone[1].weight.grad, atol=1e-4)


def test_views_are_one_large_and_small_crops():
    m = make_pic(small_crops=3)
    views = m.views(AugmentConfig(size=32, scale=(0.14, 1.0)))
    assert [v.size for v in views] == [32, 20, 20, 20] and views[1].scale == (0.08, 0.14)
    assert small_crop_size(160) == 96 and small_crop_size(16) == 10


def test_loss_is_the_cosine_softmax_of_the_paper():
    m = make_pic(small_crops=0)
    x, idx = torch.randn(3, 3, 4, 4), torch.tensor([0, 4, 31])
    out = m([x], idx)
    ref = pic_loss_ref(m.embed(x), m.classifier.detach(), idx, 0.2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- host rows
def _train_few(m, steps=8):
    opt = m.configure_optimizer(lr=0.2, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(5)
    lrs = cosine_lrs(steps)
    for step in range(steps):
        idx = torch.randperm(m.num_samples, generator=g)[:6]
        x = torch.randn(6, 3, 4, 4, generator=g)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        out = m([x, x.flip(3)], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return m


def test_sampling_every_class_equals_the_full_classifier():
    """A batch of all N images samples every class: the sampled path (rows, leaf, SampledRowSGD)
    must then train exactly what the dense nn.Parameter + torch.optim.SGD trains."""
    dense, sampled = make_pic(n=12, queue_size=0), make_pic(n=12, queue_size=4)
    assert torch.equal(dense.classifier.detach(), sampled.rows.weight)  # same init
    opts = [m.configure_optimizer(lr=0.2, momentum=0.9, weight_decay=0.01) for m in (dense, sampled)]
    g = torch.Generator().manual_seed(2)
    for lr in cosine_lrs(6):
        idx = torch.randperm(12, generator=g)
        x = torch.randn(12, 3, 4, 4, generator=g)
        for m, opt in zip((dense, sampled), opts, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr
            out = m([x, x.flip(3)], idx)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    assert sampled.rows.steps == 6 and bool((sampled.rows.last_step == 6).all())
    assert torch.allclose(sampled.rows.weight, dense.classifier.detach(), atol=1e-6)
    assert torch.allclose(sampled.rows.momentum, opts[0].state[dense.classifier]["momentum_buffer"], atol=1e-6)
    assert torch.allclose(sampled.head.net[0].weight, dense.head.net[0].weight, atol=1e-6)


def test_host_rows_equal_device_rows():
    dev = _train_few(make_pic(queue_size=10))
    host = _train_few(make_pic(queue_size=10, rows_on="host"))
    assert "weight" not in dict(host.rows.named_buffers())  # kept out of .to()'s reach
    a, b = dev.state_dict(), host.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = make_pic(queue_size=10, rows_on="host")
    fresh.load_state_dict(a)  # checkpoints move between the two modes
    assert torch.equal(fresh.rows.weight, dev.rows.weight) and fresh.rows.steps == 8


def test_config_errors():
    for kw in [dict(queue_size=32), dict(queue_size=-1), dict(temperature=0.0), dict(rows_on="host"),
               dict(small_scale=(0.5, 0.2))]:
        with pytest.raises(ConfigError):
            make_pic(n=32, **kw)


# ---------------------------------------------------------------- it learns
def test_sampled_pic_learns_to_tell_instances_apart():
    """32 images, sampled classes (queue 8) with the correction, a sliding window, multi-crop: the
    loss falls and an augmented image's embedding finds its own image (1-NN among the 32) far more
    often than at initialisation (chance: 1/32)."""
    ds = open_source("synthetic:32", "train")
    x = torch.from_numpy(ds.images[:]).permute(0, 3, 1, 2)
    cfg = resolve_config({"arch": "resnet18", "width": 8, "queue_size": 8, "small_crops": 1, "small_size": 8}, {}, "pic")
    torch.manual_seed(0)
    m = build_method(cfg, len(ds))
    opt = m.configure_optimizer(lr=0.1, momentum=0.9, weight_decay=1e-4)
    aug = AugmentConfig(size=16, scale=(0.6, 1.0), jitter_p=0.0, grayscale_p=0.0)
    order = sliding_window_order(32, 0, window=16, stride=4)
    g = torch.Generator().manual_seed(0)

    def instance_acc():
        m.eval()
        with torch.no_grad():
            f = m.embed(preprocess(x, 16))
            hits = [(m.embed(augment(x, aug, g)) @ f.t()).argmax(1).eq(torch.arange(32)) for _ in range(4)]
        m.train()
        return torch.cat(hits).float().mean().item()

    before, losses = instance_acc(), []
    stream = torch.cat([order(e) for e in range(40)])
    for step in range(50):
        idx = stream[step * 16 : step * 16 + 16]
        out = m([augment(x[idx], vc, g) for vc in m.views(aug)], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    after = instance_acc()
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3
    assert after > 0.45 and after > before + 0.1, (before, after)


# ---------------------------------------------------------------- sliding-window scheduler
def test_sliding_window_visits_every_image_with_the_modulus_over_n():
    # The reference's modulus over the window size never leaves the first window (8 of 20 seen).
    order = sliding_window_order(20, seed=0, window=8, stride=2, epoch_len=8)
    stream = torch.cat([order(e) for e in range(12)])
    assert set(stream.tolist()) == set(range(20))
    for w in range(12):  # each window: D distinct images, consecutive windows share D - S of them
        cur, nxt = set(stream[8 * w : 8 * w + 8].tolist()), set(stream[8 * w + 8 : 8 * w + 16].tolist())
        assert len(cur) == 8 and (w == 11 or len(cur & nxt) == 6)


def test_most_images_come_back_after_about_d_not_n():
    n, d, s = 2000, 200, 25
    order = sliding_window_order(n, seed=1, window=d, stride=s)
    stream = torch.cat([order(e) for e in range(8)])
    last, gaps = {}, []
    for p, i in enumerate(stream.tolist()):
        if i in last:
            gaps.append(p - last[i])
        last[i] = p
    gaps = torch.tensor(gaps, dtype=torch.float64)
    assert 0.5 * d < gaps.median() < 1.5 * d
    assert (gaps < 2 * d).double().mean() > 0.8  # about (D/S - 1) / (D/S) of the gaps are short
    perm = torch.cat([make_order("shuffle", n, seed=1)(e) for e in range(3)])
    first = {int(i): p for p, i in enumerate(perm[:n])}
    shuffle_gaps = torch.tensor([p + n - first[int(i)] for p, i in enumerate(perm[n : 2 * n])], dtype=torch.float64)
    assert shuffle_gaps.median() > 5 * d  # an epoch-based shuffle comes back after about N


def test_sliding_order_is_a_pure_function_of_seed_and_epoch():
    a = make_order("sliding", 1000, seed=3, window=128, stride=16, batch_size=32)
    b = make_order("sliding", 1000, seed=3, window=128, stride=16, batch_size=32)
    assert all(torch.equal(a(e), b(e)) for e in (0, 1, 7, 40))
    assert len(a(0)) == (1000 // 32) * 32  # the epoch is N images, cut to whole batches
    assert not torch.equal(a(2), make_order("sliding", 1000, seed=4, window=128, stride=16, batch_size=32)(2))
    # Epochs tile the stream: no image of the stream is dropped between epochs.
    whole = sliding_window_order(1000, 3, window=128, stride=16, epoch_len=992)
    assert torch.equal(torch.cat([whole(0), whole(1)]), torch.cat([a(0), a(1)]))
    default = make_order("sliding", 1000, seed=0)  # D = N // 10, S = D // 8
    assert len(set(default(0)[:100].tolist())) == 100
    for bad in [dict(window=2000), dict(window=16, stride=32)]:
        with pytest.raises(ConfigError):
            make_order("sliding", 1000, seed=0, **bad)


def test_loader_splits_each_global_batch_of_the_window_across_ranks():
    ds = open_source("synthetic:64", "train")
    order = make_order("sliding", 64, seed=0, window=16, stride=4, batch_size=8)
    one = [i for _, i in TrainLoader(ds, 8, order=order).epoch(1)]
    two = [TrainLoader(ds, 8, order=order, rank=r, world_size=2).epoch(1) for r in (0, 1)]
    for full, (_, a), (_, b) in zip(one, *two, strict=True):
        assert torch.equal(full, torch.cat([a, b]))


# ---------------------------------------------------------------- two processes
def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randperm(40, generator=g)[:8], torch.randn(8, 3, 4, 4, generator=g)


def _train_ddp_or_not(queue_size, rank=0, world=1, steps=5):
    m = make_pic(n=40, queue_size=queue_size)
    model = m if world == 1 else dist.ddp(m)
    opt = m.configure_optimizer(lr=0.3, momentum=0.9, weight_decay=0.01)
    lrs = cosine_lrs(steps)
    b = 8 // world
    for step in range(steps):
        idx, x = _batches(step)
        idx, x = idx[rank * b : (rank + 1) * b], x[rank * b : (rank + 1) * b]
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        out = model([x, x.flip(2)], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return m


def _worker(rank, world, port, out):
    init_gloo(rank, world, port)
    res = {}
    for q in (0, 12):
        m = _train_ddp_or_not(q, rank, world)
        res[q] = {"state": m.state_dict(), "agree": dist.buffers_agree(m)}
    torch.save(res, f"{out}/rank{rank}.pt")
    leave_gloo()


@pytest.mark.dist
def test_two_processes_keep_one_classifier_equal_to_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for q in (0, 12):
        s0, s1 = r0[q]["state"], r1[q]["state"]
        assert r0[q]["agree"] and r1[q]["agree"]
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (q, k)  # bit-identical on both ranks
        single = _train_ddp_or_not(q).state_dict()  # one process, the same global batch of 8
        for k in s0:
            assert torch.allclose(s0[k].double(), single[k].double(), rtol=1e-4, atol=1e-6), (q, k)
    assert r0[12]["state"]["rows.clock"] == 5 and (r0[12]["state"]["rows.last_step"] == 5).any()


# ---------------------------------------------------------------- command line
COMMON = ["--method", "pic", "--data", "synthetic:96", "--arch", "resnet18", "--width", "8", "--batch-size", "16",
          "--knn-k", "10", "--no-progress", "--device", "cpu", "--schedule", "cosine", "--warmup-epochs", "0.5",
          "--small-crops", "1", "--aug-size", "16", "--small-size", "8", "--queue-size", "24",
          "--sampler", "sliding", "--window", "32", "--stride", "8", "--knn-every", "0"]


def test_cli_trains_and_resumes_mid_epoch_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    full, part = tmp_path / "full", tmp_path / "part"
    # The kNN monitor each epoch reads the classifier rows (corrected to the current step).
    assert main(["train", "--out", str(full), *COMMON, "--epochs", "2", "--knn-every", "1"]) == 0
    assert main(["train", "--out", str(part), *COMMON, "--epochs", "2", "--max-steps", "8"]) == 0
    assert main(["train", "--out", str(part), *COMMON, "--epochs", "2", "--resume"]) == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert a["state"] == b["state"] and (a["state"]["epoch"], a["state"]["step"]) == (2, 12)
    assert a["model"]["rows.clock"] == 12 and a["config"]["data"]["sampler"] == "sliding"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert math.isfinite(a["model"]["rows.weight"].sum())
    epochs = [json.loads(ln) for ln in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch" and "knn_top1" in r] == [1, 2]


def test_cli_bad_queue_size_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--out", str(tmp_path / "r"), *COMMON, "--epochs", "1", "--queue-size", "500"]) == 2
    err = capsys.readouterr().err
    assert "--queue-size must be in [0, N)" in err and "Traceback" not in err
