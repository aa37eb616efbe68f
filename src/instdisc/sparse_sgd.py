"""SGD on an (N, D) weight matrix of which each step only touches a sampled set of rows.

PIC (Cao et al., NeurIPS 2020) gives every training image a classifier row. With its negative
sampling, a step computes logits only for the sampled rows, so only they get a gradient. Dense SGD
would still move the other rows: with momentum mu, weight decay lambda and learning rate eta_t, a
row whose loss gradient is zero evolves linearly (PyTorch's SGD: dampening 0, no Nesterov),

    u_{t+1} = mu u_t + lambda w_t
    w_{t+1} = w_t - eta_t u_{t+1} = (1 - eta_t lambda) w_t - eta_t mu u_t,

that is [w; u]_{t+1} = M_t [w; u]_t with M_t = [[1 - eta_t lambda, -eta_t mu], [lambda, mu]]. The
paper's "weight update correction" applies the skipped steps in closed form when a row is sampled
again. With a constant lr that is M^k. Here the lr may change every step (warm-up, cosine), so the
product M_{b-1} ... M_a over the skipped steps [a, b) is read from a segment tree of the per-step
matrices, in O(log T) 2x2 products per row. The correction is therefore exact for any schedule, up
to float rounding (the matrices are kept in float64); no "current lr" approximation is made.

State (all in the module's state_dict, so a resumed run continues exactly):
  weight, momentum: (N, D) rows and their SGD momentum buffer, current as of step last_step[i];
  last_step: (N,) int64; clock: () int64, steps taken; tree: the per-step matrices and the
  products of aligned blocks of 2^l steps.
With ``host=True`` the three N-row tensors stay in host memory whatever ``.to()`` asks; only the
sampled rows travel to the training device each step, so N is bounded by host memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from instdisc.dist import all_reduce_

_INITIAL_STEPS = 1024  # tree capacity in steps; doubles when full


def sgd_transition(lr: float, momentum: float, weight_decay: float) -> Tensor:
    """M of one SGD step on a row with zero loss gradient: [w; u] -> M [w; u]. (2, 2) float64."""
    return torch.tensor(
        [[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]], dtype=torch.float64
    )


def _level_offset(capacity: int, level: Tensor | int) -> Tensor | int:
    # Level l (blocks of 2^l steps, capacity >> l of them) starts at 2C - 2C / 2^l in the flat tree.
    return 2 * capacity - ((2 * capacity) >> level)


def _floor_log2(x: Tensor) -> Tensor:
    """floor(log2 x) of positive int64 values, exactly (frexp gives x = m 2^e with m in [0.5, 1))."""
    return torch.frexp(x.double()).exponent.long() - 1


def range_products(tree: Tensor, capacity: int, start: Tensor, stop: int) -> Tensor:
    """M_{stop-1} ... M_{start_i} for every row i: the evolution over steps [start_i, stop).

    Greedy cover of [a, b) by aligned blocks: at a, the largest block 2^l with a divisible by 2^l
    that still fits. At most 2 log2(b) blocks, done for all rows at once (a fixed number of
    iterations, no host sync); rows already at b multiply by the identity.

    Args:
        tree: (2C, 2, 2) flat segment tree (level 0 = the per-step matrices).
        capacity: C, a power of two.
        start: (K,) int64 step at which each row's state is current, <= stop.
        stop: the current step.
    Returns:
        (K, 2, 2) float64 products, on tree's device.
    """
    a = start.to(tree.device, torch.int64)  # (K,)
    out = torch.eye(2, dtype=tree.dtype, device=tree.device).repeat(a.shape[0], 1, 1)  # (K, 2, 2)
    for _ in range(2 * max(stop, 1).bit_length()):
        rem = stop - a  # (K,) steps still to cover
        active = rem > 0
        fit = _floor_log2(rem.clamp(min=1))  # largest block that fits
        align = torch.where(a > 0, _floor_log2((a & -a).clamp(min=1)), torch.full_like(a, 62))  # trailing zeros
        level = torch.minimum(fit, align)
        idx = _level_offset(capacity, level) + (a >> level)  # (K,) flat index of block [a, a + 2^l)
        block = tree[idx.clamp(max=tree.shape[0] - 1)]  # (K, 2, 2)
        block = torch.where(active[:, None, None], block, torch.eye(2, dtype=tree.dtype, device=tree.device))
        out = block @ out  # later steps multiply from the left
        a = a + torch.where(active, torch.bitwise_left_shift(torch.ones_like(level), level), 0)
    return out


class SampledRows(nn.Module):
    """N weight rows trained by SGD of which each step updates only the sampled ones.

    `fetch(ids)` returns those rows brought up to the current step, as a leaf tensor that the loss
    uses; `SampledRowSGD.step()` applies the SGD update to them and writes them back.

    Args:
        num_rows: N.
        dim: D.
        init_std: rows start as N(0, init_std^2) (PIC: 0.01).
        host: keep the N-row tensors in host memory (see the module docstring).
        correct: apply the skipped steps on fetch (the paper's correction). False = rows simply
            keep their value and momentum while not sampled (the ablation).
    """

    clock: Tensor
    tree: Tensor

    def __init__(self, num_rows: int, dim: int, *, init_std: float = 0.01, host: bool = False, correct: bool = True) -> None:
        super().__init__()
        self.num_rows, self.dim, self.host, self.correct = num_rows, dim, host, correct
        rows = {
            "weight": torch.randn(num_rows, dim) * init_std,
            "momentum": torch.zeros(num_rows, dim),
            "last_step": torch.zeros(num_rows, dtype=torch.int64),
        }
        for name, t in rows.items():
            if host:
                setattr(self, name, t)  # plain attributes: .to() leaves them where they are
            else:
                self.register_buffer(name, t)
        self.register_buffer("clock", torch.zeros((), dtype=torch.int64))
        self.register_buffer("tree", self._empty_tree(_INITIAL_STEPS))
        self._steps = 0  # host copy of `clock`: no device sync to read it
        # The sampled rows of the current step: a fresh leaf per fetch() (autograd fixes a leaf's shape
        # at first use). The optimiser's param group holds this very list, so it sees each new leaf.
        self.slot: list[Tensor] = [torch.zeros(0, dim, requires_grad=True)]
        self._pending: tuple[Tensor, Tensor] | None = None  # (ids on the rows' device, momentum rows)

    @staticmethod
    def _empty_tree(capacity: int, like: Tensor | None = None) -> Tensor:
        eye = torch.eye(2, dtype=torch.float64, device=None if like is None else like.device)
        return eye.repeat(2 * capacity, 1, 1)  # (2C, 2, 2), identity = "no step recorded"

    @property
    def leaf(self) -> Tensor:
        return self.slot[0]

    @property
    def capacity(self) -> int:
        return self.tree.shape[0] // 2

    @property
    def steps(self) -> int:
        return self._steps

    @torch.no_grad()
    def current(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(K, D) weight and momentum rows of `ids`, with every step they missed applied."""
        ids = ids.to(self.weight.device)
        w = self.weight.index_select(0, ids)  # (K, D)
        u = self.momentum.index_select(0, ids)  # (K, D)
        if self.correct:
            last = self.last_step.index_select(0, ids)  # (K,)
            stale = (last < self._steps).nonzero().squeeze(1)  # only rows that missed steps
            if stale.numel():
                p = range_products(self.tree, self.capacity, last[stale], self._steps)  # (S, 2, 2)
                p = p.to(w.device, w.dtype)
                ws, us = w[stale], u[stale]  # (S, D)
                w[stale] = p[:, 0, :1] * ws + p[:, 0, 1:] * us
                u[stale] = p[:, 1, :1] * ws + p[:, 1, 1:] * us
        return w, u

    def fetch(self, ids: Tensor, device: torch.device | str) -> Tensor:
        """The current rows of `ids` (K,) (unique) as a (K, D) leaf on `device` for this step's loss."""
        w, u = self.current(ids)
        self.slot[0] = w.to(device, non_blocking=True).requires_grad_()
        self._pending = (ids.to(self.weight.device), u.to(device, non_blocking=True))
        return self.leaf

    @torch.no_grad()
    def apply_step(self, lr: float, momentum: float, weight_decay: float) -> None:
        """One SGD step: update the fetched rows with their gradient, record the step for the rest.

        The fetched rows' gradient is averaged over ranks here (DDP only reduces the parameters it
        was built with); every rank then applies the same update, so rows stay identical.
        """
        if self._pending is not None:
            ids, u = self._pending
            w = self.leaf.data
            g = self.leaf.grad
            g = torch.zeros_like(w) if g is None else all_reduce_(g.clone(), "mean")
            d = g.add(w, alpha=weight_decay)  # same operations, same order, as torch.optim.SGD
            u = u.mul(momentum).add_(d)
            w = w.add(u, alpha=-lr)
            self.weight.index_copy_(0, ids, w.to(self.weight.device))
            self.momentum.index_copy_(0, ids, u.to(self.momentum.device))
            self.last_step.index_fill_(0, ids, self._steps + 1)
            self._pending = None
        self._record(sgd_transition(lr, momentum, weight_decay))

    def _record(self, m: Tensor) -> None:
        """Append step t's matrix and complete every block that step t closes."""
        t = self._steps
        if t >= self.capacity:
            self._grow()
        c = self.capacity
        self.tree[t] = m.to(self.tree.device)
        level, j = 1, (t + 1) // 2 - 1
        while (t + 1) % (1 << level) == 0:
            lo, hi = _level_offset(c, level - 1), _level_offset(c, level)
            self.tree[hi + j] = self.tree[lo + 2 * j + 1] @ self.tree[lo + 2 * j]
            level, j = level + 1, (t + 1) // (1 << (level + 1)) - 1
        self._steps = t + 1
        self.clock.fill_(self._steps)

    def _grow(self) -> None:
        old, c = self.tree, self.capacity
        new = self._empty_tree(2 * c, like=old)
        for level in range(c.bit_length()):
            n = c >> level
            src, dst = _level_offset(c, level), _level_offset(2 * c, level)
            new[dst : dst + n] = old[src : src + n]
        self.tree = new

    # --- state_dict: host rows are saved and loaded under the same keys as device buffers ---
    _HOST_KEYS = ("weight", "momentum", "last_step")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.host:
            for name in self._HOST_KEYS:
                destination[prefix + name] = getattr(self, name)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "tree"
        if key in state_dict and state_dict[key].shape != self.tree.shape:
            self.tree = self._empty_tree(state_dict[key].shape[0] // 2, like=self.tree)  # grown in that run
        if self.host:
            for name in self._HOST_KEYS:
                k, mine = prefix + name, getattr(self, name)
                if k not in state_dict:
                    missing_keys.append(k)
                elif state_dict[k].shape != mine.shape:
                    error_msgs.append(f"size mismatch for {k}: {tuple(state_dict[k].shape)} vs {tuple(mine.shape)}")
                else:
                    mine.copy_(state_dict[k])
            ours = {prefix + name for name in self._HOST_KEYS}
            state_dict = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._steps = int(self.clock)
        self._pending = None

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, host={self.host}, correct={self.correct}"


class SampledRowSGD(torch.optim.SGD):
    """torch.optim.SGD on the dense parameters plus the sampled-rows update of a `SampledRows`.

    Param group 0 holds the dense parameters, group 1 the rows' current leaf (its params list is the
    rows' `slot`), so the loop's per-step ``group["lr"] = ...``, zero_grad and a GradScaler's
    unscaling reach both. Both groups share momentum and
    weight decay. Only SGD's own state is in `state_dict()`; the rows' state lives in the module.
    Note: clip_grad_norm_(model.parameters()) does not see the rows' gradient.
    """

    def __init__(self, params: Any, rows: SampledRows, *, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__([{"params": list(params)}, {"params": [rows.leaf], "sampled_rows": True}],
                         lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.rows = rows
        self._bind()

    def _bind(self) -> None:
        for group in self.param_groups:
            if group.get("sampled_rows"):
                group["params"] = self.rows.slot

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._bind()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SampledRowSGD does not support closures")
        leaf = self.rows.leaf
        grad, leaf.grad = leaf.grad, None  # SGD skips parameters without a gradient
        try:
            super().step()
        finally:
            leaf.grad = grad
        group = next(g for g in self.param_groups if g.get("sampled_rows"))
        self.rows.apply_step(group["lr"], group["momentum"], group["weight_decay"])
        return None
