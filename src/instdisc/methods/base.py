"""The contract every method follows, so that the training loop never branches on the method.

A method is an `nn.Module` that owns its backbone, head and all of its state (memory banks,
queues, pseudo-labels, as registered buffers). Given the augmented views of a batch and the
batch's dataset indices it returns its loss; the loop does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.augment import AugmentConfig
from instdisc.runtime import make_sgd


@dataclass
class StepOutput:
    loss: Tensor  # scalar, already averaged over the batch
    logs: dict[str, float] = field(default_factory=dict)  # cheap scalars for the progress bar/log


@dataclass
class EpochContext:
    """What the epoch-start hook may use (SeLa relabels the whole training set there)."""

    epoch: int
    num_epochs: int
    # predict_all(fn) runs fn over every training image (in dataset order, eval transform) and
    # returns the concatenated outputs: (N, ...). Distributed-safe.
    predict_all: Callable[[Callable[[Tensor], Tensor]], Tensor]
    # save({path relative to the run directory: bytes}) writes files atomically on rank 0 (the
    # engine's `checkpoint.run_files_saver`); None where there is no run directory. Methods never
    # open files themselves.
    save: Callable[[dict[str, bytes]], Any] | None = None
    # Ground-truth labels where the source has them: SeLa scores its clusters with them, and
    # `--method supervised` trains on them; the self-supervised objectives never see them.
    labels: Tensor | None = None
    # predict_shard(fn): the same, but only this rank's contiguous block of rows, rank * S ..
    # min((rank + 1) * S, N) - 1 with S = ceil(N / world): (n_r, ...), nothing gathered.
    # None where the caller offers only predict_all.
    predict_shard: Callable[[Callable[[Tensor], Tensor]], Tensor] | None = None


class Method(nn.Module):
    """An instance-discrimination objective.

    Subclasses define `Config` (a dataclass of their hyper-parameters), `forward` and `embed`.
    """

    Config: ClassVar[type]

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.num_samples = num_samples

    def views(self, aug: AugmentConfig) -> list[AugmentConfig]:
        """The augmentations of the views `forward` expects, built from the run's base recipe."""
        return [aug]

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover
        """(B, 3, H, W) normalised images -> (B, D) L2-normalised features for kNN and export."""
        raise NotImplementedError

    def configure_optimizer(
        self, lr: float, momentum: float, weight_decay: float, impl: str = "auto"
    ) -> torch.optim.Optimizer:
        """The optimiser of this method's parameters. Default: SGD over all of them.

        A method overrides it when part of its state needs its own update rule (PIC's N-row
        classifier is updated sparsely, with the closed-form correction for skipped steps). The loop
        sets every param group's "lr" each step and calls `step()`; nothing else is assumed.
        `impl` (--optimizer-impl: auto, plain, foreach, fused) picks SGD's kernels, not its maths.
        Every override keeps this signature; one whose optimiser cannot take `impl` says so with an
        InstdiscWarning (PIC's sampled rows) rather than silently ignoring it.
        """
        return make_sgd(self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, impl=impl)

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, Any]:
        """Called before every epoch (on every rank). Returns scalars to log. Default: nothing."""
        return {}

    def bank_features(self) -> Tensor | None:
        """(N, D) features of the training set kept by the method (NPID's bank), else None.

        The kNN monitor uses them for free instead of re-embedding the training set.
        """
        return None


def full_precision(like: Tensor) -> AbstractContextManager[None]:
    """The precision rule of every method: enter it where the networks end.

    The loop runs `forward` under autocast (bf16 on a GPU, `--precision`), which casts every
    matmul, einsum and linear layer to bf16. That is right for the backbone and the projection head
    and wrong for what follows: bf16 keeps 8 bits of mantissa, so similarities between unit vectors
    are off by ~4e-3, and divided by tau = 0.07 and compared across 4,096-65,536 negatives they blur
    the very differences the loss is made of. So: networks (models.py: backbones, ProjectionHead)
    run under autocast; similarities, logits (classifier layers included), exponentials and losses
    run inside `with full_precision(features):` on fp32 tensors (call `.float()` on what comes in).
    tests/test_precision.py checks it for every method in METHODS: nothing outside a network
    produces a bf16 tensor, and the loss equals the fp32 loss of the same features.

    Args:
        like: any tensor on the device in use (autocast is switched per device type).
    """
    return torch.autocast(like.device.type, enabled=False)


def backbone_or_head_embedding(backbone: nn.Module, head: nn.Module, x: Tensor, where: str) -> Tensor:
    """(B, D) unit features of a two-stage network, taken after the backbone or after the head.

    Used by MoCo v2 and SimCLR, whose `--embed` (head | backbone) is `where`.
    """
    f = backbone(x)
    if where == "head":
        f = head(f)
    return F.normalize(f.float(), dim=1)
