"""MoCo v2: momentum contrast with a queue of keys (He et al., CVPR 2020; Chen et al., "Improved
Baselines with Momentum Contrastive Learning", 2020).

Two augmented views of each image. The query encoder (backbone + head, trained by SGD) embeds the
first, the key encoder (a momentum copy of it, never trained by gradient) the second. The loss is
InfoNCE (MoCo Eq. 1): the query must pick its own key out of the queue of the last K keys. After
the step the keys of the global batch replace the oldest entries of the queue.

What MoCo v2 adds to v1, and what this file does about it:

* a 2-layer MLP head (``--mlp``, on by default). Its hidden width is the backbone's feature width,
  as in the reference code (2,048 on ResNet-50); on the narrow ResNets of this library that is
  ``8 * width`` for ResNet-18. No BatchNorm in the head (MoCo v2 has none);
* temperature 0.2 instead of 0.07 (``--moco-t``);
* Gaussian blur and a weaker hue jitter (0.1) in the augmentation. Augmentation is the run's, not
  the method's (``views`` returns two draws of it): MoCo v2's ImageNet recipe is
  ``--aug-blur-p 0.5 --aug-hue 0.1 --aug-jitter-p 0.8``. The CIFAR presets keep the hue and leave
  blur off, as MoCo's own CIFAR demo and lightly's benchmark do (a 3-px kernel on 32-px images);
* a cosine learning-rate schedule (``--schedule cosine``), set by the presets.

BatchNorm of the key encoder ("shuffle BN", MoCo Sec. 3.3): with BN over a batch that holds both
views of an image, the query and its key share batch statistics and the network can find its
positive through them instead of through the image. MoCo computes the keys on a random
permutation of the global batch split across GPUs, so a key is normalised with images other than
its query's. Here:

* under ``torchrun`` the key images of the global batch are gathered, permuted with rank 0's
  permutation, each rank encodes its slice, and the keys are gathered back and un-permuted (as
  MoCo does; the gather of keys is also the one that fills the queue);
* ``--bn-splits G`` additionally splits every rank's batch into G groups with their own BN
  statistics for both encoders (the keys' groups taken from the permuted batch). In one process
  this is how MoCo's own CIFAR demo and lightly's benchmarks simulate G GPUs. With the default
  G = 1 and one process, BN runs over the whole batch for both encoders (no shuffling is possible
  then, as in MoCo's code on one GPU): the GPU CIFAR preset sets G = 8 (MoCo's demo), the CPU one
  G = 2 (8 groups of 16 halve the throughput on a CPU).

The queue (K x D, L2-normalised rows) and its write pointer are registered buffers written under
no_grad in ``forward``; every rank writes the same all-gathered keys, so queues stay identical. If
K is not a multiple of the global batch the write wraps around the end of the queue.

``embed`` returns the L2-normalised output of the query encoder's head, the vector the loss is
computed on (as NPID's embed and MoCo's CIFAR demo's kNN monitor); ``--embed backbone`` gives the
L2-normalised backbone features instead (usually the better ones for linear probes).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc import dist
from instdisc.augment import AugmentConfig
from instdisc.errors import ConfigError, InstdiscWarning
from instdisc.memory import ring_write_
from instdisc.methods.base import Method, StepOutput, backbone_or_head_embedding, full_precision
from instdisc.models import ProjectionHead


@dataclass
class MoCoConfig:
    dim: int = field(default=128, metadata={"help": "embedding size (MoCo: 128)"})
    moco_k: int | None = field(
        default=None,
        metadata={
            "help": "queue size K, the number of negatives (MoCo: 65536 on ImageNet; CIFAR runs use "
            "4096, since K >= N puts stale keys of the query's own image in the queue). Default: the largest "
            "power of two <= N / 2, at most 65536",
            "auto": True,
        },
    )
    moco_m: float = field(
        default=0.999, metadata={"help": "momentum of the key encoder, k <- m k + (1-m) q (MoCo: 0.999)"}
    )
    moco_t: float = field(default=0.2, metadata={"help": "softmax temperature (MoCo v2: 0.2; v1: 0.07)"})
    mlp: bool = field(
        default=True,
        metadata={"help": "2-layer MLP head, hidden width = backbone width (MoCo v2); --no-mlp: linear (v1)"},
    )
    bn_splits: int = field(
        default=1,
        metadata={
            "help": "BatchNorm groups per process for both encoders, keys drawn from a shuffled batch "
            "(simulates shuffle BN over this many GPUs; across torchrun ranks keys are always shuffled)"
        },
    )
    embed: Literal["head", "backbone"] = field(
        default="head", metadata={"help": "what embed/kNN/export use: the normalised head output or backbone features"}
    )

    def fill_defaults(self, num_samples: int, num_classes: int = 0) -> list[str]:
        """Set the size-dependent values left unset (None) for N = num_samples; say what was chosen."""
        if self.moco_k is not None:
            if self.moco_k >= num_samples:
                warnings.warn(
                    f"--moco-k {self.moco_k} is not below N = {num_samples} training images: the queue then always "
                    "holds an older key of each query's own image, counted as a negative. A power of two <= N / 2 "
                    "avoids it (leave --moco-k unset to have it chosen).", InstdiscWarning, stacklevel=2)
            return []
        self.moco_k = min(65536, 1 << max(0, (max(num_samples // 2, 1)).bit_length() - 1))
        return [f"--moco-k {self.moco_k} (the largest power of two <= N / 2, at most 65536: no stale keys of "
                "a query's own image)"]

    def __post_init__(self) -> None:
        # Checked when the configuration is resolved, before any data is opened.
        if self.dim <= 0:
            raise ConfigError(f"--dim must be positive; got {self.dim}.")
        if self.moco_k is not None and self.moco_k < 1:
            raise ConfigError(f"--moco-k (queue size) must be >= 1; got {self.moco_k}.")
        if not 0.0 <= self.moco_m < 1.0:
            raise ConfigError(f"--moco-m must be in [0, 1): 1 would freeze the key encoder; got {self.moco_m}.")
        if self.moco_t <= 0:
            raise ConfigError(f"--moco-t must be > 0 (it divides the similarities); got {self.moco_t}.")
        if self.bn_splits < 1:
            raise ConfigError(f"--bn-splits must be >= 1; got {self.bn_splits}.")


def info_nce(q: Tensor, k: Tensor, queue: Tensor, t: float) -> Tensor:
    """InfoNCE of MoCo (He et al. 2020, Eq. 1; Oord et al. 2018): cross-entropy of picking the
    positive key among itself and the K queued negatives.

    L_q = -log [ exp(q.k+ / t) / (exp(q.k+ / t) + sum_i exp(q.k_i / t)) ], averaged over queries.

    Args:
        q: (B, D) L2-normalised queries.
        k: (B, D) L2-normalised positive keys, row i the key of query i.
        queue: (K, D) L2-normalised negative keys, shared by all queries.
        t: temperature.
    Returns:
        Scalar mean loss over the B queries.
    """
    l_pos = (q * k).sum(1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.t()  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / t  # (B, 1+K); the positive is column 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _split_forward(net: Callable[[Tensor], Tensor], x: Tensor, splits: int) -> Tensor:
    """net over `splits` consecutive groups of x, each with its own BatchNorm statistics."""
    if splits == 1:
        return net(x)
    if x.shape[0] % splits:
        raise ConfigError(
            f"--bn-splits {splits} must divide the per-process batch size {x.shape[0]} (each group is one "
            "simulated GPU's batch)."
        )
    return torch.cat([net(c).float() for c in x.chunk(splits)])  # fp32 once out of the network


class MoCo(Method):
    """Query encoder (backbone + head) trained by SGD; key encoder = its momentum average."""

    Config = MoCoConfig

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: MoCoConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        if cfg.moco_k is None:
            raise ConfigError("--moco-k is unresolved: fill_defaults(N) (methods.build_method does) chooses it.")
        self.cfg = cfg
        self.head = ProjectionHead(feat_dim, cfg.dim, hidden_dim=feat_dim if cfg.mlp else 0, bn=False)
        # The key encoder starts as an exact copy and never receives gradients.
        self.backbone_k = copy.deepcopy(self.backbone)
        self.head_k = copy.deepcopy(self.head)
        for p in self._key_params():
            p.requires_grad_(False)
        # Random unit keys until real ones replace them (MoCo initialises the queue the same way).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.moco_k, cfg.dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next row to write

    def _key_params(self) -> list[Tensor]:
        return [*self.backbone_k.parameters(), *self.head_k.parameters()]

    def _query_params(self) -> list[Tensor]:
        return [*self.backbone.parameters(), *self.head.parameters()]

    def views(self, aug: AugmentConfig) -> list[AugmentConfig]:
        # Query and key views: two independent draws of the same recipe.
        return [aug, aug]

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        x_q, x_k = views
        splits = self.cfg.bn_splits
        q = _split_forward(lambda x: self.head(self.backbone(x)), x_q, splits)  # (B, D)
        q = F.normalize(q.float(), dim=1)
        with torch.no_grad():
            self._momentum_update()
            k, k_all = self._keys(x_k)  # (B, D) this rank's positives, (B_global, D) all of them
        # clone(): the queue is overwritten below, but the backward pass needs these values.
        with full_precision(q):  # logits over K + 1 keys in fp32 (base.full_precision)
            loss = info_nce(q, k, self.queue.clone(), self.cfg.moco_t)
        self._enqueue(k_all)
        with torch.no_grad():
            pos_sim = (q * k).sum(1).mean()
        return StepOutput(loss=loss, logs={"pos_sim": pos_sim})

    @torch.no_grad()
    def _momentum_update(self) -> None:
        # MoCo Eq. 2: theta_k <- m theta_k + (1 - m) theta_q. Parameters only; the key encoder's BN
        # running statistics are its own (they are never used: keys are always computed in train mode).
        for pk, pq in zip(self._key_params(), self._query_params(), strict=True):
            pk.lerp_(pq.detach(), 1.0 - self.cfg.moco_m)

    @torch.no_grad()
    def _keys(self, x_k: Tensor) -> tuple[Tensor, Tensor]:
        """Keys with shuffled BN. Returns this rank's keys (B, D) and the global batch's (W*B, D),
        both in the original order."""
        world, splits, b = dist.world_size(), self.cfg.bn_splits, x_k.shape[0]

        def encode(x: Tensor) -> Tensor:
            z = _split_forward(lambda c: self.head_k(self.backbone_k(c)), x, splits)
            return F.normalize(z.float(), dim=1)  # (b, D)

        if world == 1 and splits == 1:
            return (k := encode(x_k)), k  # nothing to shuffle: one BN group
        x_all = dist.all_gather_cat(x_k)  # (W*B, 3, H, W)
        # Every rank must use the same permutation: take rank 0's.
        perm = dist.all_gather_cat(torch.randperm(x_all.shape[0], device=x_k.device)[None])[0]  # (W*B,)
        mine = perm.view(world, b)[dist.rank()]  # (B,) the images this rank encodes
        k_shuffled = dist.all_gather_cat(encode(x_all[mine]))  # (W*B, D), row j = image perm[j]
        k_all = torch.empty_like(k_shuffled).index_copy_(0, perm, k_shuffled)  # (W*B, D) original order
        return k_all.view(world, b, -1)[dist.rank()], k_all

    def _enqueue(self, keys: Tensor) -> None:
        """The global batch's keys (already gathered: identical on every rank) replace the oldest."""
        ring_write_(self.queue, self.queue_ptr, keys)

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return backbone_or_head_embedding(self.backbone, self.head, x, self.cfg.embed)  # (B, D)
