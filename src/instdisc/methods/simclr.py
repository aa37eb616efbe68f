"""SimCLR: contrastive learning with in-batch negatives (Chen, Kornblith, Norouzi, Hinton; ICML 2020).

Two augmented views of every image go through one backbone and an MLP projection head; the loss
is NT-Xent (Eq. 1): each of the 2B views must find its partner among the other 2B - 1 views of the
batch. No memory bank, no queue, no momentum encoder: the negatives are the *current* batch, which
is why SimCLR needs large batches.

Distributed: the negatives are the 2(N - 1) other views of the *global* batch of N images, not
just those of the rank's own images. Every rank gathers the projections of all ranks with
`dist.all_gather_with_grad` and computes the loss of its own anchors against them; gradients flow
back to the rank that computed each projection. A 2-process run gives the loss and the gradients
of a 1-process run over the same global batch (tests/test_moco_simclr.py).

BatchNorm: the two views are concatenated into one batch of 2B, so on one device BN runs over the
whole batch of both views, which is SimCLR's "global BN" (Sec. 2.2 of the paper: per-device BN lets
a positive pair be recognised by shared batch statistics). Under torchrun, ``--sync-bn`` (default)
converts every BN layer to SyncBatchNorm, which PyTorch supports on GPUs only; with CPU processes
(gloo) pass ``--no-sync-bn`` and BN runs per process.

Temperature: the default 0.1 is SimCLR's ImageNet default (and PIC's SimCLR baseline); the CIFAR
presets use 0.5, the value of the SimCLR repository's CIFAR-10 command.

``embed`` returns the L2-normalised projection-head output (the vector the loss sees, as NPID and
MoCo here); ``--embed backbone`` gives the L2-normalised backbone features, which SimCLR evaluates
(its Sec. 4.2: the layer before the head is the better representation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc import dist
from instdisc.augment import AugmentConfig
from instdisc.errors import ConfigError
from instdisc.methods.base import Method, StepOutput, backbone_or_head_embedding, full_precision
from instdisc.models import ProjectionHead


@dataclass
class SimCLRConfig:
    min_batch_size: ClassVar[int] = 2  # an image's negatives are the other images of the batch (config.validate)
    dim: int = field(default=128, metadata={"help": "projection size (SimCLR: 128)"})
    temperature: float = field(
        default=0.1,
        metadata={"help": "NT-Xent temperature (SimCLR ImageNet and PIC's baseline: 0.1; SimCLR's CIFAR-10 command: 0.5)"},
    )
    head_hidden: int = field(
        default=0,
        metadata={"help": "hidden width of the MLP head; 0 = the backbone's feature width (SimCLR: 2048 on ResNet-50)"},
    )
    sync_bn: bool = field(
        default=True,
        metadata={"help": "under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only)"},
    )
    embed: Literal["head", "backbone"] = field(
        default="head", metadata={"help": "what embed/kNN/export use: the normalised head output or backbone features"}
    )

    def __post_init__(self) -> None:
        # Checked when the configuration is resolved, before any data is opened.
        if self.dim <= 0:
            raise ConfigError(f"--dim must be positive; got {self.dim}.")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (it divides the similarities); got {self.temperature}.")
        if self.head_hidden < 0:
            raise ConfigError(f"--head-hidden must be >= 0; got {self.head_hidden}.")


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    t: float,
    *,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, Eq. 1
    and Algorithm 1).

    For anchor view i with partner j: l(i, j) = -log [ exp(s_ij / t) / sum_{k != i} exp(s_ik / t) ],
    where s is the cosine similarity and k runs over all 2N views of the batch but i itself. The
    loss is the mean of l over all anchors (both directions of every pair).

    Args:
        z1, z2: (B, D) L2-normalised projections of the two views of the anchors' images.
        t: temperature.
        z1_all, z2_all: (N, D) both views of the whole batch the negatives come from, rows
            ``offset .. offset + B`` being z1 and z2 (distributed: the all-gathered projections).
            Default: z1 and z2 themselves (N = B, offset 0).
        offset: position of this rank's rows in z1_all and z2_all.
    Returns:
        Scalar: the mean of l over the 2B local anchors.
    """
    if (z1_all is None) != (z2_all is None):
        raise ValueError("pass both z1_all and z2_all, or neither")
    if z1_all is None or z2_all is None:
        z1_all, z2_all = z1, z2
    b, n = z1.shape[0], z1_all.shape[0]
    anchors = torch.cat([z1, z2])  # (2B, D)
    candidates = torch.cat([z1_all, z2_all])  # (2N, D): views 1 of all images, then views 2
    logits = anchors @ candidates.t() / t  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + offset  # (B,) the anchors' images in the batch
    self_col = torch.cat([own, own + n])  # (2B,) each anchor's own column: never a candidate
    partner_col = torch.cat([own + n, own])  # (2B,) its other view: the positive
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * b, device=z1.device), self_col] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, partner_col)


def nt_xent_global(z1: Tensor, z2: Tensor, t: float) -> Tensor:
    """`nt_xent` of this rank's B anchors against both views of the global batch.

    The negatives of every anchor are the other 2(W*B) - 2 views of all W ranks. Gradients flow
    back to the rank that computed each view, so with DDP's gradient averaging a W-process step
    equals a 1-process step over the whole batch. One process: plain `nt_xent(z1, z2, t)`.
    """
    return nt_xent(
        z1, z2, t,
        z1_all=dist.all_gather_with_grad(z1), z2_all=dist.all_gather_with_grad(z2),
        offset=dist.rank() * z1.shape[0],
    )


class SimCLR(Method):
    """Backbone -> MLP projection head -> NT-Xent over the two views of the global batch."""

    Config = SimCLRConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: SimCLRConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        self.cfg = cfg
        self.head = ProjectionHead(feat_dim, cfg.dim, hidden_dim=cfg.head_hidden or feat_dim, bn=True)
        if cfg.sync_bn and dist.world_size() > 1:
            if tdist.get_backend() == "gloo":
                raise ConfigError(
                    "--sync-bn needs GPU processes (PyTorch's SyncBatchNorm does not run on CPU). Pass "
                    "--no-sync-bn to normalise over each process's own batch (what per-GPU BN does; "
                    "weaker, see SimCLR Sec. 2.2 on BN leaking positives)."
                )
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)

    def views(self, aug: AugmentConfig) -> list[AugmentConfig]:
        # Two independent draws of the same recipe (SimCLR's t, t' ~ T).
        return [aug, aug]

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        x1, x2 = views
        b = x1.shape[0]
        # One pass over both views: BatchNorm sees the whole batch of 2B views.
        z = self.head(self.backbone(torch.cat([x1, x2])))  # (2B, D)
        z = F.normalize(z.float(), dim=1)
        z1, z2 = z[:b], z[b:]  # (B, D) each
        with full_precision(z):  # logits over the 2N views in fp32 (base.full_precision)
            loss = nt_xent_global(z1, z2, self.cfg.temperature)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(1).mean()
        return StepOutput(loss=loss, logs={"pos_sim": pos_sim})

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return backbone_or_head_embedding(self.backbone, self.head, x, self.cfg.embed)  # (B, D)
