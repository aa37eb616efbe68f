"""Bar: a weighted-kNN sweep over k = 10, 20, 100, 200 costs <= 1.3x one single-k kNN (k = 200),
both measured in this run on 10,000 queries x 50,000 x 128 bank (the sweep shares one similarity
pass and one top-k). Also reported: the sweep with two temperatures, and the faiss backend on the
same problem (identical predictions are checked).

  python benchmarks/knn_sweep_speed.py [--repeats 3] [--no-faiss]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from knn_speed import timeit  # the same median-of-repeats timer (this folder is on sys.path)

from instdisc.evaluate import faiss_available, knn_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--bank", type=int, default=50_000)
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.bank, 128, generator=g), dim=1)
    query = F.normalize(torch.randn(args.queries, 128, generator=g), dim=1)
    labels = torch.randint(0, 10, (args.bank,), generator=g)

    def run(ks, ts, backend="torch"):
        return knn_scores(query, bank, labels, ks=ks, ts=ts, num_classes=10, backend=backend)

    single = timeit(lambda: run((200,), (0.07,)), args.repeats)
    sweep = timeit(lambda: run((10, 20, 100, 200), (0.07,)), args.repeats)
    sweep_2t = timeit(lambda: run((10, 20, 100, 200), (0.07, 0.1)), args.repeats)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "problem": f"{args.queries} x {args.bank} x 128",
        "single_k200_s": round(single, 3),
        "sweep_4k_s": round(sweep, 3),
        "ratio_sweep_over_single": round(sweep / single, 3),
        "sweep_4k_2t_s": round(sweep_2t, 3),
        "ratio_sweep_2t_over_single": round(sweep_2t / single, 3),
        "bar": 1.3,
        "met": sweep / single <= 1.3,
    }
    if faiss_available() and not args.no_faiss:
        a = run((10, 20, 100, 200), (0.07,))
        b = run((10, 20, 100, 200), (0.07,), backend="faiss")
        res["faiss_sweep_4k_s"] = round(timeit(lambda: run((10, 20, 100, 200), (0.07,), "faiss"), 1), 3)
        res["faiss_same_predictions"] = all(torch.equal(a[k].argmax(1), b[k].argmax(1)) for k in a)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
