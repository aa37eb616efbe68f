import pytest
import torch

from instdisc.config import OptimConfig
from instdisc.engine import autocast_dtype, lr_schedule, step_seed


def test_step_schedule_is_the_paper_recipe():
    lrs = lr_schedule(OptimConfig(epochs=200, lr=0.03, milestones=[120, 160], gamma=0.1), steps_per_epoch=3)
    assert lrs.shape == (600,)
    assert lrs[0] == pytest.approx(0.03) and lrs[119 * 3 + 2] == pytest.approx(0.03)
    assert lrs[120 * 3] == pytest.approx(0.003) and lrs[159 * 3 + 2] == pytest.approx(0.003)
    assert lrs[160 * 3] == pytest.approx(0.0003) and lrs[-1] == pytest.approx(0.0003)


def test_cosine_with_warmup():
    lrs = lr_schedule(OptimConfig(epochs=10, lr=1.0, schedule="cosine", warmup_epochs=2), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.01)  # warm-up starts at lr/100
    assert torch.all(lrs[1:20] > lrs[:19])  # rising during warm-up
    assert lrs[20] == pytest.approx(1.0)
    assert torch.all(lrs[21:] <= lrs[20:-1])  # then decaying
    assert lrs[-1] < 0.01


def test_constant_and_precision():
    assert torch.all(lr_schedule(OptimConfig(epochs=2, lr=0.5, schedule="constant"), 4) == 0.5)
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16


def test_step_seeds_are_distinct():
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(1000) for r in range(4)}
    assert len(seeds) == 3 * 1000 * 4
