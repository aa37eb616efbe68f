"""MoCo v2 and SimCLR: loss cores against loop references written from the papers' equations, the
momentum encoder and the queue, 2-process runs against 1-process runs, and that both learn."""

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo import free_port, init_gloo, leave_gloo
from torch import nn

from instdisc import dist
from instdisc.augment import AugmentConfig, augment, preprocess
from instdisc.cli import main
from instdisc.engine import build_method
from instdisc.errors import ConfigError
from instdisc.knn import weighted_knn
from instdisc.methods import resolve_config
from instdisc.methods.moco import info_nce
from instdisc.methods.simclr import nt_xent, nt_xent_global
from instdisc.sources import open_source


def _moco(**kw):
    cfg = resolve_config({"arch": "resnet18", "width": 4, "dim": 8, **kw}, {}, "moco")
    torch.manual_seed(0)
    return build_method(cfg, 64)


# ---------------------------------------------------------------------------------------------
# Loss cores
# ---------------------------------------------------------------------------------------------


def info_nce_reference(q, k, queue, t):
    """MoCo Eq. 1, one query at a time: -log exp(q.k+/t) / (exp(q.k+/t) + sum_i exp(q.k_i/t))."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(torch.dot(q[i], k[i]) / t)
        neg = sum(torch.exp(torch.dot(q[i], queue[j]) / t) for j in range(queue.shape[0]))
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def nt_xent_reference(a, b, t):
    """SimCLR Eq. 1 and Algorithm 1 on raw (unnormalised) vectors: views 2k-1, 2k of image k are
    a[k], b[k]; l(i, j) = -log exp(sim(i,j)/t) / sum_{m != i} exp(sim(i,m)/t) with cosine sim;
    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = [v for pair in zip(a, b, strict=True) for v in pair]  # interleaved as in the paper

    def sim(u, v):
        return torch.dot(u, v) / (u.norm() * v.norm())

    def ell(i, j):
        den = sum(torch.exp(sim(z[i], z[m]) / t) for m in range(len(z)) if m != i)
        return -torch.log(torch.exp(sim(z[i], z[j]) / t) / den)

    n = len(a)
    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_equals_the_papers_equation_with_its_gradient(t):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    ours = info_nce(q, k, queue, t)
    (g_ours,) = torch.autograd.grad(ours, q)
    ref = info_nce_reference(q, k, queue, t)
    (g_ref,) = torch.autograd.grad(ref, q)
    assert torch.allclose(ours, ref, rtol=1e-10) and torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_equals_the_papers_equation_with_its_gradient(t):
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    b = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ours = nt_xent(F.normalize(a, dim=1), F.normalize(b, dim=1), t)
    g_ours = torch.autograd.grad(ours, (a, b))
    ref = nt_xent_reference(a, b, t)
    g_ref = torch.autograd.grad(ref, (a, b))
    assert torch.allclose(ours, ref, rtol=1e-10)
    for x, y in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-12)


