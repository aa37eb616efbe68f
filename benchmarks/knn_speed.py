"""Bar: weighted kNN (k=200) of 10,000 queries against a 50,000 x 128 bank costs <= 1.5x the bare
similarity matmul (its floor), measured in the same run; and a 1,000,000-row bank runs in bounded
memory (peak RSS growth reported).

  python benchmarks/knn_speed.py [--repeats 5] [--big-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
import torch.nn.functional as F

from instdisc.knn import knn_sweep, weighted_knn


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50_000, 128, generator=g), dim=1)
    query = F.normalize(torch.randn(10_000, 128, generator=g), dim=1)
    labels = torch.randint(0, 10, (50_000,), generator=g)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = F.normalize(torch.randn(args.big_rows, 128, generator=g), dim=1)
    big_labels = torch.randint(0, 1000, (args.big_rows,), generator=g)
    after_alloc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    weighted_knn(query[:2000], big, big_labels, k=200, t=0.07)  # (2000, 1M) at once would be 8 GB
    big_time = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    floor = timeit(lambda: query @ bank.t(), args.repeats)
    knn = timeit(lambda: weighted_knn(query, bank, labels, k=200, t=0.07), args.repeats)
    sweep = timeit(lambda: knn_sweep(query, bank, labels, ks=(10, 20, 100, 200), ts=(0.07,)), args.repeats)

    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "matmul_floor_s": round(floor, 4),
        "knn_k200_s": round(knn, 4),
        "ratio_knn_over_matmul": round(knn / floor, 3),
        "sweep_4k_s": round(sweep, 4),
        "ratio_sweep_over_single_k": round(sweep / knn, 3),
        "big_bank_rows": args.big_rows,
        "big_bank_2000_queries_s": round(big_time, 2),
        "big_bank_tensor_mib": round(big.numel() * 4 / 2**20),
        "peak_rss_growth_during_big_knn_mib": round((peak - after_alloc) / 1024),
        "rss_before_big_mib": round(before / 1024),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
