"""SeLa: self-labelling by simultaneous clustering and representation learning.

Asano, Rupprecht, Vedaldi, ICLR 2020. The network is a backbone with H linear classification heads
("hc"), head h having K_h clusters ("ncl"). Training alternates two steps that optimise one
objective, the cross-entropy between the heads' posteriors and the labels, subject to every cluster
receiving the same number of images:

1. representation: ordinary classification, loss = mean over heads of cross-entropy against each
   head's current labels (an H x N buffer, one row per head);
2. labels: from time to time the whole training set is run through the network and each head's
   labels are re-solved as a balanced optimal-transport problem (``sinkhorn.sinkhorn_knopp``).

Initial labels are a random balanced assignment (image i gets cluster i mod K, shuffled).

Relabelling schedule. The paper's code spreads ``nopts`` label optimisations over the run in
images seen, linearly (its CIFAR code) or quadratically, denser early (its ImageNet code). Here the
hook runs at epoch starts, so optimisation j of ``nopts`` is placed at epoch floor(E * j / nopts)
(linear) or floor(E * (j / nopts)^2) (quadratic), j = 0 .. nopts-1; all of them fall in [0, E),
the first at epoch 0 (the random network's balanced labels, as the paper). Several optimisations
that land on the same epoch start act as one when every head is relabelled (nothing changed in
between); with ``--relabel-heads round-robin`` (the paper's CIFAR recipe: one head per
optimisation) optimisation j relabels head j mod H, so an epoch with several relabels distinct
heads. The schedule depends on ``--epochs`` only, so a resumed run relabels exactly as an
uninterrupted one.

The label pass. The paper's code runs it with training augmentation and the network in training
mode; here it uses ``EpochContext.predict_shard`` (each training image once, the evaluation
transform, eval mode): deterministic labels, identical on resume, and no BatchNorm statistics
updated by a pass that is not training. The backbone features are computed once and all heads are
applied to them (as the paper's code does for H > 1).

Distributed: the N x K matrix is sharded by rows. Each rank embeds only its own contiguous block
of n_r = ceil(N / world) images (``predict_shard``: nothing is gathered; a caller that offers only
``predict_all`` still works, its full (N, D) result is cut to this rank's block), the solver
all-reduces the K column sums, and the new labels are all-gathered, so every rank ends with the
same H x N buffer (the engine checks this at every checkpoint).

Memory of the label pass, per rank, one head at a time (K = that head's clusters, D = feature
width, fp32): this rank's features (n_r x D, kept for all heads) plus the solver's kernel
(n_r x K) plus temporaries of blocks of 8192 rows (0.21-0.25 GB at K = 3,000, measured). The
log-posteriors are never stored: the solver (``sinkhorn.sinkhorn_knopp_rows``) asks for them
block by block, and each block is recomputed from the features (an (8192, D) x (D, K) product and
a log_softmax) to build the kernel, at each absorption (``sk_rebuilds`` in the log) and for the
final argmax. The earlier code held all N x D features on every rank plus the log-posteriors
next to the kernel: N D + 2 n_r K floats. Measured (benchmarks/sela_relabel_memory.py,
docs/benchmarks.md "SeLa relabel memory"): peak growth 1.09 N K floats against 2.09 at
N = 200 k, K = 3,000, identical labels, and 1.7x the time on CPU (10 rebuilds, each one more
product of D = 128 features; on a GPU the product is cheap against the pass over the images).

Options weighed: (1) keep only the kernel and rescale it in place at absorption (no
recomputation): entries flushed to zero stay zero and the rounding changes, so iterations and
labels drift (1 label of 5,000 and 140 -> 152 iterations at logit std 10, 5,000 x 100), and the
final argmax still needs the log-posteriors; (2) store the log-posteriors in fp16 / bf16: 3-12 /
22-65 labels of 20,000 change (20,000 x 300, logit std 2 and 4); (3) recompute them block by
block, chosen: the blocks are fixed and each product and log_softmax is row-wise, so every
recomputation returns the same values and the solve is exactly the solve of those
log-posteriors. On CPU (MKL) a row block of a matrix product has the same bits as the full
product, so the labels equal the earlier code's (tests/test_sela.py,
test_relabel_labels_equal_the_full_matrix_path and
test_sharded_relabel_from_feature_shards_equals_the_full_matrix_path). On a GPU a block's product
may differ from the full product in the last bit (cuBLAS picks kernels by shape), which can only
move a label whose two best clusters tie to float32 rounding.

Outputs. At each relabelling, and at the start of the last epoch, rank 0 writes
RUN_DIR/pseudo_labels/head{h}.npy ((N,) int64, row i = dataset index i) and meta.json; labels change
only at relabellings, so these are the final labels (``instdisc clusters RUN_DIR`` writes them
again from a checkpoint). They can train
a plain classifier: ``instdisc train --method supervised --labels RUN_DIR/pseudo_labels/head0.npy``.
Where the source has labels, NMI, adjusted Rand, purity and (for K = number of classes) the
Hungarian-matched accuracy of each relabelled head go to metrics.jsonl.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc import dist
from instdisc.cluster import cluster_metrics
from instdisc.errors import ConfigError
from instdisc.methods.base import EpochContext, Method, StepOutput, full_precision
from instdisc.sinkhorn import sinkhorn_knopp_rows


@dataclass
class SeLaConfig:
    hc: int = field(default=1, metadata={"help": "number of classification heads (paper: 1 or 10 on ImageNet, 10 on CIFAR)"})
    ncl: list[int] | None = field(
        default=None,
        metadata={"help": "clusters per head: one value for all heads, or one per head (paper: 3000 ImageNet, 128 "
                          "CIFAR). Default: min(3000, N // 10), at least 2 (ten images per cluster at least)",
                  "auto": True},
    )
    lamb: float = field(
        default=25.0,
        metadata={"help": "Sinkhorn lambda, the inverse entropy weight: larger = harder labels (paper: 25 ImageNet, 10 CIFAR)"},
    )
    nopts: int = field(
        default=100, metadata={"help": "label optimisations over the run, 0 = keep the random labels (paper: 100 ImageNet, 1 per epoch CIFAR)"}
    )
    spacing: Literal["quadratic", "linear"] = field(
        default="quadratic", metadata={"help": "spread of the optimisations: quadratic = denser early (paper ImageNet) or linear (paper CIFAR)"}
    )
    relabel_heads: Literal["all", "round-robin"] = field(
        default="all", metadata={"help": "heads re-solved per optimisation: all (paper ImageNet) or one in turn (paper CIFAR)"}
    )
    sk_tol: float = field(
        default=0.1, metadata={"help": "Sinkhorn stops when sum_i |N rowsum_i - 1| <= this (paper code: 0.1 ImageNet, 0.01 CIFAR)"}
    )
    sk_max_iter: int = field(default=1000, metadata={"help": "Sinkhorn iteration cap (labels stay balanced per cluster if hit)"})
    sk_overrelax: bool = field(
        default=True, metadata={"help": "adaptive over-relaxation of Sinkhorn (same solution, 2-4x fewer iterations); off = the paper's plain iteration"}
    )
    export_labels: bool = field(default=True, metadata={"help": "write RUN_DIR/pseudo_labels/head{h}.npy at each relabelling"})

    def fill_defaults(self, num_samples: int, num_classes: int = 0) -> list[str]:
        """Set the size-dependent values left unset (None) for N = num_samples; say what was chosen."""
        if self.ncl is not None:
            return []
        self.ncl = [min(3000, max(2, num_samples // 10))]
        return [f"--ncl {self.ncl[0]} (min(3000, N // 10): at least ten images per cluster)"]

    def head_sizes(self) -> list[int]:
        return list(self.ncl) * self.hc if len(self.ncl) == 1 else list(self.ncl)

    def validate(self, num_samples: int) -> None:
        if self.ncl is None:
            raise ConfigError("--ncl is unresolved: fill_defaults(N) (methods.build_method does) chooses it.")
        if self.hc < 1:
            raise ConfigError(f"--hc (number of heads) must be >= 1; got {self.hc}.")
        if len(self.ncl) not in (1, self.hc):
            raise ConfigError(
                f"--ncl takes one value for every head or one per head: {self.hc} head(s) but {len(self.ncl)} values {self.ncl}."
            )
        for k in self.ncl:
            if not 2 <= k <= num_samples:
                raise ConfigError(
                    f"--ncl values must be in [2, N] where N = {num_samples} training images (clusters of equal size need "
                    f"at least one image each); got {k}."
                )
        if self.lamb <= 0:
            raise ConfigError(f"--lamb must be > 0; got {self.lamb}.")
        if self.nopts < 0:
            raise ConfigError(f"--nopts must be >= 0; got {self.nopts}.")
        if self.sk_tol < 0 or self.sk_max_iter < 1:
            raise ConfigError(f"--sk-tol must be >= 0 and --sk-max-iter >= 1; got {self.sk_tol}, {self.sk_max_iter}.")


def balanced_random_labels(num_heads: int, num_samples: int, num_clusters: list[int]) -> Tensor:
    """(H, N) int64: for each head, image i gets cluster i mod K, then the images are shuffled.

    Cluster sizes differ by at most one. Uses the global torch RNG (seeded identically on every
    rank before the model is built, so all ranks start with the same labels).
    """
    rows = [(torch.arange(num_samples) % k)[torch.randperm(num_samples)] for k in num_clusters[:num_heads]]
    return torch.stack(rows)


def relabel_schedule(num_epochs: int, nopts: int, spacing: str) -> list[int]:
    """Number of label optimisations due at the start of each epoch: a list of length num_epochs.

    Optimisation j (0 <= j < nopts) sits at time t_j = E * j / nopts (linear) or E * (j / nopts)^2
    (quadratic: gaps grow linearly, so it is denser early) in epochs, and runs at the start of
    epoch floor(t_j). Integer arithmetic, so the counts are exact; they always sum to nopts.
    """
    counts = [0] * num_epochs
    for j in range(nopts):
        if spacing == "linear":
            e = num_epochs * j // nopts
        elif spacing == "quadratic":
            e = num_epochs * j * j // (nopts * nopts)
        else:
            raise ValueError(f"unknown spacing {spacing!r}")
        counts[e] += 1
    return counts


class SeLa(Method):
    """Backbone -> H linear heads (stacked in one Linear) trained against balanced pseudo-labels."""

    Config = SeLaConfig

    labels: Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: SeLaConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        cfg.validate(num_samples)
        self.cfg = cfg
        self.sizes = cfg.head_sizes()  # K_h per head
        # One Linear for all heads: row block h of the weight is head h's classifier.
        self.heads = nn.Linear(feat_dim, sum(self.sizes))
        nn.init.normal_(self.heads.weight, 0.0, 0.01)  # the paper code's init of its top layers
        nn.init.zeros_(self.heads.bias)
        self.register_buffer("labels", balanced_random_labels(cfg.hc, num_samples, self.sizes))  # (H, N)

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        (x,) = views
        feats = self.backbone(x)  # (B, F), under the loop's autocast
        with full_precision(feats):  # the heads' logits and cross-entropy in fp32 (base.full_precision)
            logits = self.heads(feats.float())  # (B, sum K_h)
            targets = self.labels[:, idx]  # (H, B)
            losses = [F.cross_entropy(lg, targets[h]) for h, lg in enumerate(logits.split(self.sizes, dim=1))]
            return StepOutput(loss=torch.stack(losses).mean())

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        # The paper evaluates kNN on the features feeding the heads (AlexNet: after the FC layers).
        return F.normalize(self.backbone(x).float(), dim=1)  # (B, D)

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, Any]:
        counts = relabel_schedule(ctx.num_epochs, self.cfg.nopts, self.cfg.spacing)
        due = counts[ctx.epoch] if ctx.epoch < len(counts) else 0
        if due == 0:
            if ctx.epoch == ctx.num_epochs - 1 and self.cfg.export_labels and ctx.save is not None:
                ctx.save(self.label_files(epoch=ctx.epoch))  # the final labels, even with --nopts 0
            return {}
        if self.cfg.relabel_heads == "all":
            heads = list(range(self.cfg.hc))
        else:
            done = sum(counts[: ctx.epoch])
            heads = sorted({(done + j) % self.cfg.hc for j in range(due)})
        return self.relabel(ctx, heads)

    @torch.no_grad()
    def relabel(self, ctx: EpochContext, heads: list[int]) -> dict[str, Any]:
        """Re-solve the labels of `heads` on the whole training set; returns scalars to log."""
        t0 = time.perf_counter()
        n, world, rank = self.num_samples, dist.world_size(), dist.rank()
        shard = -(-n // world)
        lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
        was_training = self.training
        self.eval()
        try:
            if ctx.predict_shard is not None:
                local = ctx.predict_shard(self.backbone).float()  # (n_r, D) this rank's rows only
            else:
                feats = ctx.predict_all(self.backbone)  # (N, D) full and index-ordered on every rank
                if feats.shape[0] != n:
                    raise RuntimeError(f"predict_all returned {feats.shape[0]} rows for {n} training images")
                local = feats[lo:hi].float().clone() if world > 1 else feats.float()  # a copy: frees the rest
                del feats
        finally:
            self.train(was_training)
        if local.shape[0] != hi - lo:
            raise RuntimeError(f"rank {rank} got {local.shape[0]} feature rows for its {hi - lo} training images")
        weights = self.heads.weight.float().split(self.sizes, dim=0)  # H x (K_h, D)
        biases = self.heads.bias.float().split(self.sizes, dim=0)
        logs: dict[str, Any] = {"relabel_heads": len(heads)}
        per_head: dict[str, list[float]] = {}
        for h in heads:
            w, b = weights[h], biases[h]

            def log_posteriors(i: int, j: int, w: Tensor = w, b: Tensor = b) -> Tensor:
                return torch.log_softmax(local[i:j] @ w.t() + b, dim=1)  # (j - i, K_h)

            res = sinkhorn_knopp_rows(
                log_posteriors, hi - lo, self.sizes[h], self.cfg.lamb, self.cfg.sk_tol, self.cfg.sk_max_iter,
                device=local.device, sharded=world > 1, overrelax=self.cfg.sk_overrelax,
            )
            new = _gather_rows(res.labels, shard, n)  # (N,) identical on every rank
            changed = float((new != self.labels[h]).float().mean())
            self.labels[h].copy_(new)
            stats = {"sk_iters": float(res.iters), "sk_err": res.err, "sk_rebuilds": float(res.rebuilds), "changed": changed}
            if ctx.labels is not None and dist.is_main():
                true = ctx.labels.cpu().numpy()
                stats.update(cluster_metrics(new.cpu().numpy(), true, num_clusters=self.sizes[h]))
            for key, val in stats.items():
                logs[f"{key}_h{h}"] = val
                per_head.setdefault(key, []).append(val)
        # Means over the heads relabelled now (with one head: that head's values).
        logs.update({key: float(np.mean(vals)) for key, vals in per_head.items()})
        logs["relabel_s"] = time.perf_counter() - t0
        if self.cfg.export_labels and ctx.save is not None:
            ctx.save(self.label_files(epoch=ctx.epoch))
        return logs

    def label_files(self, *, epoch: int | None = None) -> dict[str, bytes]:
        """RUN/pseudo_labels/head{h}.npy ((N,) int64, index-ordered) and meta.json, as bytes."""
        return pseudo_label_files(self.labels, self.sizes, epoch=epoch)


def _gather_rows(local: Tensor, shard: int, n: int) -> Tensor:
    """Concatenate every rank's contiguous block of `shard` rows (the last may be shorter): (n,)."""
    if dist.world_size() == 1:
        return local
    pad = local.new_zeros(shard - local.shape[0])
    return dist.all_gather_cat(torch.cat([local, pad]))[:n]


def pseudo_label_files(labels: Tensor, sizes: list[int], *, epoch: int | None = None) -> dict[str, bytes]:
    """The pseudo-label export: {"pseudo_labels/head{h}.npy": (N,) int64 in dataset index order, ...,
    "pseudo_labels/meta.json": heads, clusters, epoch}. Pure: the caller writes them (EpochContext.save,
    `instdisc clusters`), atomically, through `checkpoint.write_run_files`."""
    files: dict[str, bytes] = {}
    for h, row in enumerate(labels.cpu().numpy().astype(np.int64)):
        buf = io.BytesIO()
        np.save(buf, row, allow_pickle=False)
        files[f"pseudo_labels/head{h}.npy"] = buf.getvalue()
    meta = {"epoch": epoch, "heads": len(sizes), "clusters": sizes, "num_samples": int(labels.shape[1]),
            "files": [Path(k).name for k in files], "order": "row i = training image i (dataset index order)"}
    files["pseudo_labels/meta.json"] = json.dumps(meta, indent=2).encode()
    return files
