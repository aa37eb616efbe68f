"""kNN sweep: weighted kNN (Wu et al. 2018, Sec. 3.4) for several k and temperatures from one
neighbour search, through the chunked torch path (`instdisc.knn`) or faiss for large banks;
`knn_evaluate`, a model's kNN on two splits (what the training loop, the demo and the benchmarks
report); and `nearest`, the plain cosine neighbours the report's figures use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from instdisc.errors import ConfigError, UserError
from instdisc.knn import knn_sweep, percent, scores_from_neighbours, topk_correct

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
# Banks with at least this many rows use faiss under backend="auto" (when it is installed). Below
# it the chunked torch path is as fast (measured: 10,000 x 50,000 and 2,000 x 1,000,000 at
# D = 128 take about the same time with either on a 2-core CPU); above it the torch path's
# normalised copy of the bank passes 1 GiB and each of its query chunks shrinks to <= 32 rows.
FAISS_MIN_ROWS = 2_000_000


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, num_bank: int) -> str:
    """ "auto" -> "faiss" for banks of `FAISS_MIN_ROWS` rows or more when faiss is installed, else "torch"."""
    if backend == "auto":
        return "faiss" if num_bank >= FAISS_MIN_ROWS and faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise UserError(
            "--backend faiss needs the faiss-cpu package: pip install 'instdisc[faiss]' (or faiss-cpu)."
        )
    if backend not in ("torch", "faiss"):
        raise ConfigError(f"unknown kNN backend {backend!r}; choose auto, torch or faiss.")
    return backend


@torch.no_grad()
def _faiss_sweep(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    ks: list[int],
    ts: Sequence[float],
    c: int,
    chunk: int,
) -> dict[tuple[int, float], Tensor]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    bank = F.normalize(bank.float().cpu(), dim=1)
    index = faiss.IndexFlatIP(bank.shape[1])  # exact inner product = cosine on normalised rows
    index.add(np.ascontiguousarray(bank.numpy()))
    labels = bank_labels.cpu()
    out: dict[tuple[int, float], list[Tensor]] = {(k, t): [] for k in ks for t in ts}
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float().cpu(), dim=1)
        sims, idx = index.search(np.ascontiguousarray(q.numpy()), ks[-1])  # (q, k_max) each, sorted
        top_y = labels[torch.from_numpy(idx)]  # (q, k_max)
        for key, s in scores_from_neighbours(
            torch.from_numpy(sims), top_y, ks=ks, ts=ts, num_classes=c
        ).items():
            out[key].append(s)
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def knn_scores(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ts: Sequence[float] = (0.07,),
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> dict[tuple[int, float], Tensor]:
    """Weighted-kNN scores for every (k, t) from one neighbour search of the largest k.

    Args:
        query: (Q, D); bank: (N, D); bank_labels: (N,).
        backend: "torch" (chunked matmul + top-k, knn.knn_sweep), "faiss" (exact IndexFlatIP) or
            "auto" (`resolve_backend`). Both return the same neighbours; scores agree to float
            rounding.
    Returns:
        {(k, t): (Q, C)}, k clipped to N.
    """
    n = bank.shape[0]
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise UserError(
            f"query (Q, D) and bank (N, D) must share D; got {tuple(query.shape)} and {tuple(bank.shape)}."
        )
    ks_c = sorted({min(int(k), n) for k in ks})
    if ks_c[0] < 1 or not all(0 < t < math.inf for t in ts):  # NaN fails too
        raise UserError(f"k must be >= 1 and t > 0; got k={list(ks)}, t={list(ts)}.")
    c = int(num_classes) if num_classes is not None else int(bank_labels.max()) + 1
    if resolve_backend(backend, n) == "faiss":
        return _faiss_sweep(query, bank, bank_labels, ks_c, ts, c, chunk_size or 4096)
    return knn_sweep(query, bank, bank_labels, ks=ks_c, ts=ts, num_classes=c, chunk_size=chunk_size)


def knn_table(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ts: Sequence[float] = (0.07,),
    num_classes: int | None = None,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Rows {"k", "t", "top1", "top5"} (percent) of the kNN sweep, sorted by t then k."""
    counts = knn_counts(train_x, train_y, test_x, test_y, ks=ks, ts=ts, num_classes=num_classes, backend=backend)
    return _rows(counts, int(test_y.shape[0]))


