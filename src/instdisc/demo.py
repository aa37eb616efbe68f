"""The offline demo: NPID on scikit-learn's handwritten digits, on CPU, in under three minutes.

It trains a narrow CIFAR-style ResNet-18 with NPID's full softmax over a memory bank of the 1,437
training digits (upsampled to 16x16), then compares weighted kNN on the 360 held-out digits for
the learned features and for the same network at its random initialisation. No download: the
digits ship with scikit-learn. Expect a modest gain: on digits, raw-pixel similarity is already a
strong classifier, so even random convolutional features score around 90%.
"""

from __future__ import annotations

import json
import time

import torch

from instdisc import dist
from instdisc.config import resolve
from instdisc.engine import build_method, evaluate_knn, fit, open_sets

# Chosen for a 2-core CPU (evidence: docs/benchmarks.md). The 8x8 digits are stored at 16x16,
# not 32x32: 4x fewer pixels buy 4x more steps, and NPID needs steps (each image is seen ~60 times).
DEMO_PRESET = {
    "data": "digits",
    "image_size": 16,
    "aug_size": 16,
    "arch": "resnet18",
    "width": 16,
    "epochs": 60,
    "batch_size": 32,
    "lr": 0.03,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "nce_k": 0,  # 1,437 images: the full softmax over the bank is cheap and the paper's best
    "nce_t": 0.1,
    "knn_t": 0.1,
    "knn_k": 20,  # 360 test images, ~144 training images per class
    "knn_every": 10,
    # Digits are not mirror-symmetric and are small: no flips, milder crops.
    "aug_flip_p": 0.0,
    "aug_scale": [0.4, 1.0],
    "device": "cpu",
}


def run_demo(out: str = "runs/demo", epochs: int | None = None, overwrite: bool = True) -> dict[str, float]:
    preset = dict(DEMO_PRESET, out=out)
    if epochs is not None:
        preset["epochs"] = epochs
    cfg = resolve(preset, {}, "npid")
    env = dist.Env()
    t0 = time.perf_counter()
    fit(cfg, env, overwrite=overwrite)
    train_min = (time.perf_counter() - t0) / 60

    # The same network (same seed) before any training, evaluated the same way.
    train, test = open_sets(cfg)
    assert test is not None
    torch.manual_seed(cfg.run.seed)
    random_init = build_method(cfg, len(train)).to(env.device)
    rand = evaluate_knn(random_init, train, test, cfg, env, use_bank=False)
    records = [json.loads(ln) for ln in open(f"{out}/metrics.jsonl")]
    learned = [r for r in records if r["type"] == "final"][-1]
    print()
    print(f"weighted kNN top-1 on {len(test)} held-out digits (k={cfg.run.knn_k}, t={cfg.run.knn_t}):")
    print(f"  random initialisation : {rand['knn_top1']:6.2f}%")
    gain = learned["knn_top1"] - rand["knn_top1"]
    print(f"  NPID, {cfg.optim.epochs} epochs      : {learned['knn_top1']:6.2f}%  "
          f"({gain:+.2f} points, trained in {train_min:.1f} min)")
    print(f"run outputs: {out}/ (config.json, metrics.jsonl, checkpoints/last.pt)")
    print(f"next: instdisc embed {out} --split test --out {out}/test.npy ; "
          f"instdisc knn {out} -k {cfg.run.knn_k} -t {cfg.run.knn_t}")
    return {"random_top1": rand["knn_top1"], "learned_top1": learned["knn_top1"]}
