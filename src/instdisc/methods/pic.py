"""PIC: parametric instance classification (Cao, Xie, Liu, Lin, Zhang, Hu; NeurIPS 2020).

One branch: backbone -> 2-layer MLP head -> L2-normalised embedding f -> cosine classifier with one
row w_i per training image; logits cos(f, w_j) / tau, cross-entropy against the image's own index
(the paper's cosine soft-max loss, tau = 0.2). The paper adds:

* multi-crop: one large crop plus several small ones per image, every crop classified as its image;
  the small crops see a detached copy of the classifier, so only the large crop trains it
  (`views`, `forward`). Same-sized crops share one backbone pass (as SwAV; the reference runs each
  crop separately, so its BatchNorm statistics are per crop);
* the sliding-window data scheduler: `--sampler sliding` (loader.sliding_window_order), usable by
  any method;
* negative sampling (`--queue-size K`): a step's softmax runs over the instances of the current
  global batch plus a queue of the K most recently visited instance ids, not over all N;
* weight-update correction (`--correction`): rows left out of a step still decay under SGD momentum
  and weight decay in dense training; that evolution is applied in closed form when a row is next
  sampled (sparse_sgd.py, exact for any lr schedule).

Beyond the paper, `--rows-on host` keeps the N classifier rows and their momentum in host memory
and moves only the sampled rows to the training device, and `--row-init features` starts each row at
its image's own embedding instead of a random vector (for short runs: a row moves only when its
image is sampled; docs/pic.md).

With `--queue-size 0` (the default, as the released code) the classifier is an ordinary
nn.Parameter trained by plain SGD over all N rows.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.augment import AugmentConfig
from instdisc.dist import all_gather_cat, rank
from instdisc.errors import ConfigError, InstdiscWarning
from instdisc.memory import ring_write_
from instdisc.methods.base import EpochContext, Method, StepOutput, full_precision
from instdisc.models import ProjectionHead
from instdisc.sparse_sgd import SampledRows, SampledRowSGD


@dataclass
class PICConfig:
    dim: int = field(default=128, metadata={"help": "embedding size (PIC: 128)"})
    temperature: float = field(default=0.2, metadata={"help": "tau of the cosine soft-max, cos(f, w) / tau (PIC: 0.2)"})
    head_hidden: int = field(
        default=0, metadata={"help": "hidden width of the 2-layer MLP head; 0 = the backbone's feature size (PIC)"}
    )
    small_crops: int = field(
        default=3, metadata={"help": "small crops per image besides the large one (PIC: 3 x 96 px with 1 x 160 px)"}
    )
    small_size: int = field(
        default=0,
        metadata={"help": "side of the small crops; 0 = 3/5 of --aug-size rounded to even (PIC's 96/160; 32 px -> 20)"},
    )
    small_scale: tuple[float, float] = field(
        default=(0.08, 0.14),
        metadata={"help": "area range of the small crops (PIC: 0.08 0.14; the large crop uses --aug-scale, PIC 0.14 1)"},
    )
    queue_size: int = field(
        default=0,
        metadata={"help": "negative sampling: classes = global batch + the last K visited ids; 0 = all N (paper: 65536)"},
    )
    correction: bool = field(
        default=True,
        metadata={"help": "with --queue-size: apply the skipped momentum/weight-decay steps to re-sampled rows"},
    )
    rows_on: Literal["device", "host"] = field(
        default="device",
        metadata={"help": "with --queue-size: where the N classifier rows live; host = only sampled rows on the device"},
    )
    init_std: float = field(default=0.01, metadata={"help": "std of the classifier's normal init (PIC: 0.01)"})
    row_init: Literal["random", "features"] = field(
        default="random",
        metadata={
            "help": "initial classifier rows: N(0, init_std^2) (paper) or each image's own embedding at "
            "initialisation, scaled to the random rows' norm init_std*sqrt(dim) (one extra pass; helps short runs)"
        },
    )

    def validate(self, num_samples: int) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 (it divides the cosines); got {self.temperature}.")
        if self.dim <= 0 or self.head_hidden < 0:
            raise ConfigError(f"--dim must be > 0 and --head-hidden >= 0; got {self.dim} and {self.head_hidden}.")
        if self.small_crops < 0 or self.small_size < 0:
            raise ConfigError(f"--small-crops and --small-size must be >= 0; got {self.small_crops}, {self.small_size}.")
        lo, hi = self.small_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"--small-scale must satisfy 0 < min <= max <= 1; got {lo} {hi}.")
        if self.queue_size < 0 or self.queue_size >= num_samples:
            raise ConfigError(
                f"--queue-size must be in [0, N) where N = {num_samples} training images; got {self.queue_size}. "
                f"A queue of N or more ids samples every class anyway: use --queue-size 0 for the full classifier."
            )
        if self.rows_on == "host" and self.queue_size == 0:
            raise ConfigError("--rows-on host needs negative sampling (--queue-size > 0): the full classifier "
                              "is an ordinary parameter on the training device.")
        if self.init_std <= 0:
            raise ConfigError(f"--init-std must be > 0; got {self.init_std}.")


def small_crop_size(size: int) -> int:
    """PIC's small/large ratio 96/160 = 3/5, rounded to an even side (at least 2)."""
    return max(2, 2 * round(size * 0.3))


