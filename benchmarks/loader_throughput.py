"""Images/s of the two data paths in one run: the in-memory device path (the dataset as one uint8
tensor on the training device, batches by index_select, no workers) against the DataLoader path
(DataLoader workers read the images on the host, the batch is copied to the device), feeding the
same model the same batches with the same on-device augmentation. Repeats alternate the two paths
so drift in machine speed hits both alike; the median repeat is reported.

Two numbers per path: "train" is whole training steps (batch, augmentation, forward, backward, SGD),
"loader" is the batches alone (what the path can deliver at most). Each timed repeat starts a fresh
epoch iterator, so the workers' start-up is paid as in training (once per epoch, amortised over
`--steps` steps rather than a whole epoch).

  python benchmarks/loader_throughput.py --config configs/npid_cifar10.yaml --data PATH \\
      --device cuda --precision bf16 --compile --workers 8 --steps 100 --json loader.json
  # CPU smoke test:
  python benchmarks/loader_throughput.py --data synthetic:256 --set nce_k=16 --width 4 --batch-size 32 --steps 3 \\
      --repeats 1 --workers 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import yaml

from instdisc.augment import augment
from instdisc.config import load_preset
from instdisc.engine import autocast_dtype, build_method, step_seed
from instdisc.loader import TrainLoader
from instdisc.methods import resolve_config
from instdisc.runtime import build_optimizer
from instdisc.sources import open_source

HERE = os.path.dirname(os.path.abspath(__file__))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], int], dev: torch.device) -> float:
    """Images per second of fn(), which returns the number of images it processed."""
    sync(dev)
    t0 = time.perf_counter()
    images = fn()
    sync(dev)
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "npid_cifar10.yaml"))
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "cifar10-jpeg.tar.gz"))
    ap.add_argument("--width", type=int, default=None, help="override the preset's --width")
    ap.add_argument("--batch-size", type=int, default=None, help="override the preset's --batch-size")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override any preset key (YAML value), e.g. --set nce_k=16 image_size=16")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per repeat and path")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotuning)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of the streamed path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--optimizer-impl", default="auto", choices=["auto", "plain", "foreach", "fused"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    preset = load_preset(args.config)
    method_name = preset.pop("method", "npid")
    overrides = {k: v for k, v in {"width": args.width, "batch_size": args.batch_size}.items() if v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    cfg = resolve_config({**preset, **overrides, "data": args.data}, {}, method_name)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    train = open_source(cfg.data.data, "train", cache_dir=cfg.data.cache_dir, image_size=cfg.data.image_size,
                        progress=False)
    n, batch = len(train), cfg.optim.batch_size
    amp = autocast_dtype(args.precision, dev)

    torch.manual_seed(0)
    method = build_method(cfg, n).to(dev)
    if args.channels_last:
        method = method.to(memory_format=torch.channels_last)
    opt = build_optimizer(method, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay, impl=args.optimizer_impl)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    model = torch.compile(method) if args.compile else method
    view_cfgs = method.views(cfg.aug)
    paths = {name: TrainLoader(train, batch, seed=0, device=dev, workers=args.workers, in_memory=name == "in_memory")
             for name in ("in_memory", "streamed")}
    steps = max(1, min(args.steps, paths["in_memory"].steps_per_epoch()))
    counter = [0]

    def train_steps(loader: TrainLoader, epoch: int, count: int) -> int:
        seen = 0
        for i, (x, idx) in enumerate(loader.epoch(epoch)):
            if i == count:
                break
            s = step_seed(0, counter[0], 0)
            counter[0] += 1
            torch.manual_seed(s)
            gen = torch.Generator(device=dev).manual_seed(s)
            with torch.no_grad():
                views = [augment(x, vc, gen) for vc in view_cfgs]
            if args.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(views, idx).loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += x.shape[0]
        return seen

    def load_only(loader: TrainLoader, epoch: int, count: int) -> int:
        seen = 0
        for i, (x, _) in enumerate(loader.epoch(epoch)):
            if i == count:
                break
            seen += x.shape[0]
        return seen

    train_steps(paths["in_memory"], 0, args.warmup)
    train_steps(paths["streamed"], 0, 1)  # a recompilation for this path's tensors, if any, stays untimed
    rates: dict[str, dict[str, list[float]]] = {p: {"train": [], "loader": []} for p in paths}
    for r in range(args.repeats):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            rates[name]["loader"].append(timed(lambda ld=paths[name], e=r + 1: load_only(ld, e, steps), dev))
            rates[name]["train"].append(timed(lambda ld=paths[name], e=r + 1: train_steps(ld, e, steps), dev))

    res: dict[str, Any] = {
        "device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "data": cfg.data.data, "images": n, "method": method_name,
        "arch": cfg.model.arch, "width": cfg.model.width, "batch_size": batch, "steps": steps,
        "repeats": args.repeats, "workers": args.workers, "precision": "fp32" if amp is None else str(amp)[6:],
        "channels_last": args.channels_last, "compile": args.compile, "optimizer_impl": args.optimizer_impl,
        "threads": torch.get_num_threads(),
    }
    for name in paths:
        res[name] = {f"{k}_img_per_s": round(statistics.median(v), 1) for k, v in rates[name].items()}
    res["speedup_train"] = round(res["in_memory"]["train_img_per_s"] / res["streamed"]["train_img_per_s"], 3)
    res["speedup_loader"] = round(res["in_memory"]["loader_img_per_s"] / res["streamed"]["loader_img_per_s"], 3)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
