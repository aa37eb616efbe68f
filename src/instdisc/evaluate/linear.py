"""Linear probe: a linear classifier on frozen features, either on cached features
(`linear_probe`, learning rate picked on a held-out tenth) or on freshly augmented images through
the frozen backbone (`linear_probe_augmented`, for GPUs). `FeatureNorm` is the input
normalisation the low-shot protocol shares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.errors import ConfigError, UserError
from instdisc.evaluate.extraction import extract
from instdisc.evaluate.subject import Subject
from instdisc.knn import topk_accuracy
from instdisc.progress import Progress

Norm = Literal["bn", "l2", "none"]


@dataclass
class FeatureNorm:
    """The input normalisation of a linear probe, fitted on training features only.

    "bn": subtract the training mean and divide by the training std per dimension, i.e. a
    BatchNorm1d without affine parameters whose statistics are those of the whole training set
    (MAE's probe uses such a BN). "l2": unit rows, times sqrt(D) so that a dimension has about unit
    scale and one learning-rate grid suits both. "none": raw features.
    """

    kind: Norm
    mean: Tensor | None = None  # (D,)
    std: Tensor | None = None  # (D,)

    @classmethod
    def fit(cls, kind: Norm, x: Tensor) -> FeatureNorm:
        if kind == "bn":
            return cls(kind, x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6))
        if kind in ("l2", "none"):
            return cls(kind)
        raise ConfigError(f"unknown probe normalisation {kind!r}; choose bn, l2 or none.")

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "bn":
            assert self.mean is not None and self.std is not None
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.kind == "l2":
            return F.normalize(x, dim=1) * math.sqrt(x.shape[1])
        return x


def cosine_lrs(lr: float, total_steps: int) -> Tensor:
    """Per-step learning rates, cosine from lr to 0: (total_steps,)."""
    t = torch.arange(total_steps, dtype=torch.float64) / max(total_steps, 1)
    return lr * 0.5 * (1 + torch.cos(math.pi * t))


def train_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float],
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    bar: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax regression by mini-batch SGD with momentum and a per-step cosine schedule, for
    several learning rates at once.

    Each learning rate trains its own classifier on the same seeded sequence of batches; the L
    classifiers are stacked so that one matmul serves them all, which makes a grid search cost
    about as much as one run. The update is exactly `torch.optim.SGD` (momentum, dampening 0,
    weight decay on weights and biases) on the mean cross-entropy; weights start at zero, so the
    result depends on the inputs and the seed alone.

    Args:
        x: (N, D) features; y: (N,) labels in [0, num_classes).
        bar: advanced by one per epoch (the caller's progress line).
    Returns:
        weights (L, C, D) and biases (L, C), one classifier per learning rate.
    """
    n, d = x.shape
    c, L = num_classes, len(lrs)
    w = x.new_zeros(L * c, d)  # (L*C, D): classifier l is rows [l*C, (l+1)*C)
    b = x.new_zeros(L * c)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = -(-n // batch_size)
    sched = cosine_lrs(1.0, epochs * steps_per_epoch).tolist()
    lr = torch.tensor([float(v) for v in lrs], dtype=x.dtype, device=x.device).repeat_interleave(
        c
    )  # (L*C,)
    eye = torch.eye(c, dtype=x.dtype, device=x.device)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = x[idx]  # (B, D)
            logits = torch.addmm(b, xb, w.t()).view(-1, L, c)  # (B, L, C)
            # d(mean CE)/d(logits) = (softmax - onehot) / B, for every classifier at once.
            grad = (
                torch.softmax(logits, dim=2).sub_(eye[y[idx]].unsqueeze(1)).div_(xb.shape[0])
            )  # (B, L, C)
            grad = grad.view(-1, L * c)  # (B, L*C)
            gw = grad.t() @ xb  # (L*C, D)
            gb = grad.sum(0)  # (L*C,)
            if weight_decay:
                gw.add_(w, alpha=weight_decay)
                gb.add_(b, alpha=weight_decay)
            mw.mul_(momentum).add_(gw)
            mb.mul_(momentum).add_(gb)
            step_lr = lr * sched[step]  # (L*C,)
            w.sub_(mw * step_lr[:, None])
            b.sub_(mb * step_lr)
            step += 1
        if bar is not None:
            bar.update(1)
    return w.view(L, c, d), b.view(L, c)


@torch.no_grad()
def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
    """Top-1/top-5 (%) of one linear classifier: w (C, D), b (C,)."""
    scores = torch.cat(
        [torch.addmm(b, x[i : i + 8192], w.t()) for i in range(0, x.shape[0], 8192)]
    )  # (M, C)
    return topk_accuracy(scores, y)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    norm: Norm = "bn",
    lrs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear classifier on frozen features; top-1/top-5 (%) on the test set.

    With several learning rates, all are trained together (`train_linear`) on a seeded
    (1 - val_fraction) part of the training set and scored on the rest; the best is retrained on
    the whole training set. The normalisation statistics always come from the training features.

    Returns:
        {"top1", "top5", "train_top1", "lr", "val_top1": {lr: %}, "norm", "epochs", "batch_size",
        "momentum", "weight_decay", "time_s"}.
    """
    if epochs < 1 or batch_size < 1 or not lrs or not all(0 < lr < math.inf for lr in lrs):  # NaN fails too
        raise UserError(
            f"linear probe needs epochs >= 1, batch size >= 1 and a finite lr > 0; got {epochs}, {batch_size}, {list(lrs)}."
        )
    if not 0 <= weight_decay < math.inf:
        raise UserError(f"--weight-decay must be a finite number >= 0; got {weight_decay}.")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1); got {val_fraction}.")
    t0 = time.perf_counter()
    c = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = train_x.float(), test_x.float()
    # one progress line for the grid search and the final fit: the epochs of both
    bar = Progress(epochs * (2 if len(lrs) > 1 else 1), desc="linear probe", enabled=progress, unit="epoch")
    kw = dict(
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        bar=bar,
    )
    val_scores: dict[float, float] = {}
    if len(lrs) > 1:
        perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
        n_val = max(1, int(round(val_fraction * train_x.shape[0])))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fn = FeatureNorm.fit(norm, train_x[fit_idx])
        vx = fn(train_x[val_idx])
        ws, bs = train_linear(fn(train_x[fit_idx]), train_y[fit_idx], c, lrs=lrs, **kw)
        for lr, w, b in zip(lrs, ws, bs, strict=True):
            val_scores[float(lr)] = _accuracy(w, b, vx, train_y[val_idx])["top1"]
        best = max(val_scores, key=lambda lr: (val_scores[lr], -lr))
    else:
        best = float(lrs[0])
    fn = FeatureNorm.fit(norm, train_x)
    tx = fn(train_x)
    ws, bs = train_linear(tx, train_y, c, lrs=[best], **kw)
    bar.close()
    res = _accuracy(ws[0], bs[0], fn(test_x), test_y)
    return {
        **res,
        "train_top1": _accuracy(ws[0], bs[0], tx, train_y)["top1"],
        "lr": best,
        "val_top1": {str(k): v for k, v in val_scores.items()},
        "norm": norm,
        "epochs": epochs,
        "batch_size": batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "time_s": time.perf_counter() - t0,
    }


def probe_augment_config(size: int, mean: Sequence[float], std: Sequence[float]):
    """The augmentation of the usual linear protocol (MoCo, PIC): RandomResizedCrop(0.08-1) + flip."""
    from dataclasses import replace

    from instdisc.augment import identity_config

    return replace(
        identity_config(size, tuple(mean), tuple(std)),
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
    )


def linear_probe_augmented(
    subject: Subject,
    train_images,
    test_images,
    *,
    num_classes: int | None = None,
    norm: Literal["bn", "l2"] = "bn",
    lr: float = 0.1,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    aug=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear probe trained on freshly augmented images through the frozen backbone (slow: one
    backbone forward per image per epoch; meant for GPUs).

    The backbone stays in eval mode (BatchNorm statistics frozen, as DeepCluster and SeLa evaluate;
    PIC's script leaves BN in train mode). "bn" here is a real BatchNorm1d without affine parameters
    before the linear layer (batch statistics while training, running ones at test time); "l2" as
    in `FeatureNorm`. Test images use the deterministic eval transform.
    """
    from instdisc.augment import augment
    from instdisc.loader import TrainLoader

    if train_images.labels is None or test_images.labels is None:
        raise UserError("the augmented linear probe needs labelled train and test splits.")
    dev = subject.device
    aug = aug or probe_augment_config(subject.size, subject.mean, subject.std)
    c = num_classes or int(max(train_images.labels.max(), test_images.labels.max())) + 1
    labels = torch.from_numpy(train_images.labels).to(dev)
    dim = int(subject.backbone(torch.zeros(1, 3, subject.size, subject.size, device=dev)).shape[1])
    bn = nn.BatchNorm1d(dim, affine=False).to(dev) if norm == "bn" else nn.Identity()
    lin = nn.Linear(dim, c).to(dev)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    head = nn.Sequential(bn, lin)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = TrainLoader(
        train_images,
        min(batch_size, len(train_images)),
        seed=seed,
        device=dev,
        workers=subject.workers,
    )
    spe = loader.steps_per_epoch()
    lrs = cosine_lrs(lr, epochs * spe)
    t0, step = time.perf_counter(), 0
    bar = Progress(epochs * spe, desc="linear (augmented)", enabled=progress)
    for epoch in range(epochs):
        head.train()
        for x, idx in loader.epoch(epoch):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            with torch.no_grad():
                f = subject.backbone(augment(x, aug, gen)).float()  # (b, dim), frozen
                if norm == "l2":
                    f = F.normalize(f, dim=1) * math.sqrt(dim)
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            loss = F.cross_entropy(head(f), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
    bar.close()
    head.eval()
    test_f = extract(subject, test_images, "backbone")
    if norm == "l2":
        test_f = F.normalize(test_f, dim=1) * math.sqrt(dim)
    with torch.no_grad():
        scores = head.cpu()(test_f)  # (M, C)
    res = topk_accuracy(scores, torch.from_numpy(test_images.labels))
    return {
        **res,
        "lr": lr,
        "norm": norm,
        "epochs": epochs,
        "batch_size": batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "augmentation": "RandomResizedCrop(0.08-1) + flip",
        "time_s": time.perf_counter() - t0,
    }