def knn_counts(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ts: Sequence[float] = (0.07,),
    num_classes: int | None = None,
    backend: str = "auto",
) -> dict[tuple[int, float], dict[str, int]]:
    """{(k, t): {"top1": n, "top5": n}}: how many test rows the kNN sweep gets right. Counts of
    query slices add up to those of the whole test set (`knn_evaluate` across ranks)."""
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    scores = knn_scores(test_x, train_x, train_y, ks=ks, ts=ts, num_classes=c, backend=backend)
    return {key: topk_correct(s, test_y, votes=True) for key, s in scores.items()}


def _rows(counts: dict[tuple[int, float], dict[str, int]], total: int) -> list[dict[str, Any]]:
    rows = [{"k": k, "t": t, **percent(n, total)} for (k, t), n in counts.items()]
    return sorted(rows, key=lambda r: (r["t"], r["k"]))


def knn_evaluate(
    subject: Any,
    train: Any,
    test: Any,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ts: Sequence[float] = (0.07,),
    bank: Tensor | None = None,
    batch_size: int = 256,
    cache: Any = None,
    backend: str = "auto",
    progress: bool = False,
    keep_device: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """Weighted kNN of a `Subject` on a train / test pair of `ImageSet`s: `embed_pair` then
    `knn_table` (rows {"k", "t", "top1", "top5"}). ``bank``: train features to use instead of
    embedding the train split (the training loop's monitor passes its memory bank).

    ``shard=(rank, world)``, under torch.distributed (every rank calls with the same arguments):
    the splits are embedded once across ranks (`extract` shards and gathers), then each rank scores
    only its contiguous share of the test queries against the whole train side; the counts of right
    answers are summed over ranks, so every rank returns the rows one process would, for 1/world of
    the scoring.
    """
    from instdisc.evaluate.extraction import embed_pair

    rank, world = shard
    ev = embed_pair(subject, train, test, "embedding", bank=bank, batch_size=batch_size, cache=cache,
                    progress=progress, keep_device=keep_device or world > 1)
    if world == 1:
        return knn_table(ev.train_x, ev.train_y, ev.test_x, ev.test_y, ks=ks, ts=ts,
                         num_classes=ev.num_classes, backend=backend)
    from instdisc import dist

    mine = dist.shard_range(len(ev.test_y), rank, world)
    counts = knn_counts(ev.train_x, ev.train_y, ev.test_x[mine.start:mine.stop], ev.test_y[mine.start:mine.stop],
                        ks=ks, ts=ts, num_classes=ev.num_classes, backend=backend) if len(mine) else {}
    keys = [(k, t) for k in sorted({min(int(k), ev.train_x.shape[0]) for k in ks}) for t in ts]
    # (len(keys) * 2,) right answers among this rank's queries, summed over ranks (exact integers).
    flat = torch.tensor([counts[key][name] if key in counts else 0 for key in keys for name in ("top1", "top5")],
                        dtype=torch.int64, device=ev.train_x.device)
    dist.all_reduce_(flat)
    it = iter(flat.tolist())
    return _rows({key: {name: int(next(it)) for name in ("top1", "top5")} for key in keys}, len(ev.test_y))


def knn_row(rows: list[dict[str, Any]], k: int, t: float) -> dict[str, Any]:
    """The row of (k, t) in `knn_table` rows; k is clipped to the bank as the sweep clips it."""
    ks = sorted({r["k"] for r in rows})
    k = min(k, ks[-1]) if ks else k
    return next(r for r in rows if r["k"] == k and r["t"] == t)


@torch.no_grad()
def nearest(
    query: Tensor, bank: Tensor, k: int, *, chunk_size: int = 1024, backend: str = "torch"
) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours: (Q, k) similarities (descending) and (Q, k) bank indices.

    ``backend``: "torch" (chunked matmul + top-k), "faiss" (exact IndexFlatIP, the same
    neighbours up to ties) or "auto" (`resolve_backend`: faiss for banks of `FAISS_MIN_ROWS`+ rows)."""
    k = min(k, bank.shape[0])
    if resolve_backend(backend, bank.shape[0]) == "faiss":
        return _faiss_nearest(query, bank, k, chunk_size)
    bank = F.normalize(bank.float(), dim=1)
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk_size):
        s = F.normalize(query[start : start + chunk_size].float(), dim=1) @ bank.t()  # (q, N)
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def _faiss_nearest(query: Tensor, bank: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(bank.shape[1])  # exact inner product = cosine on normalised rows
    index.add(np.ascontiguousarray(F.normalize(bank.float().cpu(), dim=1).numpy()))
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float().cpu(), dim=1)
        s, i = index.search(np.ascontiguousarray(q.numpy()), k)  # (q, k) each, sorted descending
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i).long())
    return torch.cat(sims), torch.cat(idx)
