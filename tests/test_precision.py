"""The precision rule (methods/base.full_precision), for every method in METHODS.

Under the loop's autocast only the networks (models.py: backbones and ProjectionHead) may compute in
bf16; similarities, logits, exponentials and losses are fp32. CPU autocast casts the same operators
as CUDA's (mm, addmm, bmm, einsum, linear), so the rule is checked here on CPU in two ways:
- no operator outside a network produces a bf16 tensor (an autocast'ed `f @ bank.t()` would);
- the loss under autocast equals the fp32 loss computed from the same (bf16-rounded) features, to a
  relative 1e-6: the networks' outputs of the autocast run are replayed into an fp32 run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_methods import build, epoch_start
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from instdisc.augment import augment
from instdisc.methods import METHODS
from instdisc.models import AlexNet, ProjectionHead, ResNet

NETWORKS = (ResNet, AlexNet, ProjectionHead)
REDUCED = (torch.bfloat16, torch.float16)

# Every method with its defaults, and the variants whose similarities are computed differently.
CASES = [(name, {}) for name in METHODS] + [
    ("npid", {"nce_k": 0, "nce_t": 0.1}),  # full softmax over the bank
    ("npid", {"loss": "softmax"}),  # softmax over K + 1
    ("npid", {"negatives": "per-sample"}),  # einsum over (B, K, D)
    ("npid", {"prox": 0.5}),
    ("pic", {"queue_size": 16}),  # sampled classes
    ("moco", {"bn_splits": 2}),
]


def _ids(case):
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


class NetworkTracker:
    """Forward hooks that know whether execution is inside a network, and can record or replace
    the networks' outputs (in call order)."""

    def __init__(self, method: nn.Module, replay: list[torch.Tensor] | None = None) -> None:
        self.depth = 0
        self.outputs: list[torch.Tensor] = []
        self.replay = None if replay is None else list(replay)
        self.handles = []
        for mod in method.modules():
            if isinstance(mod, NETWORKS):
                self.handles.append(mod.register_forward_pre_hook(self._enter))
                self.handles.append(mod.register_forward_hook(self._leave))

    def _enter(self, mod, args):  # noqa: ANN001
        self.depth += 1

    def _leave(self, mod, args, out):  # noqa: ANN001
        # Still inside the network while the output is recorded (its detach/cast are the network's).
        if self.replay is None:
            self.outputs.append(out.detach().float())
        self.depth -= 1
        return None if self.replay is None else self.replay.pop(0)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class ReducedOutsideNetworks(TorchDispatchMode):
    """Records every operator that produces a bf16/fp16 tensor while no network is running."""

    def __init__(self, tracker: NetworkTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if self.tracker.depth == 0 and any(isinstance(o, torch.Tensor) and o.dtype in REDUCED for o in outs):
            self.offenders.append(str(func))
        return out


def _batch(name: str, kw: dict):
    cfg, m = build(name, 64, **kw)
    epoch_start(m, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    views = [augment(x, vc, g) for vc in m.views(cfg.aug)]
    return m, views, torch.arange(8) * 3


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_only_networks_run_in_bf16_and_the_loss_is_the_fp32_loss_of_the_same_features(case):
    name, kw = case
    m, views, idx = _batch(name, kw)
    twin = copy.deepcopy(m)  # the same state (bank, queue, Z, labels) for the fp32 replay

    tracker = NetworkTracker(m)
    mode = ReducedOutsideNetworks(tracker)
    torch.manual_seed(1)  # the method's own draws (negatives) are the same in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        loss_amp = m(views, idx).loss
    tracker.close()
    assert not mode.offenders, f"{name}: bf16 outside the networks: {sorted(set(mode.offenders))}"
    assert loss_amp.dtype == torch.float32
    # The networks did run in bf16 (otherwise this test would prove nothing).
    assert any((o.to(torch.bfloat16).float() == o).all() for o in tracker.outputs)

    replay = NetworkTracker(twin, replay=tracker.outputs)
    torch.manual_seed(1)
    loss_fp32 = twin(views, idx).loss
    replay.close()
    assert replay.replay == [], "the fp32 run called the networks a different number of times"
    rel = abs(loss_amp.item() - loss_fp32.item()) / max(abs(loss_fp32.item()), 1e-12)
    assert rel <= 1e-6, (name, loss_amp.item(), loss_fp32.item())


def test_the_check_catches_a_similarity_computed_under_autocast():
    """The defect this rule fixes: a logit matmul inside autocast is bf16 and changes the loss."""
    f = nn.functional.normalize(torch.randn(8, 16), dim=1)
    bank = nn.functional.normalize(torch.randn(512, 16), dim=1)
    tracker = NetworkTracker(nn.Module())
    mode = ReducedOutsideNetworks(tracker)
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        loss_amp = nn.functional.cross_entropy(f @ bank.t() / 0.07, torch.arange(8))
    loss_fp32 = nn.functional.cross_entropy(f @ bank.t() / 0.07, torch.arange(8))
    assert "aten.mm.default" in mode.offenders
    assert abs(loss_amp.item() - loss_fp32.item()) / loss_fp32.item() > 1e-6