def sampled_classes(batch_ids: Tensor, queue: Tensor) -> tuple[Tensor, Tensor]:
    """The classes of one step under negative sampling, each once.

    Args:
        batch_ids: (B,) ids of the global batch (a sliding window may repeat one).
        queue: (K,) ids visited in the previous steps (often overlapping the batch).
    Returns:
        classes: (C,) sorted unique ids, C <= B + K; columns: (B,) column of each batch id in them.
    """
    classes = torch.unique(torch.cat([batch_ids, queue]))  # (C,) sorted
    return classes, torch.searchsorted(classes, batch_ids)


def multicrop_cosine_loss(f: Tensor, fs: Tensor, w: Tensor, target: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """PIC's cosine soft-max loss over every crop (Cao et al. 2020, Sec. 3.1 and 4.2).

    loss = mean over crops c of -log softmax_j(cos(f_c, w_j) / t)[target], where the small crops see
    a detached classifier, so that only the large crop trains the rows (the paper's multi-crop).

    Args:
        f: (B, D) unit embeddings of the large crops.
        fs: (S*B, D) unit embeddings of the S small crops of every image (crop-major), or (0, D).
        w: (C, D) classifier rows (all N, or the sampled classes), any norm.
        target: (B,) column of each image's own row in w.
        t: temperature tau.
    Returns:
        The scalar mean loss over all (1 + S) * B crops, as the reference's single cross-entropy call,
        and the large crops' logits (B, C) for logging.
    """
    wn = F.normalize(w, dim=1)  # (C, D): normalised once for all crops
    logits = f @ wn.t() / t  # (B, C)
    logits_small = fs @ wn.detach().t() / t  # (S*B, C)
    n_small = fs.shape[0] // max(f.shape[0], 1)
    loss = F.cross_entropy(torch.cat([logits, logits_small]), target.repeat(1 + n_small))
    return loss, logits


class PIC(Method):
    """Backbone -> MLP head -> cosine classifier over the N training images."""

    Config = PICConfig

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: PICConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        cfg.validate(num_samples)
        self.cfg = cfg
        self.head = ProjectionHead(feat_dim, cfg.dim, hidden_dim=cfg.head_hidden or feat_dim, bn=False)
        self.rows: SampledRows | None = None
        if cfg.queue_size == 0:
            self.classifier = nn.Parameter(torch.randn(num_samples, cfg.dim) * cfg.init_std)  # (N, D)
        else:
            self.rows = SampledRows(num_samples, cfg.dim, init_std=cfg.init_std, host=cfg.rows_on == "host",
                                    correct=cfg.correction)
            # Before any step nothing was visited: start from random distinct ids (uniform negatives).
            self.register_buffer("queue", torch.randperm(num_samples)[: cfg.queue_size])  # (K,)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def views(self, aug: AugmentConfig) -> list[AugmentConfig]:
        small = dataclasses.replace(aug, size=self.cfg.small_size or small_crop_size(aug.size),
                                    scale=tuple(self.cfg.small_scale))
        return [aug] + [small] * self.cfg.small_crops

    def _embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)  # (b, D)

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        large, *small = views
        f = self._embed(large)  # (B, D)
        # Small crops of one size go through the network together: (S*B, D).
        fs = self._embed(torch.cat(small)) if small else f.new_zeros(0, f.shape[1])
        logs: dict[str, Tensor] = {}
        if self.rows is None:
            w, target = self.classifier, idx  # (N, D)
        else:
            w, target = self._sample(idx)  # (C, D), columns of the batch's ids
            logs["classes"] = torch.tensor(float(w.shape[0]))
        with full_precision(f):  # cosine logits and cross-entropy in fp32 (base.full_precision)
            loss, logits = multicrop_cosine_loss(f, fs, w.float(), target, self.cfg.temperature)
        logs["acc"] = (logits.detach().argmax(1) == target).float().mean()
        return StepOutput(loss=loss, logs=logs)

    def _sample(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Negative sampling: fetch the rows of the global batch + queue; then enqueue the batch."""
        assert self.rows is not None
        with torch.no_grad():
            batch_ids = all_gather_cat(idx)  # (B_global,) identical on every rank
            classes, columns = sampled_classes(batch_ids, self.queue)  # (C,), (B_global,)
            self._enqueue(batch_ids)
        b = idx.shape[0]
        target = columns[rank() * b : (rank() + 1) * b]  # (B,) this rank's slice of the global batch
        w = self.rows.fetch(classes, device=idx.device)  # (C, D) leaf, corrected to this step
        return w, target

    def _enqueue(self, ids: Tensor) -> None:
        """Ring buffer of the last K visited ids; `ids` are the all-gathered batch (same on every rank)."""
        ring_write_(self.queue, self.queue_ptr, ids)

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        if self.cfg.row_init != "features" or ctx.epoch != 0:
            return {}
        # Random rows make every image's first targets random directions, and in a short run a row
        # is visited too few times to recover (the loss stays near ln C). Starting each row at its
        # image's own embedding makes the first steps a real instance discrimination, as NPID's
        # bank_init. The norm stays the random init's, so the first updates move rows as in the paper.
        # predict_all returns the same (N, D) on every rank, so the rows stay identical.
        rows = ctx.predict_all(self.embed) * (self.cfg.init_std * self.cfg.dim**0.5)  # (N, D)
        if self.rows is None:
            self.classifier.data.copy_(rows.to(self.classifier))
        else:
            self.rows.weight.copy_(rows.to(self.rows.weight))
        return {"row_init": 1.0}

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return self._embed(x)

    def bank_features(self) -> Tensor:
        """The classifier rows, normalised: they align with their images' embeddings (kNN monitor)."""
        device = self.queue.device if self.rows is not None else self.classifier.device
        if self.rows is None:
            return F.normalize(self.classifier.detach().float(), dim=1)
        chunks = [self.rows.current(ids)[0].to(device) for ids in torch.arange(self.num_samples).split(65536)]
        return F.normalize(torch.cat(chunks).float(), dim=1)  # (N, D), corrected to the current step

    def configure_optimizer(
        self, lr: float, momentum: float, weight_decay: float, impl: str = "auto"
    ) -> torch.optim.Optimizer:
        if self.rows is None:
            return super().configure_optimizer(lr, momentum, weight_decay, impl)
        if impl != "auto":  # the sampled rows have their own update rule, which has one kernel
            warnings.warn(f"--optimizer-impl {impl} is ignored: PIC with sampled classes builds its own optimiser "
                          "(SampledRowSGD).", InstdiscWarning, stacklevel=3)
        return SampledRowSGD(self.parameters(), self.rows, lr=lr, momentum=momentum, weight_decay=weight_decay)
