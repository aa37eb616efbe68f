"""Feature stores of the methods: NPID's memory bank, and the ring buffer of MoCo's and PIC's queues.

The memory bank of NPID (Wu et al., CVPR 2018, Sec. 3.2): one L2-normalised feature per image.

Momentum convention (lemniscate's): v_i <- normalise(m * v_i + (1 - m) * f_i), so m = 0 writes the
fresh feature and m -> 1 keeps the old one. mmselfsup's SimpleMemory uses the reverse,
normalise((1 - m) * v_i + m * f_i); the two coincide at the default m = 0.5.

The bank is a registered buffer, changed only under no_grad in `update`, which gathers indices
and features from every rank first so that all ranks hold the same bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.dist import all_gather_cat


class MemoryBank(nn.Module):
    """An (N, D) bank of unit vectors, one row per training image.

    Args:
        num_samples: N, the number of training images (one row each).
        dim: D, the embedding size (NPID: 128).
        momentum: m in v <- normalise(m * v + (1 - m) * f); NPID's --nce-m (0.5).
    """

    bank: Tensor

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        # Random unit vectors: lemniscate draws uniform rows with E|v|^2 ~= 1; normalising exactly
        # makes the bank usable for kNN and cosine logits from step 0.
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim), dim=1))

    @property
    def num_samples(self) -> int:
        return self.bank.shape[0]

    @torch.no_grad()
    def update(self, idx: Tensor, z: Tensor) -> None:
        """Blend new features into their rows: every rank applies every rank's batch.

        Args:
            idx: (B,) dataset indices of this rank's batch.
            z: (B, D) features of that batch (need not be normalised; gradients are ignored).
        """
        idx = all_gather_cat(idx)  # (B * world,)
        z = all_gather_cat(z.detach().to(self.bank.dtype))  # (B * world, D)
        old = self.bank.index_select(0, idx)  # (B * world, D)
        new = F.normalize(self.momentum * old + (1.0 - self.momentum) * z, dim=1)
        self.bank.index_copy_(0, idx, new)


@torch.no_grad()
def ring_write_(buffer: Tensor, ptr: Tensor, items: Tensor) -> None:
    """Write `items` (n, ...) over the oldest rows of the ring `buffer` (K, ...) from `ptr`, in place.

    MoCo's key queue and PIC's queue of visited ids. `items` must be identical on every rank (the
    all-gathered batch), so the queues stay identical. More than K items keep only their last K.
    """
    size = buffer.shape[0]
    items = items[-size:]  # (m, ...), m <= K
    rows = (ptr + torch.arange(items.shape[0], device=buffer.device)) % size  # (m,)
    buffer.index_copy_(0, rows, items.to(buffer.device, buffer.dtype))
    ptr.copy_((ptr + items.shape[0]) % size)
