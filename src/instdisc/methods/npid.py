"""NPID: non-parametric instance discrimination (Wu, Xiong, Yu, Lin; CVPR 2018).

Every image is its own class. Its "class weight" is a momentum-averaged copy of its own feature,
kept in a memory bank (memory.py). Three objectives:

* ``--nce-k K --loss nce``: noise-contrastive estimation with K uniform negatives and a normalising
  constant Z estimated from the first batch (Eqs. 4-8; lemniscate's default), optionally tracked by
  an exponential moving average (K. He's suggestion, HobbitLong/CMC#23);
* ``--nce-k K --loss softmax``: cross-entropy over the positive and K negatives (the "updated"
  model, K = 65,536, as CPC/MoCo and mmselfsup do);
* ``--nce-k 0``: the full non-parametric softmax over the whole bank (Eq. 2).

The positive "weight" of an image is its bank row from *before* this step, as in the paper's code;
the bank is written afterwards (under no_grad, in forward, never in backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.dist import all_gather_cat
from instdisc.errors import ConfigError
from instdisc.memory import MemoryBank
from instdisc.methods.base import EpochContext, Method, StepOutput, full_precision
from instdisc.models import ProjectionHead

NCE_K = 4096  # the paper's negatives per step


@dataclass
class NPIDConfig:
    dim: int = field(default=128, metadata={"help": "embedding size; the paper uses 128"})
    nce_k: int | None = field(
        default=None,
        metadata={"help": "negatives per step; 0 = full softmax over the bank (paper: 4096). Default: 4096 when "
                          "N > 4096, else 0 (all N - 1 other images, no dearer)", "auto": True},
    )
    nce_t: float = field(
        default=0.07, metadata={"help": "temperature tau (paper: 0.07; CIFAR full softmax: 0.1)"}
    )
    nce_m: float = field(
        default=0.5,
        metadata={"help": "bank momentum m in v <- normalise(m v + (1-m) f) (paper code: 0.5)"},
    )
    loss: Literal["nce", "softmax"] = field(
        default="nce",
        metadata={"help": "with --nce-k > 0: NCE (paper) or softmax cross-entropy over K+1"},
    )
    nce_z: Literal["once", "ema"] = field(
        default="once",
        metadata={"help": "Z estimated once from the first batch (paper) or as a moving average"},
    )
    z_momentum: float = field(default=0.99, metadata={"help": "EMA momentum of Z with --nce-z ema"})
    negatives: Literal["shared", "per-sample"] = field(
        default="shared",
        metadata={
            "help": "one set of K negatives for the whole batch (one matmul, much less memory) "
            "or K per sample as the paper's code (a B x K x D gather)"
        },
    )
    prox: float = field(
        default=0.0,
        metadata={"help": "proximal weight lambda of Eq. 9, lambda |f_i - v_i|^2 (paper code: 0)"},
    )
    head_hidden: int = field(
        default=0, metadata={"help": "0 = linear head as the paper; > 0 = MLP with this width"}
    )
    bank_init: Literal["random", "features"] = field(
        default="random",
        metadata={
            "help": "initial bank: random unit vectors (paper) or the network's own features of "
            "every training image at initialisation (one extra pass; helps short runs)"
        },
    )

    def fill_defaults(self, num_samples: int, num_classes: int = 0) -> list[str]:
        """Set the size-dependent values left unset (None) for N = num_samples; say what was chosen."""
        if self.nce_k is not None:
            return []
        self.nce_k = NCE_K if num_samples > NCE_K else 0
        why = "the paper's" if self.nce_k else f"the full softmax: {NCE_K} negatives need more than {NCE_K} images"
        return [f"--nce-k {self.nce_k} ({why})"]

    def validate(self, num_samples: int) -> None:
        if self.nce_k is None:
            raise ConfigError("--nce-k is unresolved: fill_defaults(N) (methods.build_method does) chooses it.")
        if self.nce_t <= 0:
            raise ConfigError(f"--nce-t must be > 0 (it divides the similarities); got {self.nce_t}.")
        if not 0.0 <= self.nce_m < 1.0:
            raise ConfigError(f"--nce-m must be in [0, 1): 1 would never update the bank; got {self.nce_m}.")
        if self.nce_k < 0 or self.nce_k >= num_samples:
            raise ConfigError(
                f"--nce-k must be in [0, N) where N = {num_samples} training images; got "
                f"{self.nce_k}. Use --nce-k 0 for the full softmax over all {num_samples} images."
            )
        if self.dim <= 0:
            raise ConfigError(f"--dim must be positive; got {self.dim}.")
        if not 0.0 <= self.z_momentum < 1.0:
            raise ConfigError(f"--z-momentum must be in [0, 1); got {self.z_momentum}.")


def nce_loss(log_p: Tensor, num_samples: int) -> Tensor:
    """NCE loss of NPID (Wu et al. 2018, Eqs. 6-7), for K noise samples from the uniform P_n = 1/N.

    h(i, v) = P(i|v) / (P(i|v) + K P_n), J = -E_data[log h] - K E_noise[log(1 - h)]. Computed in
    the log domain, so it neither overflows for small temperatures nor needs lemniscate's eps.

    Args:
        log_p: (B, K+1) log P(j|v) = s_j / tau - log Z; column 0 is the positive.
        num_samples: N, the size of the noise distribution's support.
    Returns:
        Scalar: the summed positive and negative terms, averaged over the batch.
    """
    k = log_p.shape[1] - 1
    log_kpn = torch.tensor(math.log(k / num_samples), dtype=log_p.dtype, device=log_p.device)
    log_denom = torch.logaddexp(log_p, log_kpn)  # log(P + K P_n), (B, K+1)
    log_h_pos = log_p[:, 0] - log_denom[:, 0]  # (B,)
    log_1mh_neg = log_kpn - log_denom[:, 1:]  # (B, K)
    return -(log_h_pos.sum() + log_1mh_neg.sum()) / log_p.shape[0]


@torch.no_grad()
def estimate_log_z(logits: Tensor, num_samples: int) -> Tensor:
    """log of Z = N * mean_j exp(s_j / tau): the Monte-Carlo estimate of NPID's normaliser (Eq. 8).

    Averaged over every rank's batch so that all ranks agree on Z.
    Args:
        logits: (B, K+1) similarities divided by the temperature.
    """
    per_rank = all_gather_cat(torch.logsumexp(logits.float().flatten(), 0).reshape(1))  # (world,)
    count = logits.numel() * per_rank.numel()
    return torch.logsumexp(per_rank, 0) - math.log(count) + math.log(num_samples)


class NPID(Method):
    """Backbone -> linear head -> L2-normalised embedding, against a memory bank."""

    Config = NPIDConfig

    log_z: Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, cfg: NPIDConfig) -> None:
        super().__init__(backbone, feat_dim, num_samples)
        cfg.validate(num_samples)
        self.cfg = cfg
        self.head = ProjectionHead(feat_dim, cfg.dim, hidden_dim=cfg.head_hidden)
        self.memory = MemoryBank(num_samples, cfg.dim, momentum=cfg.nce_m)
        # NaN = "not estimated yet"; set from the first batch, then fixed (or EMA-tracked).
        self.register_buffer("log_z", torch.tensor(float("nan")))

    def forward(self, views: list[Tensor], idx: Tensor) -> StepOutput:
        (x,) = views
        f = self.head(self.backbone(x))  # (B, D), under the loop's autocast
        with full_precision(f):  # similarities, exponentials and NCE in fp32 (base.full_precision)
            return self._objective(F.normalize(f.float(), dim=1), idx)

    def _objective(self, f: Tensor, idx: Tensor) -> StepOutput:
        """The loss of unit features f (B, D) of images idx (B,) against the bank; updates the bank."""
        bank = self.memory.bank
        t, k, n = self.cfg.nce_t, self.cfg.nce_k, self.num_samples
        logs: dict[str, Tensor] = {}

        pos = bank.index_select(0, idx)  # (B, D) last step's features of these images
        if k == 0:
            # Full softmax: the bank rows are the class weights of all N instances.
            # clone(): the bank is updated in place below, but autograd needs these values.
            logits = f @ bank.clone().t() / t  # (B, N)
            loss = F.cross_entropy(logits, idx)
        else:
            if self.cfg.negatives == "shared":
                neg = bank.index_select(0, torch.randint(n, (k,), device=f.device))  # (K, D)
                l_neg = f @ neg.t()  # (B, K)
            else:
                neg_idx = torch.randint(n, (f.shape[0], k), device=f.device)  # (B, K)
                neg = bank[neg_idx]  # (B, K, D)
                l_neg = torch.einsum("bd,bkd->bk", f, neg)  # (B, K)
            l_pos = (f * pos).sum(1, keepdim=True)  # (B, 1)
            logits = torch.cat([l_pos, l_neg], dim=1) / t  # (B, K+1)
            if self.cfg.loss == "softmax":
                loss = F.cross_entropy(logits, torch.zeros_like(idx))
            else:
                self._update_z(logits.detach())
                loss = nce_loss(logits - self.log_z, n)
                logs["z"] = self.log_z.exp()
        if self.cfg.prox > 0:
            # Eq. 9: keep each feature near its previous bank entry (the paper's proximal term).
            loss = loss + self.cfg.prox * (f - pos).pow(2).sum(1).mean()
        self.memory.update(idx, f)
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def _update_z(self, logits: Tensor) -> None:
        batch_log_z = estimate_log_z(logits, self.num_samples)
        if self.cfg.nce_z == "ema":
            mu = self.cfg.z_momentum
            kept = torch.logaddexp(self.log_z + math.log(mu), batch_log_z + math.log1p(-mu))
        else:
            kept = self.log_z
        # torch.where rather than `if isnan(...)`: no host sync on GPU.
        self.log_z.copy_(torch.where(torch.isnan(self.log_z), batch_log_z, kept))

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        if self.cfg.bank_init == "features" and ctx.epoch == 0:
            # A random bank makes every positive a random target: the first epochs then scatter the
            # features away from the (already informative) random-init ones before they recover.
            # Starting from the network's own features makes the first positives meaningful.
            # predict_all returns the same (N, D) on every rank, so the banks stay identical.
            self.memory.bank.copy_(ctx.predict_all(self.embed).to(self.memory.bank))
            return {"bank_init": 1.0}
        return {}

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)  # (B, D)

    def bank_features(self) -> Tensor:
        return self.memory.bank
