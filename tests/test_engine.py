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


class _FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_metric_log_mirrors_numbers_to_tensorboard(tmp_path, monkeypatch):
    import json

    from instdisc import rundir

    fake = _FakeWriter()
    monkeypatch.setattr(rundir, "tensorboard_writer", lambda log_dir: fake)
    log = rundir.MetricLog(tmp_path / "metrics.jsonl")
    log.write(type="step", step=20, epoch=0, lr=0.03, loss=7.5)
    log.write(type="epoch", step=390, epoch=1, knn_top1=31.8, note="text is not a scalar", ok=True)
    assert fake.scalars == [
        ("step/epoch", 0, 20), ("step/lr", 0.03, 20), ("step/loss", 7.5, 20),
        ("epoch/epoch", 1, 390), ("epoch/knn_top1", 31.8, 390),
    ]
    # The JSONL file remains the record, whatever TensorBoard does.
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines] == ["step", "epoch"]


def test_tensorboard_is_optional(tmp_path):
    import importlib.util

    from instdisc.rundir import tensorboard_writer

    w = tensorboard_writer(tmp_path / "tb")
    assert (w is None) == (importlib.util.find_spec("tensorboard") is None)
