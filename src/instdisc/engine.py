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
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instdisc import __version__, dist
from instdisc.augment import AugmentConfig, augment
from instdisc.checkpoint import (
    atomic_write_text,
    run_files_saver,
    save_checkpoint,
)
from instdisc.config import OptimConfig, TrainConfig
from instdisc.dist import Env
from instdisc.errors import CheckpointError, DataError
from instdisc.features import extract_features
from instdisc.guard import NonFiniteGuard
from instdisc.loader import TrainLoader, make_order, step_seed
from instdisc.methods import EpochContext, Method
from instdisc.methods import build as building
from instdisc.methods.build import build_method  # noqa: F401  (its home is methods.build; kept importable here)
from instdisc.progress import Progress
from instdisc.rundir import (
    MetricLog,
    TrainState,
    check_resume_epochs,
    check_same_data,
    order_fingerprint,
    prepare_run_dir,
    restore_order_and_rng,
    restore_training,
    rng_state,
)
from instdisc.runtime import StopRequest, build_optimizer
from instdisc.sources import ImageSet, align_classes, open_source
from instdisc.sources.fingerprint import data_fingerprint


def fill_size_defaults(cfg: TrainConfig, num_samples: int, num_classes: int) -> list[str]:
    """Resolve the method's size-dependent hyper-parameters left unset (negatives, clusters, queue)
    against the training set, before the model is built and the config saved; print what was chosen
    in one line. A value the user gave is kept (and judged by the method's own checks)."""
    fill = getattr(cfg.method, "fill_defaults", None)
    chosen = fill(num_samples, num_classes) if fill is not None else []
    d = cfg.data
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
    guard: NonFiniteGuard,
    on_step: Any,
    bar: Progress,
    stop: Any = None,
) -> dict[str, float]:
    """One pass over the epoch's batches; returns the epoch's mean loss and throughput.

    on_step(out, idx, skipped) runs after every step, skipped or not (logging, step checkpoints).
    stop() (optional), asked after on_step, ends the epoch early when True (--time-limit, SIGTERM).
    """
    model.train()
    device = loader.device
    t0, seen = time.perf_counter(), 0
    if state.epoch_step == 0:
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    for x, idx in loader.epoch(state.epoch, start_step=state.epoch_step, first_step=state.step):
        s = step_seed(seed, state.step, loader.rank)
        torch.manual_seed(s)  # the method's own draws (e.g. NPID's negatives)
        gen = torch.Generator(device=device).manual_seed(s)
        with torch.no_grad():
            if isinstance(x, list):  # large images: the workers cropped each view already
                views = [augment(xv, vc, gen, cropped=True) for xv, vc in zip(x, view_cfgs, strict=True)]
            else:
                views = [augment(x, vc, gen) for vc in view_cfgs]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[state.step])
        guard.before_forward()
        # The networks run under autocast; each method computes its similarities, logits and loss in
        # fp32 inside methods.base.full_precision (tests/test_precision.py).
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(views, idx)
        loss = out.loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # on every rank even if its loss is NaN: DDP's all-reduce needs it
        if clip_grad > 0:
            scaler.unscale_(optimizer)
        bad = guard.check(loss, clip_grad)  # one host sync per step; so the .item() below costs nothing more
        loss_value = loss.item()
        skipped = any(bad)
        if skipped:
            guard.handle(bad, loss, idx, state, seed=s)  # raises unless --skip-nonfinite allows a skip
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():  # forget this step's unscale, back off like an inf step would
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        else:
            scaler.step(optimizer)
            scaler.update()
            state.epoch_loss_sum += loss_value
            state.epoch_loss_steps += 1
        seen += idx.shape[0] * loader.world
        state.step += 1
        state.epoch_step += 1
        bar.update(idx.shape[0] * loader.world, postfix=f"loss {loss_value:.4f} lr {lrs[state.step - 1]:.4g}")
        on_step(out, idx, skipped)
        if (max_steps and state.step >= max_steps) or (stop is not None and stop()):
            break
    dt = time.perf_counter() - t0
    return {"loss": state.epoch_loss_sum / max(state.epoch_loss_steps, 1), "img_per_s": seen / max(dt, 1e-9), "time_s": dt}


