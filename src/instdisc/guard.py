"""The non-finite guard: what a step whose loss or gradient is NaN/inf does (stop, or skip it).

It is the training loop's one host synchronisation per step: the loss and the gradient norm are
checked together, and the verdict is all-reduced so that every rank takes the same branch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from instdisc import dist
from instdisc.checkpoint import write_failure
from instdisc.errors import NonFiniteError
from instdisc.methods import Method
from instdisc.rundir import TrainState


class NonFiniteGuard:
    """What a step whose loss or gradient is NaN/inf does: stop with a clear error (default), or,
    with --skip-nonfinite N, be skipped, at most N times over the whole run.

    A skipped step leaves no trace except its step number (its batch is consumed and the lr
    schedule moves on): the optimizer does not step, and whatever the method changed during forward
    (buffers such as NPID's bank or MoCo's queue, and frozen parameters such as MoCo's key encoder)
    is put back from a copy taken just before forward. That copy costs one extra copy of those
    tensors per step, so it is only made when skipping is allowed. The skip count is saved in the
    checkpoint, so a resumed run makes the same decisions and shares the same budget.

    Either way a debug snapshot goes to RUN_DIR/debug/step<S>-rank<R>.pt: the step, the rank's batch
    indices and step seed, the loss and what was non-finite; when stopping, rank 0's also holds the
    model state (parameters as before the step; buffers as before it only if a copy was taken).
    """

    def __init__(
        self, method: Method, *, max_skips: int, check_grads: bool, debug_dir: Path, rank: int, is_main: bool,
        config: dict[str, Any],
    ) -> None:
        self.method, self.max_skips, self.check_grads = method, max_skips, check_grads
        self.debug_dir, self.rank, self.is_main, self.config = debug_dir, rank, is_main, config
        self.params = [p for p in method.parameters() if p.requires_grad]
        self.volatile = [*method.buffers(), *(p for p in method.parameters() if not p.requires_grad)]
        self.saved: list[Tensor] | None = None

    def before_forward(self) -> None:
        if self.max_skips > 0:
            self.saved = [t.detach().clone() for t in self.volatile]

    @torch.no_grad()
    def check(self, loss: Tensor, clip_grad: float) -> tuple[bool, bool]:
        """(loss non-finite on some rank, gradient non-finite), the same on every rank; clips the
        gradient norm when asked. The step's one host synchronisation."""
        norm = torch.zeros((), device=loss.device)
        grads = [p.grad for p in self.params if p.grad is not None]
        if clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip_grad)
        elif self.check_grads and grads:
            norm = torch.nn.utils.get_total_norm(grads)
        if not self.check_grads:  # fp16: inf gradients are the GradScaler's business
            norm = torch.zeros((), device=loss.device)
        flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(norm.float().to(loss.device))])
        flags = dist.all_reduce_(flags.float())  # (2,) a loss may be NaN on one rank only: decide together
        bad_loss, bad_grad = (flags > 0).tolist()
        return bad_loss, bad_grad

    def _describe(self, bad_loss: bool, loss: float) -> str:
        if bad_loss:
            return f"the loss became {loss}" if not math.isfinite(loss) else "the loss became non-finite on another process"
        for name, p in self.method.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"the gradient of {name} became {'nan' if bool(torch.isnan(p.grad).any()) else 'inf'}"
        return "the gradient norm became inf (every gradient is finite, but their norm overflows)"

    def _snapshot(self, record: dict[str, Any], with_model: bool) -> str:
        path = self.debug_dir / f"step{record['step']:08d}-rank{self.rank}.pt"
        try:
            self.debug_dir.mkdir(parents=True, exist_ok=True)
            if with_model and self.is_main:
                record = {**record, "model": self.method.state_dict(), "config": self.config}
            torch.save(record, path)
        except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
            path.unlink(missing_ok=True)
            return f"(no debug snapshot: {write_failure(e, self.debug_dir)})"
        return str(path)

    def handle(self, bad: tuple[bool, bool], loss: Tensor, idx: Tensor, state: TrainState, *, seed: int) -> str:
        """Undo the forward's state changes and return a description (skip), or raise NonFiniteError."""
        value = float(loss.detach().float())
        what = self._describe(bad[0], value)
        if self.saved is not None:
            for t, s in zip(self.volatile, self.saved, strict=True):
                t.data.copy_(s)
        skip = state.skipped < self.max_skips
        # Numbered as metrics.jsonl numbers it: the N-th step is step N (the checkpoint before it is
        # at step N - 1).
        number = state.step + 1
        where = f"step {number} (epoch {state.epoch + 1}, batch {state.epoch_step + 1} of the epoch)"
        record = {"step": number, "epoch": state.epoch, "epoch_step": state.epoch_step, "rank": self.rank,
                  "seed": seed, "what": what, "loss": value, "idx": idx.detach().cpu()}
        snap = self._snapshot(record, with_model=not skip)
        if not skip:
            used = (f" --skip-nonfinite allowed {self.max_skips} skipped step(s) and all were used."
                    if self.max_skips else "")
            raise NonFiniteError(
                f"{what} at {where}; training stopped.{used} Debug snapshot (batch indices, loss, model "
                f"state): {snap}. Try a lower --lr, --precision fp32 or --clip-grad, or let such steps be "
                "skipped with --skip-nonfinite N; the last checkpoint is intact for --resume."
            )
        state.skipped += 1
        if self.is_main:
            print(f"instdisc: warning: skipped {where}: {what} ({state.skipped} of {self.max_skips} allowed by "
                  f"--skip-nonfinite; weights, optimizer and method state left as before the step). Batch indices: "
                  f"{snap}", file=sys.stderr, flush=True)
        return what
