"""kNN top-5: count only classes that received votes, or every class as the published NPID code does.

    python benchmarks/knn_top5_rule.py RUN_DIR [--ks 1 3 5 10 20 200] [--t 0.07]

Embeds the run's training and test splits (`instdisc.embed`), takes the weighted-kNN votes for each
k and prints, per k, the share of test queries with fewer than 5 voted classes, top-1, top-5 as
instdisc counts it (`topk_correct(votes=True)`) and top-5 as the published code counts it (the
top 5 of all C scores, unvoted classes in the sort's tie order). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import torch

import instdisc
from instdisc.knn import knn_sweep, topk_correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10, 20, 200])
    ap.add_argument("--t", type=float, default=0.07)
    args = ap.parse_args()
    enc = instdisc.load(args.run, device="cpu")
    train, test = instdisc.embed(enc, split="train"), instdisc.embed(enc, split="test")
    tx, ty = torch.as_tensor(train.features), torch.as_tensor(train.labels)
    qx, qy = torch.as_tensor(test.features), torch.as_tensor(test.labels)
    c = len(train.classes)
    sweep = knn_sweep(qx, tx, ty, ks=args.ks, ts=(args.t,), num_classes=c)
    print(f"{args.run}: {len(ty)} train, {len(qy)} test, C = {c}, t = {args.t}")
    print(f"{'k':>5} {'<5 voted %':>11} {'top-1 %':>8} {'top-5 voted %':>14} {'top-5 all-C %':>14}")
    for (k, _t), scores in sorted(sweep.items()):
        n = len(qy)
        few = 100 * float(((scores > 0).sum(1) < 5).float().mean())
        ours, theirs = topk_correct(scores, qy, votes=True), topk_correct(scores, qy)
        print(f"{k:>5} {few:>11.2f} {100 * ours['top1'] / n:>8.2f} {100 * ours['top5'] / n:>14.2f} "
              f"{100 * theirs['top5'] / n:>14.2f}")


if __name__ == "__main__":
    main()
