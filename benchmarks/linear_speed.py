"""Bar: the linear probe on exported CIFAR-10-sized features (50,000 x 512 train, 10,000 test,
10 classes) finishes in <= 2 minutes on the CPU, with the default protocol (3 learning rates on a
held-out tenth, then the retrain: 4 x 100 epochs of SGD). Random features with a planted linear
signal, so the accuracy is meaningful (it must be well above chance) but says nothing about
any model.

  python benchmarks/linear_speed.py [--train 50000] [--dim 512] [--epochs 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from instdisc.evaluate import linear_probe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--norm", default="bn")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g) * 0.15
    ytr = torch.randint(0, args.classes, (args.train,), generator=g)
    yte = torch.randint(0, args.classes, (args.test,), generator=g)
    # Non-negative like pooled post-ReLU ResNet features.
    xtr = torch.relu(centres[ytr] + torch.randn(args.train, args.dim, generator=g))
    xte = torch.relu(centres[yte] + torch.randn(args.test, args.dim, generator=g))
    t0 = time.perf_counter()
    res = linear_probe(xtr, ytr, xte, yte, num_classes=args.classes, epochs=args.epochs, norm=args.norm)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "train": list(xtr.shape), "test": list(xte.shape),
        "epochs": args.epochs, "lrs": [float(k) for k in res["val_top1"]] or [res["lr"]], "chosen_lr": res["lr"],
        "top1": round(res["top1"], 2), "top5": round(res["top5"], 2), "wall_s": round(wall, 1),
        "bar_s": 120, "met": wall <= 120,
    }, indent=2))


if __name__ == "__main__":
    main()
