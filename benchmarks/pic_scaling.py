"""Bar: PIC's step time and classifier memory barely grow from N = 50,000 to N = 1,280,000 images
with negative sampling on (target: both ratios <= 1.2); with it off both grow about with N.

The classifier is the only part of PIC whose size depends on N, so the network is a stand-in: the
"images" are random feature vectors (B, F) and the backbone is the identity, followed by PIC's
MLP head. Batches walk through a random permutation of [0, N), as an epoch does. One process, one
run; for each configuration the two N are stepped alternately (so that load on a shared machine
hits both alike) and the median step time (forward, backward, optimiser step) is reported.

Classifier memory = the bytes that would live on the training device for the classifier: its
parameters, buffers and optimiser state, plus the step's sampled rows (their leaf and momentum),
i.e. everything of PIC's minus the head's parameters and their momentum. With --rows-on host the
N-row tables stay in host memory and are not counted (they are reported separately).

  python benchmarks/pic_scaling.py [--batch 256] [--queue 16384] [--steps 15] [--device cpu]
(about 2.5 minutes on a 2-core CPU, most of it the full classifier at N = 1.28M)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from instdisc.methods.pic import PIC, PICConfig


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def classifier_bytes(m: PIC, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(device-side bytes of the classifier, host-side bytes of its row tables)."""
    head = {id(p) for p in m.head.parameters()}
    dev = nbytes(p for p in m.parameters() if id(p) not in head) + nbytes(m.buffers())
    dev += nbytes(v for p, s in opt.state.items() if id(p) not in head for v in s.values() if torch.is_tensor(v))
    host = 0
    if m.rows is not None:
        dev += 2 * nbytes([m.rows.leaf])  # the step's sampled rows and their momentum rows
        if m.rows.host:
            host = nbytes([m.rows.weight, m.rows.momentum, m.rows.last_step])
    return dev, host


class Case:
    """One PIC model at one N, stepping through a permutation of [0, N) (an epoch's order)."""

    def __init__(self, n: int, queue: int, rows_on: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.args, self.n = args, n
        cfg = PICConfig(dim=128, small_crops=0, queue_size=queue, rows_on=rows_on)
        self.m = PIC(nn.Identity(), args.feat, n, cfg).to(args.device)
        self.opt = self.m.configure_optimizer(lr=0.03, momentum=0.9, weight_decay=1e-4)
        self.gen = torch.Generator().manual_seed(1)
        self.order, self.pos, self.times = torch.randperm(n, generator=self.gen), 0, []

    def step(self, timed: bool) -> None:
        a = self.args
        if self.pos + a.batch > self.n:
            self.pos = 0
        idx = self.order[self.pos : self.pos + a.batch].to(a.device)
        self.pos += a.batch
        x = torch.randn(a.batch, a.feat, generator=self.gen).to(a.device)
        t0 = time.perf_counter()
        out = self.m([x], idx)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)

    def result(self) -> dict[str, float]:
        dev, host = classifier_bytes(self.m, self.opt)
        median = sorted(self.times)[len(self.times) // 2]  # robust to a shared machine's hiccups
        return {"step_s": median, "classifier_device_MB": dev / 2**20, "rows_host_MB": host / 2**20}


def compare(queue: int, rows_on: str, args: argparse.Namespace, steps: int, warmup: int) -> tuple[dict, dict]:
    """Small and large N stepped alternately, so that load on the machine hits both alike."""
    small, large = Case(args.small, queue, rows_on, args), Case(args.large, queue, rows_on, args)
    for i in range(warmup + steps):
        small.step(timed=i >= warmup)
        large.step(timed=i >= warmup)
    res = small.result(), large.result()
    del small, large
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=50_000)
    ap.add_argument("--large", type=int, default=1_280_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--feat", type=int, default=512, help="stand-in backbone feature size (ResNet-18: 512)")
    ap.add_argument("--queue", type=int, default=16384, help="queue of recent ids (< --small; paper: 65536)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps with sampling (median reported)")
    ap.add_argument("--dense-steps", type=int, default=3, help="timed steps of the full classifier (slow at large N)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, device {args.device}, batch {args.batch}, queue {args.queue}")
    modes = [("sampled, rows on host", args.queue, "host"), ("sampled, rows on device", args.queue, "device"),
             ("full classifier (no sampling)", 0, "device")]
    results = {}
    for name, q, where in modes:
        steps, warmup = (args.steps, args.warmup) if q else (args.dense_steps, 1)
        small, large = compare(q, where, args, steps, warmup)
        ratio_t = large["step_s"] / small["step_s"]
        ratio_m = large["classifier_device_MB"] / small["classifier_device_MB"]
        results[name] = {"small": small, "large": large, "time_ratio": ratio_t, "memory_ratio": ratio_m}
        print(f"{name:32s} step {small['step_s'] * 1e3:8.1f} -> {large['step_s'] * 1e3:8.1f} ms (x{ratio_t:.2f}); "
              f"classifier on device {small['classifier_device_MB']:8.1f} -> {large['classifier_device_MB']:8.1f} MB "
              f"(x{ratio_m:.2f}); rows in host memory {large['rows_host_MB']:.0f} MB at N={args.large:,}")
    host = results["sampled, rows on host"]
    ok = host["time_ratio"] <= 1.2 and host["memory_ratio"] <= 1.2
    print(f"bar (negative sampling, rows on host: both ratios <= 1.2): {'met' if ok else 'NOT met'}")
    print(json.dumps({k: {"time_ratio": round(v["time_ratio"], 3), "memory_ratio": round(v["memory_ratio"], 3)}
                      for k, v in results.items()}))


if __name__ == "__main__":
    main()
