"""Bar: CPU step throughput of the whole NPID pipeline (batch from the uint8 dataset + batched
augmentation + backbone + head + memory bank + loss + backward + SGD + bank update) is >= 90% of
the bare backbone step (forward + backward + SGD on a ready float batch), batch 128, same run.

Also compares NPID's negatives drawn per sample (paper code, a B x K x D gather) with one shared
set per batch (one B x D . D x K product).

  python benchmarks/throughput.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--width 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from instdisc.augment import augment
from instdisc.engine import autocast_dtype, build_method
from instdisc.guard import NonFiniteGuard
from instdisc.loader import TrainLoader
from instdisc.methods import resolve_config
from instdisc.sources import open_source


def bench(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10-jpeg.tar.gz"))
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--configs", nargs="+", default=None, help="subset of the NPID variants to time")
    args = ap.parse_args()
    data = args.data if os.path.exists(args.data) else "synthetic:50000"
    train = open_source(data, "train")
    results = {"data": data, "n": len(train), "width": args.width, "batch": args.batch_size,
               "precision": args.precision, "threads": torch.get_num_threads(),
               "machine": platform.machine(), "torch": torch.__version__}
    dev = torch.device("cpu")
    amp = autocast_dtype(args.precision, dev)

    def make(**method_kw):
        cfg = resolve_config({"width": args.width, "batch_size": args.batch_size, **method_kw}, {}, "npid")
        torch.manual_seed(0)
        m = build_method(cfg, len(train)).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
        return cfg, m, opt

    # Bare backbone: a fixed, ready float batch; forward, a trivial loss, backward, SGD.
    cfg, m, opt = make()
    x0 = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def bare():
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = m.backbone(x0).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name, kw in [("nce4096_shared", dict(nce_k=4096, negatives="shared")),
                     ("nce4096_per_sample", dict(nce_k=4096, negatives="per-sample")),
                     ("softmax65536_shared", dict(nce_k=min(65536, len(train) - 1), loss="softmax")),
                     ("full_softmax", dict(nce_k=0, nce_t=0.1))]:
        if args.configs and name not in args.configs:
            continue
        cfg, m2, opt2 = make(**kw)
        loader = TrainLoader(train, args.batch_size, seed=0)
        batches = loader.epoch(0)
        gen = torch.Generator().manual_seed(0)
        guard = NonFiniteGuard(m2, max_skips=0, check_grads=True, debug_dir=Path("/nonexistent"), rank=0,
                               is_main=True, config={})

        def pipeline(batches=batches, cfg=cfg, gen=gen, m2=m2, opt2=opt2, guard=guard):
            x, idx = next(batches)
            with torch.no_grad():
                v = augment(x, cfg.aug, gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                out = m2([v], idx)
            opt2.zero_grad(set_to_none=True)
            out.loss.backward()
            guard.check(out.loss, 0.0)  # the loop's per-step NaN/inf check (gradient norm + one sync)
            opt2.step()

        # Interleave A/B repeats so drift in machine speed hits both alike.
        t_bare, t_pipe = [], []
        for _ in range(3):
            t_bare.append(bench(bare, args.steps // 3))
            t_pipe.append(bench(pipeline, args.steps // 3))
        tb, tp = sorted(t_bare)[1], sorted(t_pipe)[1]
        results[name] = {"bare_img_s": round(args.batch_size / tb), "pipeline_img_s": round(args.batch_size / tp),
                         "ratio": round(tb / tp, 3)}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
