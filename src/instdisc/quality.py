"""Label-free signals of embedding quality, for runs on data without labels.

kNN accuracy needs labels; most users of self-supervised learning have none. These four numbers
need only the images. The training loop computes them at the kNN monitor's cadence on a fixed
subset of the training set (`--quality-subset`, the same images at every epoch and after a
resume) and logs them to metrics.jsonl as `align`, `uniform`, `rankme` and `nn_agree`. Which of
them track the kNN curve on which method is measured in docs/benchmarks.md ("Label-free quality
signals"); docs/quality.md says which to trust.

All inputs are L2-normalised (M, D) embeddings; everything is computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from instdisc.augment import AugmentConfig, augment, preprocess
from instdisc.loader import eval_batches
from instdisc.sources.images import ImageSet
from instdisc.sources.images import subset as take


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """Alignment of positive pairs (Wang & Isola, ICML 2020, Sec. 4.1, L_align).

    E ||z1_i - z2_i||^alpha over pairs of embeddings of two augmentations of the same image.
    0 when every image's two views embed to one point; 4 (alpha = 2) at the opposite pole.
    Lower is better, but a collapsed embedding is perfectly aligned: read it with `uniformity`.

    Args:
        z1, z2: (M, D) L2-normalised embeddings, row i of both from image i.
        alpha: exponent; the paper's default is 2.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"alignment needs two (M, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    d = (z1.float() - z2.float()).norm(dim=1)  # (M,)
    return float(d.pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """Uniformity on the hypersphere (Wang & Isola, ICML 2020, Sec. 4.1, L_uniform).

    log E exp(-t ||z_i - z_j||^2) over distinct pairs i != j: the log of the Gaussian potential.
    0 when every embedding is the same point (collapse); about -t * 2 = -4 (t = 2) for points spread
    evenly over a sphere of high dimension. Lower is better.

    Args:
        z: (M, D) L2-normalised embeddings, M >= 2.
        t: the potential's scale; the paper's default is 2.
    """
    m = z.shape[0]
    if z.ndim != 2 or m < 2:
        raise ValueError(f"uniformity needs (M, D) embeddings with M >= 2, got {tuple(z.shape)}")
    z = z.float()
    sq = (2 - 2 * (z @ z.T)).clamp_min(0)  # (M, M) squared distances of unit vectors
    off = ~torch.eye(m, dtype=torch.bool, device=z.device)
    # log-mean-exp over the M (M - 1) off-diagonal pairs, stable for any t.
    return float(torch.logsumexp(-t * sq[off], dim=0) - math.log(m * (m - 1)))


def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """Effective rank of the embeddings (RankMe; Garrido et al., ICML 2023, Eq. 1).

    exp(entropy of p), p_k = sigma_k / ||sigma||_1 + eps, sigma the singular values of the (M, D)
    matrix of embeddings. Between 1 (all rows on one line: collapse) and min(M, D). Higher is
    better; the paper finds it tracks downstream accuracy within one method's hyper-parameters.

    Args:
        z: (M, D) embeddings.
        eps: the paper's smoothing constant.
    """
    if z.ndim != 2 or min(z.shape) < 1:
        raise ValueError(f"rankme needs (M, D) embeddings, got {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.double())  # (min(M, D),); float64: tiny singular values count
    if float(s.sum()) == 0.0:
        return 1.0
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def neighbour_indices(z: Tensor, k: int) -> Tensor:
    """(M, D) L2-normalised embeddings -> (M, k) int64: each row's k nearest other rows by cosine
    similarity (itself excluded), most similar first."""
    m = z.shape[0]
    if not 0 < k < m:
        raise ValueError(f"need 0 < k < M, got k={k} for M={m}")
    s = z.float() @ z.float().T  # (M, M)
    s.fill_diagonal_(-math.inf)
    return s.topk(k, dim=1).indices  # (M, k)


def neighbour_agreement(prev: Tensor, cur: Tensor) -> float:
    """Mean fraction of each image's k nearest neighbours that are the same in two embeddings of the
    same images (e.g. two epochs): 1 when the neighbourhoods are unchanged, about k / M for
    unrelated ones. A run whose features still move a lot has low agreement; late in a good run
    it rises and settles.

    Args:
        prev, cur: (M, k) neighbour indices from `neighbour_indices`, rows = the same images.
    """
    if prev.shape != cur.shape or prev.ndim != 2:
        raise ValueError(f"neighbour_agreement needs two (M, k) tensors of one shape, got {tuple(prev.shape)} and {tuple(cur.shape)}")
    k = prev.shape[1]
    same = (prev.unsqueeze(2) == cur.unsqueeze(1)).any(dim=2)  # (M, k): prev's neighbour j also in cur
    return float(same.sum()) / (prev.shape[0] * k)


@dataclass
class QualityState:
    """What the signals keep between evaluations: the subset's neighbour lists at the last one
    (for `nn_agree`). Saved in the checkpoint, so a resumed run reports the same numbers."""

    neighbours: Tensor | None = None  # (M, k) int64

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.neighbours is None else {"neighbours": self.neighbours.cpu()}

    @classmethod
    def from_checkpoint(cls, ck: dict | None) -> QualityState:
        """A new run's empty state, or the one a checkpoint saved (none in a checkpoint from before)."""
        return cls(neighbours=((ck or {}).get("quality") or {}).get("neighbours"))


# How the signals are measured: fixed by the project (docs/quality.md), the papers' defaults.
NN_K = 10  # neighbours per image for nn_agree
ALIGN_ALPHA = 2.0  # Wang & Isola's alpha
UNIFORM_T = 2.0  # Wang & Isola's t


def quality_signals(z: Tensor, z1: Tensor, z2: Tensor, state: QualityState) -> dict[str, float]:
    """The four signals of one evaluation.

    Args:
        z: (M, D) L2-normalised embeddings of the subset under the evaluation transform.
        z1, z2: (M, D) embeddings of two random training augmentations of the same images.
        state: updated in place with this evaluation's neighbour lists.
    Returns:
        {"align", "uniform", "rankme"} and, from the second evaluation on, "nn_agree".
    """
    out = {
        "align": alignment(z1, z2, ALIGN_ALPHA),
        "uniform": uniformity(z, UNIFORM_T),
        "rankme": rankme(z),
    }
    k = min(NN_K, z.shape[0] - 1)
    nn = neighbour_indices(F.normalize(z.float(), dim=1), k).cpu()
    if state.neighbours is not None and state.neighbours.shape == nn.shape:
        out["nn_agree"] = neighbour_agreement(state.neighbours, nn)
    state.neighbours = nn
    return out


def subset_indices(n: int, size: int, seed: int) -> Tensor:
    """The `size` training images the signals are measured on: fixed by the seed, the same at every
    evaluation, on every rank and after a resume (their own generator: the run's are untouched)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 0x51A7)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values  # (M,)


@torch.no_grad()
def measure(
    embed: Callable[[Tensor], Tensor],
    images: ImageSet,
    view: AugmentConfig,
    state: QualityState,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    subset: int,
    seed: int,
    epoch: int,
    device: torch.device,
    workers: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """The signals of `embed` on `subset` training images (the model must be in eval mode).

    z: the evaluation transform, as kNN sees the images. z1, z2: two draws of the training view
    `view` on the same images (for large-image sources, drawn on the evaluation view, not on the
    original file: cheaper, and the same for every epoch). The augmentation's generator is seeded
    by (seed, epoch): reproducible, and the run's own random streams are not advanced.
    """
    keep = subset_indices(len(images), subset, seed).numpy()
    labels = None if images.labels is None else images.labels[keep]
    sub = take(images, keep, labels, images.classes)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    z, z1, z2 = [], [], []
    for x in eval_batches(sub, batch_size, device=device, workers=workers, size=size):  # (b, 3, H, W) uint8
        z.append(embed(preprocess(x, size, mean=tuple(mean), std=tuple(std))).float())
        z1.append(embed(augment(x, view, g)).float())
        z2.append(embed(augment(x, view, g)).float())
    return quality_signals(torch.cat(z), torch.cat(z1), torch.cat(z2), state)
