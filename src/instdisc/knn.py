"""Weighted k-nearest-neighbour classification of features (Wu et al., CVPR 2018, Sec. 3.4).

For a query q, take the k training features with the largest cosine similarity s_j, weight each
by exp(s_j / tau) and sum the weights per class; the class with the largest sum wins. NPID uses
k = 200 and tau = its training temperature. Queries are processed in chunks so that memory stays
bounded (a 1,000,000-row bank is fine); the top-k is taken once for the largest k, so a sweep
over several k and tau costs one similarity pass. The chunks' similarities go into one buffer
allocated once: a fresh (chunk, N) block per chunk costs its page faults again each time, on a
CPU a good part of the matmul's own time (benchmarks/knn_speed.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Memory budget for one chunk of the (chunk, N) similarity matrix.
_CHUNK_BYTES = 256 * 2**20


def _chunk_rows(num_bank: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, min(4096, _CHUNK_BYTES // (4 * max(num_bank, 1))))


def _votes(sims: Tensor, labels: Tensor, k: int, t: float, num_classes: int) -> Tensor:
    """sims, labels: (Q, k_max) sorted by similarity -> (Q, C) weighted votes of the first k."""
    s = sims[:, :k]  # (Q, k)
    # Shift by the row max before exp: same ranking, no overflow for small tau.
    w = torch.exp((s - s[:, :1]) / t)  # (Q, k)
    votes = torch.zeros(s.shape[0], num_classes, dtype=w.dtype, device=w.device)
    return votes.scatter_add_(1, labels[:, :k], w)  # (Q, C)


@torch.no_grad()
def weighted_knn(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    k: int = 200,
    t: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Class scores of weighted kNN.

    Args:
        query: (Q, D) features (L2-normalised here, so cosine similarity).
        bank: (N, D) training features.
        bank_labels: (N,) int64 training labels.
        k: neighbours; clipped to N. k = 1 is the plain nearest neighbour.
        t: temperature of the weights exp(s / t).
        num_classes: C; default max(label) + 1.
        chunk_size: queries per chunk; default keeps each (chunk, N) block under 256 MiB.
    Returns:
        (Q, C) summed weights per class; argmax is the prediction.
    """
    return knn_sweep(query, bank, bank_labels, ks=(k,), ts=(t,), num_classes=num_classes, chunk_size=chunk_size)[
        (min(k, bank.shape[0]), t)
    ]


@torch.no_grad()
def knn_sweep(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    ks: Sequence[int] = (200,),
    ts: Sequence[float] = (0.07,),
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[tuple[int, float], Tensor]:
    """Weighted-kNN class scores for every (k, t) pair from one pass over the similarities.

    Returns a dict {(k, t): (Q, C) scores}; k values above N are clipped to N.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query (Q, D) and bank (N, D) must share D; got {tuple(query.shape)} and {tuple(bank.shape)}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but {bank_labels.shape[0]} labels")
    n = bank.shape[0]
    ks = sorted({min(int(k), n) for k in ks})
    if ks[0] < 1 or any(t <= 0 for t in ts):
        raise ValueError(f"k must be >= 1 and t > 0; got ks={ks}, ts={list(ts)}")
    c = int(num_classes) if num_classes is not None else int(bank_labels.max()) + 1
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float().to(bank.device), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k_max = ks[-1]
    out = {(k, t): [] for k in ks for t in ts}
    step = min(_chunk_rows(n, chunk_size), max(query.shape[0], 1))
    buffer = torch.empty(step, n, device=bank.device)  # (step, N), reused by every chunk
    bank_t = bank.t()  # (D, N), a view
    for start in range(0, query.shape[0], step):
        rows = min(step, query.shape[0] - start)
        sims = torch.mm(query[start : start + rows], bank_t, out=buffer[:rows])  # (q, N)
        top_s, top_i = sims.topk(k_max, dim=1)  # (q, k_max), sorted descending
        top_y = bank_labels[top_i]  # (q, k_max)
        for key, scores in scores_from_neighbours(top_s, top_y, ks=ks, ts=ts, num_classes=c).items():
            out[key].append(scores)
    return {key: torch.cat(v) for key, v in out.items()}


def scores_from_neighbours(
    top_sims: Tensor, top_labels: Tensor, *, ks: Sequence[int], ts: Sequence[float], num_classes: int
) -> dict[tuple[int, float], Tensor]:
    """Weighted-kNN votes from already found neighbours (any search backend).

    Args:
        top_sims: (Q, k_max) cosine similarities, sorted descending along dim 1.
        top_labels: (Q, k_max) labels of those neighbours.
        ks: neighbour counts, each <= k_max; ts: temperatures.
    Returns:
        {(k, t): (Q, C) scores}.
    """
    return {(k, t): _votes(top_sims, top_labels, k, t, num_classes) for k in ks for t in ts}


def topk_correct(
    scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5), *, votes: bool = False
) -> dict[str, int]:
    """{"top1": n, "top5": n}: how many of the (Q, C) scores' rows rank their (Q,) label within the
    first k (k above C counts as C). Counts add across query slices (the monitor's ranks).

    ``votes=True`` (kNN vote scores, >= 0): a class that no neighbour voted for (score 0) is not a
    guess, so it never counts as a hit. The published NPID code ranks such classes after the voted
    ones in tie order, which makes top-5 at small k depend on how the classes are numbered (on the
    NPID CIFAR-10 CPU preset's features: k = 1, top-5 67.0% that way against a top-1 of 41.6%);
    at k = 200 the two rules gave the same top-5 there (91.49%; docs/benchmarks.md). A weight that
    underflows to 0 (t far below the similarity gaps) is the same as no vote.
    """
    labels = labels.to(scores.device)
    res = {}
    for k in topk:
        top = scores.topk(min(k, scores.shape[1]), dim=1)  # (Q, k)
        hit = top.indices == labels[:, None]  # (Q, k)
        if votes:
            hit &= top.values > 0
        res[f"top{k}"] = int(hit.any(1).sum().item())
    return res


def percent(correct: dict[str, int], total: int) -> dict[str, float]:
    """Counts of `topk_correct` over `total` queries -> percentages (NaN for no query)."""
    return {key: 100.0 * n / total if total else math.nan for key, n in correct.items()}


def topk_accuracy(
    scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5), *, votes: bool = False
) -> dict[str, float]:
    """{"top1": %, "top5": %} of (Q, C) scores against (Q,) labels; top-k above C counts as C;
    ``votes``: as in `topk_correct`."""
    return percent(topk_correct(scores, labels, topk, votes=votes), int(labels.shape[0]))


def knn_accuracy(
    query: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    k: int = 200,
    t: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1/top-5 (%) of weighted kNN; the number NPID reports."""
    c = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
    scores = weighted_knn(query, bank, bank_labels, k=k, t=t, num_classes=c)  # (Q, C)
    return topk_accuracy(scores, query_labels, votes=True)
