"""The training loop: one loop for every method (it never looks at the method's name).

fit() builds everything from a TrainConfig and runs epochs; train_one_epoch() is the loop a
reader should see in one sitting. A method only has to turn (views, idx) into a loss.

Reproducibility: every random draw of step s on rank r (data order aside, which is a function of
the epoch) comes from generators seeded with (seed, s, r). Resuming from a checkpoint taken at
any step therefore replays exactly the same augmentations and negatives.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instdisc import __version__, dist
from instdisc.augment import AugmentConfig, augment
from instdisc.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from instdisc.config import OptimConfig, TrainConfig
from instdisc.dist import Env
from instdisc.errors import CheckpointError, DataError, UserError
from instdisc.features import extract_features
from instdisc.knn import knn_accuracy
from instdisc.loader import TrainLoader
from instdisc.methods import METHODS, EpochContext, Method
from instdisc.models import build_backbone
from instdisc.progress import Progress
from instdisc.sources import ImageSet, open_source


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


def build_method(cfg: TrainConfig, num_samples: int) -> Method:
    """Backbone + method from the config alone (also how `embed` rebuilds a checkpoint's model)."""
    backbone, feat_dim = build_backbone(cfg.model.arch, width=cfg.model.width, cifar_stem=cfg.model.cifar_stem)
    return METHODS[cfg.run.method](backbone, feat_dim, num_samples, cfg.method)


def lr_schedule(o: OptimConfig, steps_per_epoch: int) -> Tensor:
    """Learning rate of every step, computed up front: (epochs * steps_per_epoch,)."""
    total = o.epochs * steps_per_epoch
    step = torch.arange(total, dtype=torch.float64)
    epoch = step / steps_per_epoch
    warm = o.warmup_epochs * steps_per_epoch
    if o.schedule == "step":
        drops = sum((epoch.floor() >= m).double() for m in o.milestones) if o.milestones else torch.zeros(total)
        lr = o.lr * o.gamma**drops
    elif o.schedule == "cosine":
        t = ((step - warm) / max(total - warm, 1)).clamp(0, 1)
        lr = o.lr * 0.5 * (1 + torch.cos(math.pi * t))
    else:
        lr = torch.full((total,), o.lr, dtype=torch.float64)
    if warm > 0:
        # Linear warm-up from lr/100, as PIC/MoCo recipes do.
        frac = (step / warm).clamp(max=1)
        lr = torch.where(step < warm, lr * (0.01 + 0.99 * frac), lr)
    return lr


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it. On CPU fp32: measured on a 2-core AVX512-BF16 machine
    # without AMX, bf16 autocast made the ResNet-18 train step 20-30% slower (docs/benchmarks.md).
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


class MetricLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **rec: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, which will be logged again."""
        if self.path is None or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))


@dataclass
class TrainState:
    epoch: int = 0  # current epoch
    epoch_step: int = 0  # steps already done in the current epoch
    step: int = 0  # global step


def train_one_epoch(
    model: nn.Module,
    loader: TrainLoader,
    view_cfgs: list[AugmentConfig],
    optimizer: torch.optim.Optimizer,
    lrs: Tensor,
    state: TrainState,
    *,
    seed: int,
    amp: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    clip_grad: float,
    channels_last: bool,
    max_steps: int,
    on_step: Any,
    bar: Progress,
) -> dict[str, float]:
    """One pass over the epoch's batches; returns the epoch's mean loss and throughput."""
    model.train()
    device = loader.device
    total, count, t0, seen = torch.zeros((), device=device), 0, time.perf_counter(), 0
    for x, idx in loader.epoch(state.epoch, start_step=state.epoch_step):
        s = step_seed(seed, state.step, loader.rank)
        torch.manual_seed(s)  # the method's own draws (e.g. NPID's negatives)
        gen = torch.Generator(device=device).manual_seed(s)
        with torch.no_grad():
            views = [augment(x, vc, gen) for vc in view_cfgs]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[state.step])
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(views, idx)
        loss = out.loss
        if not torch.isfinite(loss).item():
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {state.step} (epoch {state.epoch}). Try a lower "
                "--lr, --precision fp32 or --clip-grad; the last checkpoint is intact for --resume."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        count += 1
        seen += x.shape[0] * loader.world
        state.step += 1
        state.epoch_step += 1
        bar.update(x.shape[0] * loader.world, postfix=f"loss {loss.item():.4f} lr {lrs[state.step - 1]:.4g}")
        on_step(out)
        if max_steps and state.step >= max_steps:
            break
    dt = time.perf_counter() - t0
    return {"loss": (total / max(count, 1)).item(), "img_per_s": seen / max(dt, 1e-9), "time_s": dt}


def open_sets(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """The training set and, if one exists, the evaluation set."""
    d = cfg.data
    kw = dict(cache_dir=d.cache_dir, download=d.download, image_size=d.image_size, progress=dist.is_main())
    train = open_source(d.data, "train", **kw)
    try:
        test = open_source(d.test_data or d.data, "test", **kw)
    except DataError as e:
        if d.test_data:
            raise
        dist.print0(f"note: no test split for kNN monitoring ({e}).")
        test = None
    return train, test


def evaluate_knn(
    method: Method, train: ImageSet, test: ImageSet, cfg: TrainConfig, env: Env, *, use_bank: bool
) -> dict[str, float]:
    """Weighted kNN of test embeddings against the bank (cheap monitor) or re-embedded train set."""
    if train.labels is None or test.labels is None:
        return {}
    a = cfg.aug
    kw = dict(size=a.size, mean=a.mean, std=a.std, device=env.device, workers=cfg.data.workers)
    was_training = method.training
    method.eval()
    bank = method.bank_features() if use_bank else None
    if bank is None:
        bank = extract_features(method.embed, train, **kw)
    query = extract_features(method.embed, test, **kw)
    method.train(was_training)
    num_classes = max(len(train.classes), int(train.labels.max()) + 1)
    res = knn_accuracy(
        query, torch.from_numpy(test.labels), bank, torch.from_numpy(train.labels).to(bank.device),
        k=cfg.run.knn_k, t=cfg.run.knn_t, num_classes=num_classes,
    )
    return {f"knn_{k}": v for k, v in res.items()}


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train over another run unless asked to resume or overwrite."""
    has_run = (out / "config.json").exists() or checkpoint_dir(out).exists()
    if has_run and not (resume or overwrite):
        raise UserError(
            f"{str(out)!r} already holds a run. Pass --resume to continue it, --overwrite to start "
            "over (its checkpoints and metrics are replaced), or choose another --out."
        )
    if resume and not has_run:
        raise UserError(f"--resume: {str(out)!r} holds no run to resume.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the run directory {str(out)!r}: {e.strerror or e}.") from None
    if overwrite and not resume:
        for p in [out / "metrics.jsonl", checkpoint_dir(out) / "last.pt", checkpoint_dir(out) / "prev.pt"]:
            p.unlink(missing_ok=True)


def fit(cfg: TrainConfig, env: Env, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg.run.method` and return the final metrics."""
    r, o = cfg.run, cfg.optim
    out = Path(r.out)
    ck = None
    if env.is_main:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    dist.barrier()
    if resume:
        ck = load_checkpoint(out)
        if ck.get("method") != r.method:
            raise CheckpointError(f"the checkpoint in {str(out)!r} is a {ck.get('method')!r} run, not {r.method!r}.")

    train, test = open_sets(cfg)
    n = len(train)
    # Same seed on every rank before building: identical initial weights and buffers.
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    np.random.seed(r.seed)
    method = build_method(cfg, n).to(env.device)
    if r.channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = method.configure_optimizer(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    amp = autocast_dtype(r.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    state = TrainState()
    if ck is not None:
        try:
            method.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint does not fit this model: {str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        state = TrainState(**ck["state"])
    dist.broadcast_buffers(method)
    model: nn.Module = method
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False
        )
    if r.compile:
        model = torch.compile(model)

    loader = TrainLoader(
        train, o.batch_size, seed=r.seed, rank=env.rank, world_size=env.world_size,
        device=env.device, workers=cfg.data.workers,
    )
    spe = loader.steps_per_epoch()
    lr_cfg = o
    if o.scale_lr:
        lr_cfg = OptimConfig(**{**o.__dict__, "lr": o.lr * o.batch_size / 256})
    lrs = lr_schedule(lr_cfg, spe)
    view_cfgs = method.views(cfg.aug)
    log = MetricLog(out / "metrics.jsonl" if env.is_main else None)
    if env.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if resume:
            log.truncate_after(state.step)
    dist.print0(
        f"instdisc: {r.method} on {cfg.data.data} ({n} images, {spe} steps/epoch x {o.epochs} epochs, "
        f"batch {o.batch_size}, {env.world_size} process(es) on {env.device}, "
        f"{'fp32' if amp is None else str(amp).replace('torch.', '')}) -> {out}"
        + (f"; resuming at epoch {state.epoch} step {state.step}" if ck is not None else "")
    )

    def save() -> None:
        dist.sync_norm_stats(method)
        if not dist.buffers_agree(method):
            raise RuntimeError(f"method state differs across ranks at step {state.step}: this is a bug, please report it")
        if env.is_main:
            save_checkpoint(out, {
                "version": __version__, "method": r.method, "num_samples": n, "config": cfg.to_dict(), "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": dict(state.__dict__),
            })
        dist.barrier()

    def ctx_predict(fn: Any) -> Tensor:
        # Eval mode: BatchNorm uses (and does not update) its running statistics.
        was_training = method.training
        method.eval()
        try:
            return extract_features(
                fn, train, size=cfg.aug.size, mean=cfg.aug.mean, std=cfg.aug.std, device=env.device,
                workers=cfg.data.workers,
            )
        finally:
            method.train(was_training)

    metrics: dict[str, Any] = {}
    stop = False
    while state.epoch < o.epochs and not stop:
        epoch_logs: dict[str, Any] = {}
        if state.epoch_step == 0:
            epoch_logs.update(method.on_epoch_start(EpochContext(
                epoch=state.epoch, num_epochs=o.epochs, predict_all=ctx_predict, out_dir=str(out),
                labels=None if train.labels is None else torch.from_numpy(train.labels),
            )))
        bar = Progress(spe * o.batch_size, desc=f"epoch {state.epoch + 1}/{o.epochs}", enabled=r.progress and env.is_main)

        def on_step(step_out: Any) -> None:
            if state.step % r.log_every == 0:
                log.write(type="step", step=state.step, epoch=state.epoch, lr=float(lrs[state.step - 1]),
                          loss=float(step_out.loss.detach()), **{k: float(v) for k, v in step_out.logs.items()})
            if r.ckpt_every_steps and state.step % r.ckpt_every_steps == 0:
                save()

        stats = train_one_epoch(
            model, loader, view_cfgs, optimizer, lrs, state, seed=r.seed, amp=amp, scaler=scaler,
            clip_grad=o.clip_grad, channels_last=r.channels_last, max_steps=r.max_steps, on_step=on_step, bar=bar,
        )
        bar.close()
        dist.sync_norm_stats(method)  # every rank evaluates with the same model
        stop = bool(r.max_steps and state.step >= r.max_steps)
        if state.epoch_step >= spe:
            state.epoch, state.epoch_step = state.epoch + 1, 0
        last = state.epoch >= o.epochs
        if test is not None and r.knn_every and (state.epoch % r.knn_every == 0 or last) and state.epoch_step == 0:
            stats.update(evaluate_knn(method, train, test, cfg, env, use_bank=True))
        metrics = {"type": "epoch", "epoch": state.epoch, "step": state.step, **epoch_logs, **stats}
        log.write(**metrics)
        knn = f" kNN top-1 {stats['knn_top1']:.2f}%" if "knn_top1" in stats else ""
        dist.print0(
            f"epoch {state.epoch}/{o.epochs} loss {stats['loss']:.4f}{knn} "
            f"({stats['img_per_s']:.0f} img/s, {stats['time_s']:.1f}s)"
        )
        save()
    if test is not None and state.epoch >= o.epochs:
        # Final number as the paper reports it: train features recomputed with the eval transform.
        final = evaluate_knn(method, train, test, cfg, env, use_bank=False)
        if final:
            metrics = {"type": "final", "epoch": state.epoch, "step": state.step, **final}
            log.write(**metrics)
            dist.print0(f"final weighted kNN (k={r.knn_k}, t={r.knn_t}): top-1 {final['knn_top1']:.2f}% "
                        f"top-5 {final['knn_top5']:.2f}%")
    return metrics