def test_nt_xent_of_shards_against_the_whole_batch_averages_to_the_whole_loss():
    """What each rank computes (its anchors, everyone's candidates) averages to the global loss."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = (F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    whole = nt_xent(z1, z2, 0.3)
    shards = [nt_xent(z1[s:s + 3], z2[s:s + 3], 0.3, z1_all=z1, z2_all=z2, offset=s) for s in (0, 3)]
    assert torch.allclose((shards[0] + shards[1]) / 2, whole, rtol=1e-12)
    assert not torch.allclose(nt_xent(z1[:3], z2[:3], 0.3), shards[0])  # the other shard's negatives count


# ---------------------------------------------------------------------------------------------
# MoCo: momentum encoder and queue
# ---------------------------------------------------------------------------------------------


def test_moco_step_updates_key_encoder_and_queue_under_no_grad():
    m = _moco(moco_k=12, moco_m=0.9, moco_t=0.2)
    g = torch.Generator().manual_seed(0)
    xq, xk = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    m.head_k.net[0].weight.data.add_(1.0)  # make key and query encoders differ before the step
    old = copy.deepcopy(m)
    out = m([xq, xk], torch.arange(8))
    out.loss.backward()

    # MoCo Eq. 2 on every parameter: theta_k <- m theta_k + (1 - m) theta_q.
    for (name, pk), pk0, pq in zip(
        [*m.backbone_k.named_parameters(), *m.head_k.named_parameters()],
        [*old.backbone_k.parameters(), *old.head_k.parameters()],
        [*old.backbone.parameters(), *old.head.parameters()],
        strict=True,
    ):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6), name
        assert pk.grad is None and not pk.requires_grad, name
    assert m.backbone.stem[0].weight.grad is not None

    # The queue's first 8 rows are this step's keys (from the *updated* key encoder), the rest untouched.
    with torch.no_grad():
        keys = F.normalize(m.head_k(m.backbone_k(xk)), dim=1)
        q = F.normalize(m.head(m.backbone(xq)), dim=1)
    assert not m.queue.requires_grad
    assert torch.allclose(m.queue[:8], keys, atol=1e-5)
    assert torch.equal(m.queue[8:], old.queue[8:])
    assert int(m.queue_ptr) == 8
    # The loss used the queue as it was *before* this step's keys were written.
    assert torch.allclose(out.loss, info_nce(q, keys, old.queue, 0.2), atol=1e-5)
    assert not torch.allclose(out.loss, info_nce(q, keys, m.queue, 0.2), atol=1e-3)


def test_queue_pointer_wraps_and_an_oversized_batch_keeps_its_last_keys():
    m = _moco(moco_k=12)
    a, b, c = (F.normalize(torch.randn(n, 8), dim=1) for n in (8, 8, 20))
    m._enqueue(a)
    m._enqueue(b)  # rows 8..11, then wraps to 0..3
    assert int(m.queue_ptr) == 4
    assert torch.equal(m.queue[8:], b[:4]) and torch.equal(m.queue[:4], b[4:]) and torch.equal(m.queue[4:8], a[4:])
    m._enqueue(c)  # 20 keys > K = 12: the last 12 fill the whole queue, starting at the pointer
    assert int(m.queue_ptr) == 4
    assert torch.equal(torch.roll(m.queue, -4, dims=0), c[-12:])


def test_bn_splits_encode_keys_in_groups_of_a_shuffled_batch():
    m = _moco(moco_k=16, bn_splits=2)
    g = torch.Generator().manual_seed(3)
    xq, xk = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    torch.manual_seed(7)
    m([xq, xk], torch.arange(8))
    torch.manual_seed(7)
    perm = torch.randperm(8)  # the draw forward makes
    with torch.no_grad():
        enc = lambda x: F.normalize(m.head_k(m.backbone_k(x)), dim=1)  # noqa: E731
        shuffled = torch.cat([enc(xk[perm[:4]]), enc(xk[perm[4:]])])
        expected = torch.empty_like(shuffled).index_copy_(0, perm, shuffled)
        one_group = enc(xk)
    assert torch.allclose(m.queue[:8], expected, atol=1e-5)
    assert not torch.allclose(m.queue[:8], one_group, atol=1e-3)  # the groups' BN statistics matter
    with pytest.raises(ConfigError, match="must divide"):
        _moco(bn_splits=3)([xq, xk], torch.arange(8))


@pytest.mark.parametrize(
    "method, kw, needle",
    [
        ("moco", {"moco_m": 1.0}, "--moco-m"),
        ("moco", {"moco_t": 0.0}, "--moco-t"),
        ("moco", {"moco_k": 0}, "--moco-k"),
        ("moco", {"bn_splits": 0}, "--bn-splits"),
        ("simclr", {"temperature": -1.0}, "--temperature"),
        ("simclr", {"dim": 0}, "--dim"),
    ],
)
def test_bad_hyper_parameters_are_config_errors(method, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_config(kw, {}, method)


# ---------------------------------------------------------------------------------------------
# Two processes against one
# ---------------------------------------------------------------------------------------------


def _gather_check(rank: int, out: str) -> None:
    torch.manual_seed(0)
    enc = nn.Linear(6, 4, dtype=torch.float64)  # same weights on both ranks
    ddp = nn.parallel.DistributedDataParallel(enc)
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    sl = slice(4 * rank, 4 * rank + 4)
    z = F.normalize(ddp(torch.cat([x1[sl], x2[sl]])), dim=1)  # one forward per step, as SimCLR does
    z1, z2 = z[:4], z[4:]
    gathered = dist.all_gather_with_grad(z1)
    loss = nt_xent_global(z1, z2, 0.2)
    loss.backward()  # DDP averages the gradients over the ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce_(mean_loss, "mean")
    torch.save({"loss": mean_loss, "grad": enc.weight.grad, "gathered": gathered.detach()}, f"{out}/gather{rank}.pt")


def _moco_run(world: int, rank: int, splits: int) -> dict:
    m = _moco(moco_k=24, moco_m=0.9, bn_splits=splits)
    model = dist.ddp(m) if world > 1 else m
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(11)
    b = 16 // world
    losses = []
    for step in range(3):
        xq, xk = torch.randn(16, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
        sl = slice(rank * b, rank * b + b)
        torch.manual_seed(100 + step)  # rank 0's permutation == the 1-process one
        out = model([xq[sl], xk[sl]], torch.arange(16)[sl])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce_(loss, "mean")
        losses.append(loss)
    return {"loss": torch.stack(losses), "queue": m.queue.clone(), "ptr": m.queue_ptr.clone(),
            "w": m.backbone.stem[0].weight.detach().clone(), "wk": m.backbone_k.stem[0].weight.detach().clone()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    # One pair of processes for both 2-process checks (starting processes is the slow part).
    init_gloo(rank, world, port)
    _gather_check(rank, out)
    torch.save(_moco_run(world, rank, splits=1), f"{out}/moco{rank}.pt")
    leave_gloo()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.dist
def test_differentiable_gather_two_processes_equal_one_process(two_process_results):
    r0, r1 = (torch.load(two_process_results / f"gather{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    enc = nn.Linear(6, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    z1 = F.normalize(enc(x1), dim=1)
    loss = nt_xent(z1, F.normalize(enc(x2), dim=1), 0.2)
    loss.backward()
    assert torch.allclose(r0["gathered"], z1.detach(), atol=1e-12)  # rank order
    for r in (r0, r1):
        assert torch.allclose(r["loss"], loss.detach(), rtol=1e-10)
        assert torch.allclose(r["grad"], enc.weight.grad, rtol=1e-8, atol=1e-12)

    # A gather whose backward kept only the local loss's gradient (no sum over ranks) would give a
    # different gradient, so the comparison above tells the two apart.
    naive = torch.zeros_like(enc.weight)
    for s in (0, 4):
        enc.zero_grad()
        z1, z2 = F.normalize(enc(x1), dim=1), F.normalize(enc(x2), dim=1)
        others = lambda z: torch.cat([z[:s].detach(), z[s:s + 4], z[s + 4:].detach()])  # noqa: E731,B023
        nt_xent(z1[s:s + 4], z2[s:s + 4], 0.2, z1_all=others(z1), z2_all=others(z2), offset=s).backward()
        naive += enc.weight.grad / 2
    assert not torch.allclose(naive, r0["grad"], rtol=1e-3)


@pytest.mark.dist
def test_moco_shuffle_bn_two_processes_equal_one_process_with_two_bn_groups(two_process_results):
    """Under DDP the keys of the global batch are shuffled across ranks; in one process
    --bn-splits 2 simulates exactly that. Losses, queues and weights agree after 3 SGD steps."""
    r0, r1 = (torch.load(two_process_results / f"moco{r}.pt") for r in (0, 1))
    one = _moco_run(1, 0, splits=2)
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["wk"], r1["wk"])
    assert int(r0["ptr"]) == int(one["ptr"]) == (3 * 16) % 24
    assert torch.allclose(r0["loss"], one["loss"], atol=1e-5)
    for key in ("queue", "w", "wk"):
        assert torch.allclose(r0[key], one[key], atol=1e-4), key
    assert not torch.allclose(_moco_run(1, 0, splits=1)["loss"], one["loss"], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# They learn, and run through the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw, steps",
    [
        # 128 images: a queue of one batch and m = 0.99 so that 100 steps suffice.
        ("moco", {"moco_k": 32, "moco_m": 0.99}, 100),
        ("simclr", {"temperature": 0.5}, 60),
    ],
)
def test_learns_features_that_classify_digits(name, kw, steps):
    """Loss falls and weighted kNN (k=20) of the 360 test digits against 128 training digits rises
    well above chance (10%) and above the same network at initialisation."""
    tr, te = open_source("digits", "train", image_size=16), open_source("digits", "test", image_size=16)
    xtr, ytr = torch.from_numpy(tr.images[:128]).permute(0, 3, 1, 2), torch.from_numpy(tr.labels[:128])
    xte, yte = torch.from_numpy(te.images[:]).permute(0, 3, 1, 2), torch.from_numpy(te.labels)
    cfg = resolve_config({"arch": "resnet18", "width": 8, **kw}, {}, name)
    torch.manual_seed(0)
    m = build_method(cfg, 128)
    opt = torch.optim.SGD(m.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    aug = AugmentConfig(size=16, scale=(0.4, 1.0), flip_p=0.0)  # digits are not mirror-symmetric
    g = torch.Generator().manual_seed(0)

    def knn() -> float:
        m.eval()
        with torch.no_grad():
            bank, query = m.embed(preprocess(xtr, 16)), m.embed(preprocess(xte, 16))
        m.train()
        return (weighted_knn(query, bank, ytr, k=20, t=0.1, num_classes=10).argmax(1) == yte).float().mean().item()

    before, losses = knn(), []
    for _ in range(steps):
        idx = torch.randint(128, (32,), generator=g)
        out = m([augment(xtr[idx], vc, g) for vc in m.views(aug)], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    after = knn()
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after > 0.5 and after > before + 0.1, (before, after)


@pytest.mark.parametrize("method, extra", [("moco", ["--moco-k", "32", "--bn-splits", "2"]), ("simclr", [])])
def test_cli_train_and_mid_epoch_resume_is_bit_identical(tmp_path, monkeypatch, method, extra):
    monkeypatch.setenv("INSTDISC_CACHE", str(tmp_path / "cache"))
    common = ["train", "--method", method, "--data", "synthetic:64", "--arch", "resnet18", "--width", "4",
              "--batch-size", "16", "--epochs", "2", "--knn-k", "5", "--no-progress", "--device", "cpu",
              "--image-size", "16", "--aug-size", "16", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*common, "--out", str(full)]) == 0
    assert main([*common, "--out", str(part), "--max-steps", "5"]) == 0  # stops mid-epoch 2
    assert main([*common, "--out", str(part), "--resume"]) == 0
    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=True)["model"] for p in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "moco":
        assert "queue" in a and "backbone_k.stem.0.weight" in a


def test_cli_rejects_bad_values_with_exit_code_2(tmp_path, capsys):
    assert main(["train", "--method", "moco", "--moco-m", "1.5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--moco-m must be in [0, 1)" in err and "Traceback" not in err


def test_a_queue_as_large_as_the_data_is_warned_about():
    # K >= N: every query meets an older key of its own image among its "negatives" (found when
    # configs/moco_cifar10.yaml's 4,096 ran on digits' 1,437 images without a word).
    import warnings as w

    from instdisc.errors import InstdiscWarning
    from instdisc.methods.moco import MoCoConfig

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        MoCoConfig(moco_k=4096).fill_defaults(1437)
        MoCoConfig(moco_k=512).fill_defaults(1437)
        MoCoConfig().fill_defaults(1437)
    msgs = [str(c.message) for c in caught if issubclass(c.category, InstdiscWarning)]
    assert len(msgs) == 1 and "--moco-k 4096 is not below N = 1437" in msgs[0]
