"""How a run executes, as opposed to what it computes: the optimiser's kernels and a wall-clock limit.

Neither changes the algorithm. The SGD kernels differ only in float rounding: "plain" updates one
parameter at a time, "foreach" batches the update over all parameters with multi-tensor ops
(fewer kernel launches), and "fused" does the whole update in one kernel per device and dtype. On a
GPU a ResNet-18 step is short enough for launch overhead to matter; on CPU the difference is small.
The wall-clock limit (--time-limit) lets a long run be a chain of commands that each fit a fixed
time slot (e.g. a 10-minute job): at the limit the run checkpoints and exits with status 0, and
`--resume` continues it exactly where it stopped (docs/gpu.md).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from instdisc import dist
from instdisc.errors import ConfigError, InstdiscWarning

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


def accepts_impl(configure: Any) -> bool:
    """Whether a method's configure_optimizer takes the `impl` keyword (methods that override it
    with their own optimiser, like PIC's sampled-row SGD, may not)."""
    try:
        params = inspect.signature(configure).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "impl" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_optimizer(
    method: torch.nn.Module, *, lr: float, momentum: float, weight_decay: float, impl: str = "auto"
) -> torch.optim.Optimizer:
    """The method's optimiser, with --optimizer-impl passed only where the method supports it.

    "auto" is never passed, so a method that overrides configure_optimizer without `impl` behaves
    exactly as before; any other choice it cannot take is reported once and ignored.
    """
    configure = method.configure_optimizer  # type: ignore[attr-defined]
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if impl == "auto":
        return configure(**kw)
    sgd_kernel_kwargs(impl)  # an unknown name is a ConfigError whatever the method
    if not accepts_impl(configure):
        warnings.warn(
            f"--optimizer-impl {impl} is ignored: {type(method).__name__} builds its own optimiser "
            "(its configure_optimizer takes no impl).", InstdiscWarning, stacklevel=2,
        )
        return configure(**kw)
    return configure(**kw, impl=impl)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's kernel choice.

    torch restores every param-group entry from the checkpoint, the kernel flags included, so a run
    resumed with another --optimizer-impl would silently keep the old kernels.
    """
    flags = [{k: g[k] for k in _KERNEL_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)


def _now() -> float:
    return time.monotonic()


class TimeLimit:
    """--time-limit: has the run used its wall-clock budget? Checked between steps.

    The clock starts when the object is made (in `fit`, before the data are opened, so loading,
    compilation and evaluation count). Under torchrun every rank must stop at the same step, so
    the ranks' verdicts are summed (one scalar all-reduce per step, only when a limit is set):
    once any rank is past the limit, all stop.

    Args:
        minutes: the budget; 0 means no limit.
    """

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * minutes
        self.start = _now()
        self.expired = False

    def elapsed(self) -> float:
        return _now() - self.start

    def check(self, device: torch.device | str = "cpu") -> bool:
        """Whether the limit is reached (sticky: once True it stays True). The same on every rank."""
        if self.seconds <= 0 or self.expired:
            return self.expired
        late = self.elapsed() >= self.seconds
        if dist.world_size() > 1:  # the clocks of the ranks differ a little: decide together
            flag: Tensor = torch.tensor(float(late), device=device)
            late = bool(dist.all_reduce_(flag) > 0)
        self.expired = late
        return self.expired
