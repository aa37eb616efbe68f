"""The training loop: one loop for every method (it never looks at the method's name).

Reading order: `train_steps` is the step loop, on one screen (set the lr, draw the augmentations,
forward under autocast, backward, the non-finite guard, the optimiser step), yielding a
`StepRecord` per step; `fit` builds everything from a TrainConfig, then consumes those records:
log, maybe checkpoint, maybe stop (decided in one place), and at each epoch's end `monitor`. A
method only has to turn (views, idx) into a loss. The run directory (log, lock, checkpoints,
resume) is `instdisc.rundir`; what a NaN/inf step does is `instdisc.guard`.

Reproducibility: every random draw of step s on rank r (data order aside, which is a function of
the epoch) comes from generators seeded with (seed, s, r). Resuming from a checkpoint taken at
any step therefore replays exactly the same augmentations and negatives.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instdisc import dist
from instdisc.augment import AugmentConfig, augment
from instdisc.checkpoint import atomic_write_text, run_files_saver
from instdisc.config import OptimConfig, TrainConfig
from instdisc.dist import Env
from instdisc.errors import ConfigError, DataError
from instdisc.features import extract_features
from instdisc.guard import NonFiniteGuard
from instdisc.loader import TrainLoader, make_order, step_seed
from instdisc.loggers import open_loggers
from instdisc.methods import EpochContext, Method, StepOutput
from instdisc.methods import build as building
from instdisc.methods.build import build_method  # noqa: F401  (its home is methods.build; kept importable here)
from instdisc.progress import Progress
from instdisc.quality import QualityState, measure
from instdisc.rundir import (
    Checkpointer,
    MetricLog,
    TrainState,
    check_same_data,
    order_fingerprint,
    prepare_run_dir,
    restore_order_and_rng,
    restore_training,
    resume_checkpoint,
)
from instdisc.runtime import StopRequest, build_optimizer
from instdisc.sources import ImageSet, align_classes, open_source
from instdisc.sources.fingerprint import data_fingerprint
from instdisc.sources.pernode import once_per_node


def fill_size_defaults(cfg: TrainConfig, num_samples: int, num_classes: int) -> list[str]:
    """Resolve the method's size-dependent hyper-parameters left unset (negatives, clusters, queue)
    against the training set, before the model is built and the config saved; print what was chosen
    in one line. A value the user gave is kept (and judged by the method's own checks)."""
    fill = getattr(cfg.method, "fill_defaults", None)
    chosen = fill(num_samples, num_classes) if fill is not None else []
    r, d = cfg.run, cfg.data
    if r.quality_subset is None:  # 3 forward passes of M images: ~3% of an epoch (2 views, fwd + bwd)
        r.quality_subset = min(num_samples, max(256, min(2000, num_samples // 20)))
        chosen.append(f"--quality-subset {r.quality_subset} (N // 20 within [256, 2000], at most N)")
    elif r.quality_subset > num_samples:  # measured on N images, recorded as asked: a wrong record
        raise ConfigError(f"--quality-subset {r.quality_subset} is more than the {num_samples} training images; "
                        f"give at most {num_samples} (or leave it out: N // 20 within [256, 2000]).")
    if d.sampler == "sliding" and not d.window:  # as make_order reads 0: PIC's D = N / 10, S = D / 8
        d.window = max(num_samples // 10, 1)
        chosen.append(f"--window {d.window} (N // 10, PIC's ratio)")
    if d.sampler == "sliding" and not d.stride:
        d.stride = max(d.window // 8, 1)
        chosen.append(f"--stride {d.stride} (window // 8)")
    if chosen:
        dist.print0(f"instdisc: for N = {num_samples} training images: {'; '.join(chosen)}. Give the flag to choose.")
    return chosen


def lr_schedule(o: OptimConfig, steps_per_epoch: int) -> Tensor:
    """Learning rate of every step, computed up front: (epochs * steps_per_epoch,). With
    --scale-lr the base rate is lr * batch_size / 256 (PIC, MoCo)."""
    base = o.lr * o.batch_size / 256 if o.scale_lr else o.lr
    total = o.epochs * steps_per_epoch
    step = torch.arange(total, dtype=torch.float64)
    epoch = step / steps_per_epoch
    warm = o.warmup_epochs * steps_per_epoch
    if o.schedule == "step":
        drops = sum((epoch.floor() >= m).double() for m in o.milestones) if o.milestones else torch.zeros(total)
        lr = base * o.gamma**drops
    elif o.schedule == "cosine":
        t = ((step - warm) / max(total - warm, 1)).clamp(0, 1)
        lr = base * 0.5 * (1 + torch.cos(math.pi * t))
    else:
        lr = torch.full((total,), base, dtype=torch.float64)
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


@dataclass
class StepParts:
    """What every step uses, built once by `fit`."""

    model: nn.Module  # the method as the loop calls it (DDP across ranks, maybe compiled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    amp: torch.dtype | None  # the networks' autocast dtype; None = fp32
    guard: NonFiniteGuard
    lrs: Tensor  # (epochs * steps_per_epoch,) float64: the lr of every step
    views: list[AugmentConfig]  # one per view the method asks for
    seed: int
    clip_grad: float
    channels_last: bool


@dataclass
class StepRecord:
    """What one step yields to `fit` (the TrainState has already moved past the step)."""

    out: StepOutput  # .loss: () fp32; .logs: the method's scalars
    idx: Tensor  # (B,) this rank's dataset indices
    loss: float
    lr: float
    skipped: bool  # non-finite, skipped under --skip-nonfinite (weights and method state untouched)


def train_steps(p: StepParts, loader: TrainLoader, state: TrainState) -> Iterator[StepRecord]:
    """The steps of epoch `state.epoch` from `state.epoch_step` on, one record each."""
    p.model.train()
    device = loader.device
    if state.epoch_step == 0:
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    # x: (B, 3, H, W) uint8, or (large images) a list of per-view crops the workers made; idx: (B,)
    for x, idx in loader.epoch(state.epoch, start_step=state.epoch_step, first_step=state.step):
        s = step_seed(p.seed, state.step, loader.rank)
        torch.manual_seed(s)  # the method's own draws (e.g. NPID's negatives)
        gen = torch.Generator(device=device).manual_seed(s)
        with torch.no_grad():  # V views, each (B, 3, S, S) float, normalised
            if isinstance(x, list):
                views = [augment(xv, vc, gen, cropped=True) for xv, vc in zip(x, p.views, strict=True)]
            else:
                views = [augment(x, vc, gen) for vc in p.views]
        if p.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        lr = float(p.lrs[state.step])
        for group in p.optimizer.param_groups:
            group["lr"] = lr
        p.guard.before_forward()
        # The networks run under autocast; each method computes its similarities, logits and loss in
        # fp32 inside methods.base.full_precision (tests/test_precision.py).
        with torch.autocast(device.type, dtype=p.amp or torch.float32, enabled=p.amp is not None):
            out = p.model(views, idx)
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(out.loss).backward()  # on every rank even if its loss is NaN: DDP's all-reduce needs it
        if p.clip_grad > 0:
            p.scaler.unscale_(p.optimizer)
        bad = p.guard.check(out.loss, p.clip_grad)  # one host sync per step; so .item() costs nothing more
        loss = out.loss.item()
        if any(bad):
            p.guard.handle(bad, out.loss, idx, state, seed=s)  # raises unless --skip-nonfinite allows a skip
            p.optimizer.zero_grad(set_to_none=True)
            if p.scaler.is_enabled():  # forget this step's unscale, back off like an inf step would
                p.scaler.update(p.scaler.get_scale() * p.scaler.get_backoff_factor())
        else:
            p.scaler.step(p.optimizer)
            p.scaler.update()
            state.epoch_loss_sum += loss
            state.epoch_loss_steps += 1
        state.step += 1
        state.epoch_step += 1
        yield StepRecord(out, idx, loss, lr, skipped=any(bad))


def open_sets(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """The training set and, if one exists, the evaluation set (labelled by the training classes)."""
    d = cfg.data
    kw = dict(cache_dir=d.cache_dir, download=d.download, image_size=d.image_size, progress=dist.is_main())
    train = once_per_node(lambda: open_source(d.data, "train", **kw))  # decoded/cached once per node
    try:
        test = once_per_node(lambda: open_source(d.test_data or d.data, "test", **kw))
    except DataError as e:
        if d.test_data:
            raise
        dist.print0(f"note: no test split for kNN monitoring ({e}).")
        return train, None
    if train.labels is not None:
        test = align_classes(test, train.classes, drop_unknown=d.drop_unknown_classes)
    return train, test


def monitor_subset(n: int, size: int, seed: int) -> np.ndarray:
    """The training images the kNN monitor embeds (`--knn-subset`): `size` of the n, ascending, the
    same at every epoch, on every rank and after a resume (drawn from their own generator, so the
    run's global generators are untouched)."""
    if not 0 < size < n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0x6B4E4E]).choice(n, size, replace=False))


def evaluate_knn(
    method: Method, train: ImageSet, test: ImageSet, cfg: TrainConfig, env: Env, *, use_bank: bool
) -> dict[str, float]:
    """Weighted kNN (k = --knn-k, t = --knn-t) of test embeddings against the bank (cheap monitor)
    or the re-embedded train set, through `instdisc.evaluate.knn_evaluate` like every evaluation.
    Under torchrun each rank scores its share of the test set (the counts are summed: the number is
    the one process's). The monitor of a method without a bank embeds `--knn-subset` train images."""
    from instdisc.evaluate import knn_evaluate, knn_row, subject_of
    from instdisc.sources.images import subset

    if train.labels is None or test.labels is None:
        return {}
    bank = None
    if use_bank:
        was_training = method.training
        method.eval()
        bank = method.bank_features()
        method.train(was_training)
        if bank is None and 0 < cfg.run.knn_subset < len(train):
            keep = monitor_subset(len(train), cfg.run.knn_subset, cfg.run.seed)
            train = subset(train, keep, train.labels[keep], train.classes)
    k, t = cfg.run.knn_k, cfg.run.knn_t
    rows = knn_evaluate(subject_of(method, cfg, env.device), train, test, ks=(k,), ts=(t,), bank=bank,
                        keep_device=True, backend="torch", shard=(env.rank, env.world_size))
    row = knn_row(rows, k, t)
    return {"knn_top1": row["top1"], "knn_top5": row["top5"]}


def evaluate_quality(method: Method, train: ImageSet, cfg: TrainConfig, env: Env, state: QualityState,
                     epoch: int) -> dict[str, float]:
    """The label-free signals (`instdisc.quality`) on `--quality-subset` training images, rank 0
    only (the other ranks do not log), in eval mode: BatchNorm's running statistics are untouched."""
    if not cfg.run.quality_subset or not env.is_main:
        return {}
    was_training = method.training
    method.eval()
    try:
        return measure(method.embed, train, method.views(cfg.aug)[0], state, size=cfg.aug.size, mean=cfg.aug.mean,
                       std=cfg.aug.std, subset=cfg.run.quality_subset, seed=cfg.run.seed, epoch=epoch,
                       device=env.device, workers=cfg.data.workers)
    finally:
        method.train(was_training)


def wrap_for_training(method: Method, env: Env, *, compile: bool) -> nn.Module:
    """The module the loop calls: DDP across ranks (gradients only; the methods keep their own
    buffers equal with explicit collectives), optionally compiled. `method` stays the unwrapped one."""
    model: nn.Module = dist.ddp(method, env.device) if env.distributed else method
    return torch.compile(model) if compile else model


def fit(cfg: TrainConfig, env: Env, *, resume: bool = False, overwrite: bool = False,
        checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `cfg.run.method` and return the final metrics. The run directory is locked meanwhile.
    `checkpoint`: on resume, the run's checkpoint already read (`rundir.read_resume`); else read here."""
    clock = StopRequest(cfg.run.time_limit)  # started before the data are opened: loading counts
    out = Path(cfg.run.out)
    lock = prepare_run_dir(out, resume=resume, overwrite=overwrite) if env.is_main else None
    try:
        dist.barrier()
        return _fit(cfg, env, clock, out, ck=checkpoint if resume else None, resume=resume)
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: TrainConfig, env: Env, clock: StopRequest, out: Path, *, ck: dict[str, Any] | None,
         resume: bool) -> dict[str, Any]:
    r, o, d = cfg.run, cfg.optim, cfg.data
    ck = resume_checkpoint(out, ck, r.method, o.epochs, quarantine=env.is_main) if resume else None
    train, test = open_sets(cfg)
    n = len(train)
    fill_size_defaults(cfg, n, len(train.classes))
    fingerprint = data_fingerprint(train)  # saved in every checkpoint; a resume compares it
    if ck is not None:
        check_same_data(ck, fingerprint, train, d.data)
    method = method_for_training(cfg, env, n, ck)
    optimizer = build_optimizer(method, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                impl=o.optimizer_impl)
    amp = autocast_dtype(r.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    state = TrainState() if ck is None else restore_training(ck, optimizer, scaler)
    dist.broadcast_buffers(method)
    view_cfgs = method.views(cfg.aug)
    order = make_order(d.sampler, n, seed=r.seed, window=d.window, stride=d.stride, batch_size=o.batch_size)
    loader = TrainLoader(train, o.batch_size, seed=r.seed, rank=env.rank, world_size=env.world_size,
                         device=env.device, workers=d.workers, order=order, in_memory=d.in_memory, views=view_cfgs)
    spe = loader.steps_per_epoch()
    guard = NonFiniteGuard(method, max_skips=r.skip_nonfinite, check_grads=not scaler.is_enabled(),
                           debug_dir=out / "debug", rank=env.rank, is_main=env.is_main, config=cfg.to_dict())
    parts = StepParts(wrap_for_training(method, env, compile=r.compile), optimizer, scaler, amp, guard,
                      lr_schedule(o, spe), view_cfgs, r.seed, o.clip_grad, r.channels_last)
    log = MetricLog(out / "metrics.jsonl", open_loggers(r.logger, out, cfg.to_dict(), (ck or {}).get("loggers"))) \
        if env.is_main else MetricLog(None)
    quality = QualityState.from_checkpoint(ck)  # the label-free signals' neighbour lists
    ckpt = Checkpointer(out, cfg, env, method, optimizer, scaler, loader.order, fingerprint, n, quality, log)
    if env.is_main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        if resume:
            log.truncate_after(state.step)
    dist.print0(
        f"instdisc: {r.method} on {d.data} ({n} images, {spe} steps/epoch x {o.epochs} epochs, batch {o.batch_size}, "
        f"{env.world_size} process(es) on {env.device}, {'fp32' if amp is None else str(amp).replace('torch.', '')})"
        f" -> {out}" + (f"; resuming at epoch {state.epoch} step {state.step}" if ck is not None else ""))
    if ck is not None:
        restore_order_and_rng(ck, ckpt.order_crc32(state.epoch), env)

    metrics: dict[str, Any] = {}
    with clock:  # SIGTERM/SIGINT/SIGUSR1 (runtime.STOP_SIGNALS) from here on: finish the step, checkpoint, exit 128 + signal
        while state.epoch < o.epochs:
            hook = method.on_epoch_start(epoch_context(method, train, cfg, env, state.epoch)) if state.epoch_step == 0 else {}
            bar = Progress(spe * o.batch_size, desc=f"epoch {state.epoch + 1}/{o.epochs}", enabled=r.progress and env.is_main)
            t0, seen = time.perf_counter(), 0
            for rec in train_steps(parts, loader, state):
                seen += rec.idx.shape[0] * loader.world
                bar.update(rec.idx.shape[0] * loader.world, postfix=f"loss {rec.loss:.4f} lr {rec.lr:.4g}")
                if rec.skipped:
                    log.write(type="skip", step=state.step, epoch=state.epoch, skipped=state.skipped, loss=rec.loss)
                elif state.step % r.log_every == 0:  # "batch": CRC-32 of rank 0's indices, evidence of the order
                    log.write(type="step", step=state.step, epoch=state.epoch, lr=rec.lr, loss=rec.loss,
                              batch=order_fingerprint(rec.idx), **{k: float(v) for k, v in rec.out.logs.items()})
                # When to save and stop, here and after the epoch. No step checkpoint where the epoch's or the
                # stop's follows at once: a duplicate would push the genuinely older checkpoint out of prev.pt.
                at_max = bool(r.max_steps and state.step >= r.max_steps)
                ends = clock.check(env.device) or state.epoch_step >= spe or at_max  # check: every step, all ranks
                if r.ckpt_every_steps and state.step % r.ckpt_every_steps == 0 and not ends:
                    ckpt.save(state)
                if at_max or clock.expired:
                    break
            dt = time.perf_counter() - t0
            bar.close()
            metrics = monitor(method, train, test, cfg, env, state, spe, log, quality, {
                **hook, "loss": state.epoch_loss_sum / max(state.epoch_loss_steps, 1),
                "img_per_s": seen / max(dt, 1e-9), "time_s": dt})
            due = metrics["type"] == "epoch_part" or state.epoch >= o.epochs or state.epoch % r.ckpt_every_epochs == 0
            if due:
                ckpt.save(state)
            # clock.check also sees a signal that came during the evaluation or the save: no further epoch.
            if bool(r.max_steps and state.step >= r.max_steps) or clock.check(env.device):
                if not due:  # a stop always leaves a checkpoint of the exact state
                    ckpt.save(state)
                break
    return finish(method, train, test, cfg, env, state, clock, log, metrics, spe)


def method_for_training(cfg: TrainConfig, env: Env, n: int, ck: dict[str, Any] | None) -> Method:
    """The method to train, on the device: built afresh (same seed on every rank, so identical
    initial weights and buffers), or on resume the run's own model, as every evaluation command
    rebuilds it (`methods.build.method_from_checkpoint`)."""
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    if ck is None:
        method = building.build_method(cfg, n).to(env.device)
    else:
        where = f"the checkpoint in {str(Path(cfg.run.out))!r}"
        method, _ = building.method_from_checkpoint(ck, env.device, where=where)
        method.train()
    return method.to(memory_format=torch.channels_last) if cfg.run.channels_last else method


def epoch_context(method: Method, train: ImageSet, cfg: TrainConfig, env: Env, epoch: int) -> EpochContext:
    """What a method's on_epoch_start may use: the epoch, a way to embed the training set, a saver."""

    def predict(fn: Any, gather: bool = True) -> Tensor:
        # Eval mode: BatchNorm uses (and does not update) its running statistics.
        was_training = method.training
        method.eval()
        try:
            return extract_features(fn, train, size=cfg.aug.size, mean=cfg.aug.mean, std=cfg.aug.std,
                                    device=env.device, workers=cfg.data.workers, gather=gather)
        finally:
            method.train(was_training)

    return EpochContext(
        epoch=epoch, num_epochs=cfg.optim.epochs, predict_all=predict,
        save=run_files_saver(Path(cfg.run.out), is_main=env.is_main),
        labels=None if train.labels is None else torch.from_numpy(train.labels),
        predict_shard=lambda fn: predict(fn, gather=False),
    )


def monitor(method: Method, train: ImageSet, test: ImageSet | None, cfg: TrainConfig, env: Env, state: TrainState,
            spe: int, log: MetricLog, quality: QualityState, stats: dict[str, Any]) -> dict[str, Any]:
    """The end of an epoch, whole or cut short by a stop: move the state to the next epoch if this
    one is done, run the kNN monitor and the label-free signals when due, log the epoch's line and
    print its summary.

    An epoch cut short (--max-steps, --time-limit, a signal) is logged as "epoch_part", so that
    "epoch" lines stay one per whole epoch across stops and resumes. Returns the logged record."""
    r, o = cfg.run, cfg.optim
    dist.sync_norm_stats(method)  # every rank evaluates with the same model
    if state.epoch_step >= spe:
        state.epoch, state.epoch_step = state.epoch + 1, 0
    whole, last = state.epoch_step == 0, state.epoch >= o.epochs
    due = bool(r.knn_every and (state.epoch % r.knn_every == 0 or last) and whole)
    if due and test is not None:
        stats.update(evaluate_knn(method, train, test, cfg, env, use_bank=True))
    if due:  # needs no labels: the signal for unlabelled data
        stats.update(evaluate_quality(method, train, cfg, env, quality, state.epoch))
    metrics = {"type": "epoch" if whole else "epoch_part", "epoch": state.epoch, "step": state.step, **stats}
    log.write(**metrics)
    # The monitor's train side is the method's own memory bank where it keeps one (features
    # from past epochs' augmented views), else the training set re-embedded now.
    reads = ("memory bank" if method.bank_features() is not None else
             f"{min(r.knn_subset, len(train))} train images re-embedded" if r.knn_subset else "train set re-embedded")
    knn = f" kNN top-1 {stats['knn_top1']:.2f}% ({reads})" if "knn_top1" in stats else ""
    if "rankme" in stats:
        knn += f" align {stats['align']:.3f} uniform {stats['uniform']:.3f} rankme {stats['rankme']:.1f}"
    where = f"epoch {state.epoch}/{o.epochs}" if whole else \
        f"epoch {state.epoch + 1}/{o.epochs} (stopped after step {state.epoch_step}/{spe})"
    dist.print0(f"{where} loss {stats['loss']:.4f}{knn} ({stats['img_per_s']:.0f} img/s, {stats['time_s']:.1f}s)")
    return metrics


def finish(method: Method, train: ImageSet, test: ImageSet | None, cfg: TrainConfig, env: Env, state: TrainState,
           clock: StopRequest, log: MetricLog, metrics: dict[str, Any], spe: int) -> dict[str, Any]:
    """After the loop: the final kNN of a finished run, or the message of a stopped one."""
    r, o = cfg.run, cfg.optim
    if test is not None and state.epoch >= o.epochs:
        # Final number as the paper reports it: train features recomputed with the eval transform.
        final = evaluate_knn(method, train, test, cfg, env, use_bank=False)
        if final:
            metrics = {"type": "final", "epoch": state.epoch, "step": state.step, **final}
            log.write(**metrics)
            dist.print0(f"final weighted kNN (k={r.knn_k}, t={r.knn_t}): top-1 {final['knn_top1']:.2f}% "
                        f"top-5 {final['knn_top5']:.2f}%")
    if clock.expired and state.epoch < o.epochs:
        why = (f"--time-limit {r.time_limit:g} min reached after {clock.elapsed() / 60:.1f} min"
               if clock.reason == "time_limit" else f"{clock.reason} received")
        dist.print0(
            f"instdisc: {why}, stopped at step {state.step} of {o.epochs * spe} (epoch {state.epoch + 1}/{o.epochs}); "
            f"checkpoint saved. Continue with: instdisc train --method {r.method} --out {Path(r.out)} --resume"
        )
        metrics = {**metrics, "stopped": clock.reason, "signal": clock.signum}
    log.close()
    return metrics
