"""Cost of the label-free quality signals against an epoch, measured in one process.

    python benchmarks/quality_cost.py --config configs/npid_cifar10_cpu.yaml --data ../shared/data/cifar10-jpeg.tar.gz

Times `engine.evaluate_quality` (default --quality-subset for the data) and `--steps` training
steps of the same model, interleaved, `--repeats` times; prints the median ratio of the signals'
time to one epoch's (steps/epoch x time per step). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from instdisc import dist
from instdisc.config import load_preset
from instdisc.engine import (
    StepParts,
    autocast_dtype,
    evaluate_quality,
    fill_size_defaults,
    lr_schedule,
    open_sets,
    train_steps,
)
from instdisc.guard import NonFiniteGuard
from instdisc.loader import TrainLoader, make_order
from instdisc.methods import resolve_config
from instdisc.methods.build import build_method
from instdisc.quality import QualityState
from instdisc.rundir import TrainState
from instdisc.runtime import build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    preset = load_preset(a.config)
    cfg = resolve_config({**preset, "data": a.data, "out": "/tmp/quality-cost"}, {}, preset.get("method", "npid"))
    env = dist.Env()
    train, _ = open_sets(cfg)
    fill_size_defaults(cfg, len(train), len(train.classes))
    method = build_method(cfg, len(train)).to(memory_format=torch.channels_last) if cfg.run.channels_last else build_method(cfg, len(train))
    o = cfg.optim
    opt = build_optimizer(method, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, impl=o.optimizer_impl)
    views = method.views(cfg.aug)
    loader = TrainLoader(train, o.batch_size, seed=0, rank=0, world_size=1, device=env.device, workers=cfg.data.workers,
                         order=make_order(cfg.data.sampler, len(train), seed=0, window=cfg.data.window,
                                          stride=cfg.data.stride, batch_size=o.batch_size),
                         in_memory=cfg.data.in_memory, views=views)
    spe = loader.steps_per_epoch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = NonFiniteGuard(method, max_skips=0, check_grads=True, debug_dir=Path("/tmp/quality-cost/debug"), rank=0, is_main=True, config={})
    parts = StepParts(method, opt, scaler, autocast_dtype(cfg.run.precision, env.device), guard,
                      lr_schedule(o, spe), views, 0, o.clip_grad, cfg.run.channels_last)
    state, quality = TrainState(), QualityState()
    ratios, q_s, step_s = [], [], []
    steps = train_steps(parts, loader, state)
    for rep in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            next(steps)
        per_step = (time.perf_counter() - t0) / a.steps
        t0 = time.perf_counter()
        evaluate_quality(method, train, cfg, env, quality, rep)
        q = time.perf_counter() - t0
        ratios.append(q / (per_step * spe))
        q_s.append(q)
        step_s.append(per_step)
    print(json.dumps({"config": a.config, "N": len(train), "quality_subset": cfg.run.quality_subset,
                      "steps_per_epoch": spe, "quality_s": [round(x, 2) for x in q_s],
                      "step_s": [round(x, 4) for x in step_s], "ratio_median": round(statistics.median(ratios), 4),
                      "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
