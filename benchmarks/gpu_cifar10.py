"""Train a preset, evaluate weighted kNN (k = 200) on the test split, write the numbers as JSON.

Measures one training command (it may be one link of a chain, see docs/gpu.md): its wall time,
the training throughput over every epoch logged so far, the peak memory of this process (CUDA:
torch.cuda.max_memory_allocated; CPU: the resident set's high-water mark, ru_maxrss, DataLoader
workers not included), and the weighted kNN accuracy of the last checkpoint with training features
recomputed by the eval transform (as the NPID paper reports it).

  python benchmarks/gpu_cifar10.py --config configs/npid_cifar10_softmax.yaml --data PATH \\
      --out runs/gpu_npid_softmax --json runs/gpu_npid_softmax.json [any `instdisc train` flag...]
  # CPU smoke test: --data synthetic:512 --epochs 1 --width 8 --device cpu

Flags other than --config, --data, --out and --json go to `instdisc train` unchanged (e.g.
--epochs, --precision bf16, --compile, --optimizer-impl fused, --time-limit 9, --resume).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from instdisc.cli import main as instdisc_main
from instdisc.dist import resolve_device
from instdisc.methods import read_run

KNN_K = 200  # NPID's evaluation (Wu et al. 2018, Sec. 4.1)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def peak_memory_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def throughput(metrics: Path) -> dict[str, float]:
    """Images and seconds of training over every epoch record in metrics.jsonl (all links of a chain)."""
    images = seconds = 0.0
    epochs = 0
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "epoch":
            images += rec["img_per_s"] * rec["time_s"]
            seconds += rec["time_s"]
            epochs = max(epochs, int(rec["epoch"]))
    return {"train_images": images, "train_s": seconds, "train_img_per_s": images / max(seconds, 1e-9),
            "epochs_done": epochs}


def knn_of_checkpoint(run: Path, dev: torch.device) -> dict[str, Any]:
    """Weighted kNN of the run's last checkpoint, as `instdisc knn RUN -k 200` computes it."""
    from instdisc.errors import DataError
    from instdisc.evaluate import knn_evaluate, knn_row, load_subject, open_eval_sets

    subject = load_subject(run, device=dev)
    t = subject.config["run"]["knn_t"]
    try:
        train, test = open_eval_sets(subject, None)
    except DataError:
        return {"knn_top1": None, "knn_top5": None, "knn_k": KNN_K, "test_images": 0}
    if train.labels is None or test.labels is None:
        return {"knn_top1": None, "knn_top5": None, "knn_k": KNN_K, "test_images": 0}
    row = knn_row(knn_evaluate(subject, train, test, ks=(KNN_K,), ts=(t,), keep_device=True), KNN_K, t)
    return {"knn_top1": row["top1"], "knn_top5": row["top5"], "knn_k": KNN_K, "knn_t": t,
            "test_images": len(test), "step": int(read_run(run)[1]["state"]["step"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="preset YAML, e.g. configs/npid_cifar10.yaml")
    ap.add_argument("--data", required=True, help="training data (e.g. the CIFAR-10 tarball)")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--json", default=None, help="where to write the results (default OUT/benchmark.json)")
    args, passthrough = ap.parse_known_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    rc = instdisc_main(["train", "--config", args.config, "--data", args.data, "--out", str(out), *passthrough])
    train_wall = time.perf_counter() - t0
    if rc != 0:
        return rc
    cfg, _ = read_run(out)
    dev = resolve_device(cfg.run.device)
    peak = peak_memory_mib(dev)  # of training: taken before the evaluation allocates its own
    res: dict[str, Any] = {
        "preset": args.config, "data": args.data, "flags": passthrough, "epochs": cfg.optim.epochs, "device": dev.type,
        "device_name": device_name(dev), "torch": torch.__version__, "precision": cfg.run.precision,
        "compile": cfg.run.compile, "channels_last": cfg.run.channels_last, "in_memory": cfg.data.in_memory,
        "optimizer_impl": cfg.optim.optimizer_impl, "batch_size": cfg.optim.batch_size,
        "train_wall_s": train_wall, "peak_memory_mib": peak,
    }
    res.update(throughput(out / "metrics.jsonl"))
    res.update(knn_of_checkpoint(out, dev))
    res["complete"] = res["epochs_done"] >= cfg.optim.epochs
    res["wall_s"] = time.perf_counter() - t0
    path = Path(args.json) if args.json else out / "benchmark.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
