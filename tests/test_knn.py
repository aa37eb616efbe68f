import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from instdisc.knn import knn_accuracy, knn_sweep, topk_accuracy, weighted_knn


def slow_knn(query, bank, labels, k, t, c):
    """Loop reference written from the paper: per query, top-k cosine, weights exp(s/t)."""
    q = F.normalize(query.double(), dim=1)
    b = F.normalize(bank.double(), dim=1)
    out = torch.zeros(len(q), c, dtype=torch.float64)
    for i in range(len(q)):
        sims = [(float(q[i] @ b[j]), j) for j in range(len(b))]
        sims.sort(key=lambda p: -p[0])
        for s, j in sims[:k]:
            out[i, labels[j]] += math.exp(s / t)
    return out


@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.1), (20, 0.5)])
def test_matches_slow_reference(k, t):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(60, 8, generator=g), torch.randn(15, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    fast = weighted_knn(query, bank, labels, k=k, t=t, num_classes=4)
    ref = slow_knn(query, bank, labels, k, t, 4)
    # Our scores are scaled per row by exp(-s_max/t) (overflow guard): compare normalised scores.
    fast_n = fast.double() / fast.double().sum(1, keepdim=True)
    ref_n = ref / ref.sum(1, keepdim=True)
    assert torch.allclose(fast_n, ref_n, atol=1e-5)
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def test_chunk_size_does_not_change_scores():
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    a = weighted_knn(query, bank, labels, k=30, t=0.1, chunk_size=7)
    b = weighted_knn(query, bank, labels, k=30, t=0.1, chunk_size=1000)
    assert torch.allclose(a, b)


def test_gaussian_clusters_are_classified():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(5, 32, generator=g) * 3
    y_bank = torch.arange(5).repeat_interleave(100)
    y_q = torch.arange(5).repeat_interleave(20)
    bank = centers[y_bank] + torch.randn(500, 32, generator=g)
    query = centers[y_q] + torch.randn(100, 32, generator=g)
    acc = knn_accuracy(query, y_q, bank, y_bank, k=50, t=0.07)
    assert acc["top1"] > 98.0
    shuffled = knn_accuracy(query, y_q[torch.randperm(100, generator=g)], bank, y_bank, k=50, t=0.07)
    assert shuffled["top1"] < 50.0


def test_sweep_equals_single_runs_and_clips_k():
    g = torch.Generator().manual_seed(3)
    bank, query = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    sweep = knn_sweep(query, bank, labels, ks=(1, 10, 500), ts=(0.07, 0.5))
    assert set(sweep) == {(1, 0.07), (1, 0.5), (10, 0.07), (10, 0.5), (40, 0.07), (40, 0.5)}
    for (k, t), scores in sweep.items():
        assert torch.allclose(scores, weighted_knn(query, bank, labels, k=k, t=t))


def test_tiny_temperature_does_not_overflow():
    g = torch.Generator().manual_seed(4)
    bank, query = torch.randn(50, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    scores = weighted_knn(query, bank, labels, k=10, t=1e-4)
    assert torch.isfinite(scores).all()


def test_topk_accuracy_and_bad_shapes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_accuracy(scores, torch.tensor([1, 2]), (1, 2)) == {"top1": 50.0, "top2": 50.0}
    with pytest.raises(ValueError):
        weighted_knn(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        weighted_knn(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long), t=0)


def test_chunks_in_one_reused_buffer_give_the_scores_of_fresh_chunks_exactly():
    """The chunks' similarities share one buffer (the last chunk shorter): scores equal, bit for bit,
    those of a fresh (chunk, N) matmul and top-k per chunk, as before the buffer."""
    from instdisc.knn import scores_from_neighbours

    g = torch.Generator().manual_seed(4)
    bank, query = torch.randn(500, 16, generator=g), torch.randn(23, 16, generator=g)
    labels = torch.randint(0, 6, (500,), generator=g)
    q, b = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    parts = []
    for start in range(0, 23, 5):
        s, i = (q[start : start + 5] @ b.t()).topk(40, dim=1)  # (<=5, 40)
        parts.append(scores_from_neighbours(s, labels[i], ks=(40,), ts=(0.1,), num_classes=6)[(40, 0.1)])
    got = weighted_knn(query, bank, labels, k=40, t=0.1, num_classes=6, chunk_size=5)
    assert torch.equal(got, torch.cat(parts))


def test_top5_counts_only_classes_that_received_votes():
    """k = 1: the one neighbour is class 3. The published code's top-5 ranks the nine unvoted classes
    after class 3 in tie order, so four of them "hit" as well; a class no neighbour voted for is not
    a guess, so at k = 1 top-5 is top-1, whatever the query's label."""
    bank = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(10)
    query = bank[3:4] + 0.01  # (1, 4): its nearest row is row 3, class 3
    for y in range(10):
        acc = knn_accuracy(query, torch.tensor([y]), bank, labels, k=1, t=0.07, num_classes=10)
        assert acc["top5"] == acc["top1"] == (100.0 if y == 3 else 0.0)


def test_top5_matches_a_slow_reference_that_ranks_only_voted_classes():
    g = torch.Generator().manual_seed(6)
    bank, query = torch.randn(80, 8, generator=g), torch.randn(40, 8, generator=g)
    labels, qy = torch.randint(0, 9, (80,), generator=g), torch.randint(0, 9, (40,), generator=g)
    for k in (1, 3, 20):
        ref = slow_knn(query, bank, labels, k, 0.5, 9)  # (Q, C), zero where no neighbour voted
        hits = 0
        for i in range(len(query)):
            voted = sorted((c for c in range(9) if ref[i, c] > 0), key=lambda c: -ref[i, c])[:5]
            hits += int(qy[i]) in voted
        assert knn_accuracy(query, qy, bank, labels, k=k, t=0.5, num_classes=9)["top5"] == pytest.approx(100 * hits / 40)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), q=st.integers(1, 12), c=st.integers(1, 8), k=st.integers(1, 50),
       t=st.sampled_from([0.02, 0.07, 0.5, 2.0]), chunk=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_any_bank_scores_as_the_slow_reference_in_any_chunking(n, q, c, k, t, chunk, seed):
    """Any sizes (k above N, one row, one class, chunks that do not divide Q): the prediction and the
    voted top-5 are the slow reference's, and top-5 never falls below top-1."""
    g = torch.Generator().manual_seed(seed)
    bank, query = torch.randn(n, 6, generator=g), torch.randn(q, 6, generator=g)
    labels, qy = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (q,), generator=g)
    fast = weighted_knn(query, bank, labels, k=k, t=t, num_classes=c, chunk_size=chunk)  # (Q, C)
    ref = slow_knn(query, bank, labels, min(k, n), t, c)  # (Q, C) float64
    assert torch.equal(fast > 0, ref > 0)  # the same classes got votes
    top1 = topk_accuracy(fast, qy, (1,), votes=True)["top1"]
    ref_top1 = 100.0 * float((ref.argmax(1) == qy).double().mean())
    ties = ((ref - ref.max(1, keepdim=True).values).abs() < 1e-9 * ref.max(1, keepdim=True).values).sum(1) > 1
    if not ties.any():  # exact ties (duplicate similarities) may break either way
        assert top1 == pytest.approx(ref_top1)
    acc = knn_accuracy(query, qy, bank, labels, k=k, t=t, num_classes=c)
    assert acc["top1"] <= acc["top5"] <= 100.0
