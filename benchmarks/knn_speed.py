"""Bar: weighted kNN (k=200) of 10,000 queries against a 50,000 x 128 bank costs <= 1.5x the bare
similarity matmul (its floor), measured in the same run; and a 1,000,000-row bank runs in bounded
memory (peak RSS growth reported).

The floor and the kNN are timed in turn within each repeat, so that a machine shared with other
work slows both alike; medians and the spread (min-max) over the repeats are reported, in
wall time and in this process's CPU time (less sensitive to other processes on a busy machine).

  python benchmarks/knn_speed.py [--repeats 7] [--big-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
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


def interleaved(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [s, ...], "cpu": [s, ...]}}, the functions run in turn in every repeat."""
    for fn in fns.values():
        fn()  # warm-up
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            out[name]["cpu"].append(time.process_time() - c)
            out[name]["wall"].append(time.perf_counter() - w)
    return out


def summary(ts: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(ts), 4), "min": round(min(ts), 4), "max": round(max(ts), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
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
    times = interleaved({
        "matmul": lambda: query @ bank.t(),
        "knn": lambda: weighted_knn(query, bank, labels, k=200, t=0.07),
    }, args.repeats)
    ratios = {kind: [k / f for k, f in zip(times["knn"][kind], times["matmul"][kind], strict=True)]
              for kind in ("wall", "cpu")}
    knn = statistics.median(times["knn"]["wall"])
    sweep = timeit(lambda: knn_sweep(query, bank, labels, ks=(10, 20, 100, 200), ts=(0.07,)), 3)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "wall_s": {name: summary(t["wall"]) for name, t in times.items()},
        "cpu_s": {name: summary(t["cpu"]) for name, t in times.items()},
        "ratio_knn_over_matmul_wall": summary(ratios["wall"]),
        "ratio_knn_over_matmul_cpu": summary(ratios["cpu"]),
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
