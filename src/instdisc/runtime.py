"""How a run executes, as opposed to what it computes: the optimiser's kernels, and when to stop early.

Neither changes the algorithm. The SGD kernels differ only in float rounding: "plain" updates one
parameter at a time, "foreach" batches the update over all parameters with multi-tensor ops
(fewer kernel launches), and "fused" does the whole update in one kernel per device and dtype. On a
GPU a ResNet-18 step is short enough for launch overhead to matter; on CPU the difference is small.
The wall-clock limit (--time-limit) lets a long run be a chain of commands that each fit a fixed
time slot (e.g. a 10-minute job): at the limit the run checkpoints and exits with status 0, and
`--resume` continues it exactly where it stopped (docs/gpu.md). SIGTERM, SIGINT and SIGUSR1 stop the
same way (after the current step, with a checkpoint), so a pre-empted job loses nothing.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch

from instdisc import dist
from instdisc.errors import ConfigError

OptimizerImpl = Literal["auto", "plain", "foreach", "fused"]
OPTIMIZER_IMPLS: tuple[str, ...] = ("auto", "plain", "foreach", "fused")
# Flags of a param group that select the kernels, not the maths; a resumed run keeps the ones it
# asked for rather than those the checkpoint was taken with.
_KERNEL_FLAGS = ("foreach", "fused")


def sgd_kernel_kwargs(impl: str) -> dict[str, Any]:
    """torch.optim.SGD keyword arguments of an --optimizer-impl choice.

    "auto" leaves the choice to torch (foreach when every parameter is on a GPU, else plain).
    """
    if impl == "auto":
        return {}
    if impl == "plain":
        return {"foreach": False, "fused": False}
    if impl == "foreach":
        return {"foreach": True, "fused": False}
    if impl == "fused":
        return {"foreach": False, "fused": True}
    raise ConfigError(f"unknown --optimizer-impl {impl!r}; choose one of {', '.join(OPTIMIZER_IMPLS)}.")


def make_sgd(
    params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float, impl: str = "auto"
) -> torch.optim.SGD:
    """SGD (PyTorch's: dampening 0, no Nesterov) with the kernels named by `impl`."""
    params = list(params)
    try:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **sgd_kernel_kwargs(impl))
    except RuntimeError as e:  # fused kernels missing for this device/dtype in this torch build
        if impl != "fused":
            raise
        raise ConfigError(
            f"--optimizer-impl fused is not available here ({str(e).splitlines()[0]}); use foreach or auto."
        ) from None


def build_optimizer(
    method: torch.nn.Module, *, lr: float, momentum: float, weight_decay: float, impl: str = "auto"
) -> torch.optim.Optimizer:
    """The method's optimiser (`Method.configure_optimizer`, one signature for every method), with
    --optimizer-impl checked first: an unknown name is a ConfigError whatever the method."""
    sgd_kernel_kwargs(impl)
    return method.configure_optimizer(lr=lr, momentum=momentum, weight_decay=weight_decay,  # type: ignore[attr-defined]
                                      impl=impl)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's kernel choice.

    torch restores every param-group entry from the checkpoint, the kernel flags included, so a run
    resumed with another --optimizer-impl would silently keep the old kernels.
    """
    flags = [{k: g[k] for k in _KERNEL_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)


# The signals that stop a run at the next step boundary with a checkpoint: a scheduler's
# pre-emption (SIGTERM), Ctrl-C (SIGINT) and SLURM's warning ahead of the end of a job's time
# (SIGUSR1, from `sbatch --signal=USR1@90`). The exit status is 128 + the signal's number, what a
# shell reports for a process the signal killed: 143, 130 and 138 (SIGUSR1 on Linux), so a requeue
# script tests one number whether the signal came before or after training began (docs/slurm.md).
STOP_SIGNALS: tuple[int, ...] = tuple(
    s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None
)


def _now() -> float:
    return time.monotonic()


class StopRequest:
    """Should the run checkpoint and stop at this step boundary? Checked between steps.

    Two reasons, both ending with a checkpoint from which `--resume` continues exactly:
    * --time-limit: the run used its wall-clock budget (exit status 0). The clock starts when the
      object is made (in `fit`, before the data are opened, so loading and evaluation count).
    * SIGTERM, SIGINT or SIGUSR1 (a scheduler's pre-emption, which sends SIGTERM and SIGKILL a grace
      period later; Ctrl-C; SLURM's `--signal=USR1@SECONDS` warning): the current step finishes, the
      checkpoint is written, and the command exits with 128 + the signal's number (`STOP_SIGNALS`),
      so that scripts do not mistake the run for a finished one. Only the
      first signal is held back: the handler restores the previous one, so a second signal acts at
      once (the last regular checkpoint is then the one resumed from).

    Under torchrun every rank must stop at the same step: the ranks' flags are all-reduced once per
    step (two scalars), and once any rank has a reason, all stop.

    Args:
        minutes: the time budget; 0 means no limit.
        signals: the signals to handle; use the object as a context manager to install the handlers
            (only where a process can: its main thread).
    """

    def __init__(self, minutes: float, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.seconds = 60.0 * minutes
        self.start = _now()
        self.reason: str | None = None  # "time_limit" or a signal's name, once decided
        self.signum = 0
        self._received = 0
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                previous = signal.signal(s, self._on_signal)
                # None: a handler installed outside Python; the default is the closest we can restore.
                self._previous[s] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            if signal.getsignal(s) == self._on_signal:  # not already restored by a first signal
                signal.signal(s, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._received = self._received or signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one acts at once

    @property
    def expired(self) -> bool:
        return self.reason is not None

    def elapsed(self) -> float:
        return _now() - self.start

    def check(self, device: torch.device | str = "cpu") -> bool:
        """Whether to stop now (sticky: once True it stays True). The same on every rank."""
        if self.reason is not None:
            return True
        late = self.seconds > 0 and self.elapsed() >= self.seconds
        signum = self._received
        if dist.world_size() > 1:  # the ranks' clocks and signals differ a little: decide together
            flags = torch.tensor([float(late), float(signum)], device=device)
            late_any, signum_max = dist.all_reduce_(flags, "max").tolist()
            late, signum = late_any > 0, int(signum_max)
        if signum:
            self.reason, self.signum = signal.Signals(signum).name, signum
        elif late:
            self.reason = "time_limit"
        return self.reason is not None