def open_sets(cfg: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """The training set and, if one exists, the evaluation set (labelled by the training classes)."""
    d = cfg.data
    kw = dict(cache_dir=d.cache_dir, download=d.download, image_size=d.image_size, progress=dist.is_main())
    train = open_source(d.data, "train", **kw)
    try:
        test = open_source(d.test_data or d.data, "test", **kw)
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
        return _fit(cfg, env, clock, out, resume=resume, ck=checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: TrainConfig, env: Env, clock: StopRequest, out: Path, *, resume: bool,
         ck: dict[str, Any] | None) -> dict[str, Any]:
    r, o = cfg.run, cfg.optim
    if not resume:
        ck = None
    else:
        if ck is None:
            _, ck = building.read_run(out, quarantine=env.is_main)
        if ck.get("method") != r.method:
            raise CheckpointError(f"the checkpoint in {str(out)!r} is a {ck.get('method')!r} run, not {r.method!r}.")
        check_resume_epochs(TrainState(**ck["state"]), o.epochs)

    train, test = open_sets(cfg)
    n = len(train)
    fill_size_defaults(cfg, n, len(train.classes))
    fingerprint = data_fingerprint(train)  # saved in every checkpoint; a resume compares it
    if ck is not None:
        check_same_data(ck, fingerprint, train, cfg.data.data)
    # Same seed on every rank before building: identical initial weights and buffers.
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    np.random.seed(r.seed)
    if ck is None:
        method = building.build_method(cfg, n).to(env.device)
    else:  # the run's own model, as every evaluation command rebuilds it (methods.load_run)
        method, _ = building.method_from_checkpoint(ck, env.device, where=f"the checkpoint in {str(out)!r}")
        method.train()
    if r.channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                impl=o.optimizer_impl)
    amp = autocast_dtype(r.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    state = TrainState() if ck is None else restore_training(ck, optimizer, scaler)
    dist.broadcast_buffers(method)
    model = wrap_for_training(method, env, compile=r.compile)

    d = cfg.data
    order = make_order(d.sampler, n, seed=r.seed, window=d.window, stride=d.stride, batch_size=o.batch_size)
    view_cfgs = method.views(cfg.aug)
    loader = TrainLoader(
        train, o.batch_size, seed=r.seed, rank=env.rank, world_size=env.world_size,
        device=env.device, workers=cfg.data.workers, order=order, in_memory=cfg.data.in_memory,
        views=view_cfgs,
    )
    spe = loader.steps_per_epoch()
    lr_cfg = o
    if o.scale_lr:
        lr_cfg = OptimConfig(**{**o.__dict__, "lr": o.lr * o.batch_size / 256})
    lrs = lr_schedule(lr_cfg, spe)
    log = MetricLog(out / "metrics.jsonl" if env.is_main else None)
    if env.is_main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        if resume:
            log.truncate_after(state.step)
    dist.print0(
        f"instdisc: {r.method} on {cfg.data.data} ({n} images, {spe} steps/epoch x {o.epochs} epochs, "
        f"batch {o.batch_size}, {env.world_size} process(es) on {env.device}, "
        f"{'fp32' if amp is None else str(amp).replace('torch.', '')}) -> {out}"
        + (f"; resuming at epoch {state.epoch} step {state.step}" if ck is not None else "")
    )

    orders: dict[int, int] = {}  # epoch -> fingerprint of its data order (computed once per epoch)

    def sampler_state() -> dict[str, int]:
        if state.epoch not in orders:
            orders.clear()
            orders[state.epoch] = order_fingerprint(loader.order(state.epoch))
        return {"epoch": state.epoch, "position": state.epoch_step, "order_crc32": orders[state.epoch]}

    def save() -> None:
        dist.sync_norm_stats(method)
        if not dist.buffers_agree(method):
            raise RuntimeError(f"method state differs across ranks at step {state.step}: this is a bug, please report it")
        rngs = dist.all_gather_object(rng_state(env.device))  # one per rank, in rank order
        if env.is_main:
            save_checkpoint(out, {
                "version": __version__, "method": r.method, "num_samples": n, "data": fingerprint,
                "config": cfg.to_dict(), "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": dict(state.__dict__),
                "sampler": sampler_state(), "rng": rngs, "world_size": env.world_size,
            })
        dist.barrier()

    if ck is not None:
        restore_order_and_rng(ck, sampler_state()["order_crc32"], env)
    guard = NonFiniteGuard(
        method, max_skips=r.skip_nonfinite, check_grads=not scaler.is_enabled(), debug_dir=out / "debug",
        rank=env.rank, is_main=env.is_main, config=cfg.to_dict(),
    )

    def ctx_predict(fn: Any, gather: bool = True) -> Tensor:
        # Eval mode: BatchNorm uses (and does not update) its running statistics.
        was_training = method.training
        method.eval()
        try:
            return extract_features(
                fn, train, size=cfg.aug.size, mean=cfg.aug.mean, std=cfg.aug.std, device=env.device,
                workers=cfg.data.workers, gather=gather,
            )
        finally:
            method.train(was_training)

    metrics: dict[str, Any] = {}
    stop = False
    with clock:  # SIGTERM/SIGINT/SIGUSR1 (runtime.STOP_SIGNALS) from here on: finish the step, checkpoint, exit 128 + signal
        while state.epoch < o.epochs and not stop:
            epoch_logs: dict[str, Any] = {}
            if state.epoch_step == 0:
                epoch_logs.update(method.on_epoch_start(EpochContext(
                    epoch=state.epoch, num_epochs=o.epochs, predict_all=ctx_predict, save=run_files_saver(out, is_main=env.is_main),
                    labels=None if train.labels is None else torch.from_numpy(train.labels),
                    predict_shard=lambda fn: ctx_predict(fn, gather=False),
                )))
            bar = Progress(spe * o.batch_size, desc=f"epoch {state.epoch + 1}/{o.epochs}", enabled=r.progress and env.is_main)

            def on_step(step_out: Any, idx: Tensor, skipped: bool) -> None:
                if skipped:
                    log.write(type="skip", step=state.step, epoch=state.epoch, skipped=state.skipped,
                              loss=float(step_out.loss.detach()))
                elif state.step % r.log_every == 0:
                    # "batch": CRC-32 of rank 0's dataset indices, evidence of the data order.
                    log.write(type="step", step=state.step, epoch=state.epoch, lr=float(lrs[state.step - 1]),
                              loss=float(step_out.loss.detach()), batch=order_fingerprint(idx),
                              **{k: float(v) for k, v in step_out.logs.items()})
                # Not at the epoch's last step or at --max-steps: the end-of-loop save follows at once, and
                # a duplicate would push the genuinely older checkpoint out of prev.pt.
                ends = (clock.check(env.device) or state.epoch_step >= spe
                        or bool(r.max_steps and state.step >= r.max_steps))
                if r.ckpt_every_steps and state.step % r.ckpt_every_steps == 0 and not ends:
                    save()

            stats = train_one_epoch(
                model, loader, view_cfgs, optimizer, lrs, state, seed=r.seed, amp=amp, scaler=scaler,
                clip_grad=o.clip_grad, channels_last=r.channels_last, max_steps=r.max_steps, guard=guard, on_step=on_step,
                bar=bar, stop=lambda: clock.expired,
            )
            bar.close()
            dist.sync_norm_stats(method)  # every rank evaluates with the same model
            if state.epoch_step >= spe:
                state.epoch, state.epoch_step = state.epoch + 1, 0
            last = state.epoch >= o.epochs
            if test is not None and r.knn_every and (state.epoch % r.knn_every == 0 or last) and state.epoch_step == 0:
                stats.update(evaluate_knn(method, train, test, cfg, env, use_bank=True))
            # An epoch cut short (--max-steps, --time-limit, a signal) is logged as "epoch_part", so
            # that "epoch" lines stay one per whole epoch across stops and resumes.
            whole = state.epoch_step == 0
            metrics = {"type": "epoch" if whole else "epoch_part", "epoch": state.epoch, "step": state.step,
                       **epoch_logs, **stats}
            log.write(**metrics)
            # The monitor's train side is the method's own memory bank where it keeps one (features
            # from past epochs' augmented views), else the training set re-embedded now.
            reads = ("memory bank" if method.bank_features() is not None else
                     f"{min(r.knn_subset, n)} train images re-embedded" if r.knn_subset else "train set re-embedded")
            knn = f" kNN top-1 {stats['knn_top1']:.2f}% ({reads})" if "knn_top1" in stats else ""
            where = f"epoch {state.epoch}/{o.epochs}" if whole else \
                f"epoch {state.epoch + 1}/{o.epochs} (stopped after step {state.epoch_step}/{spe})"
            dist.print0(f"{where} loss {stats['loss']:.4f}{knn} ({stats['img_per_s']:.0f} img/s, {stats['time_s']:.1f}s)")
            due = not whole or last or state.epoch % r.ckpt_every_epochs == 0
            if due:
                save()
            # clock.check also sees a signal that came during the evaluation: then not one more epoch.
            stop = bool(r.max_steps and state.step >= r.max_steps) or clock.check(env.device)
            if stop and not due:  # a stop always leaves a checkpoint of the exact state
                save()
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
            f"checkpoint saved. Continue with: instdisc train --method {r.method} --out {out} --resume"
        )
        metrics = {**metrics, "stopped": clock.reason, "signal": clock.signum}
    return metrics
