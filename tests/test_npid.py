import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instdisc.errors import ConfigError
from instdisc.memory import MemoryBank
from instdisc.methods.npid import NPID, NPIDConfig, estimate_log_z, nce_loss


def lemniscate_nce(p: torch.Tensor, n: int, eps: float = 1e-7) -> torch.Tensor:
    """NCECriterion as written in the paper's code: p = exp(s/T)/Z, (B, K+1), column 0 positive."""
    k = p.shape[1] - 1
    pn = 1.0 / n
    pos = torch.log(p[:, 0] / (p[:, 0] + k * pn + eps))
    neg = torch.log((k * pn) / (p[:, 1:] + k * pn + eps))
    return -(pos.sum() + neg.sum()) / p.shape[0]


def test_nce_loss_equals_paper_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(6, 11, generator=g, dtype=torch.float64) * 10  # s/T
    log_z = torch.tensor(8.0, dtype=torch.float64)
    ours = nce_loss(logits - log_z, num_samples=1000)
    ref = lemniscate_nce(torch.exp(logits - log_z), 1000, eps=0.0)
    assert torch.allclose(ours, ref, rtol=1e-10)


def test_nce_gradient_equals_hand_derived():
    """dL/df = sum_j dL/dP_j * P_j / T * v_j with Z constant (the paper code's backward)."""
    g = torch.Generator().manual_seed(1)
    b, k, d, n, t = 4, 7, 5, 500, 0.07
    f = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    v = F.normalize(torch.randn(b, k + 1, d, generator=g, dtype=torch.float64), dim=2)
    log_z = torch.tensor(math.log(n) + 3.0, dtype=torch.float64)
    logits = torch.einsum("bd,bkd->bk", f, v) / t
    nce_loss(logits - log_z, n).backward()
    p = torch.exp(logits.detach() - log_z)
    kpn = k / n
    dp = torch.empty_like(p)
    dp[:, 0] = -(1 / p[:, 0] - 1 / (p[:, 0] + kpn)) / b
    dp[:, 1:] = 1 / (p[:, 1:] + kpn) / b
    hand = torch.einsum("bk,bkd->bd", dp * p / t, v)
    assert torch.allclose(f.grad, hand, rtol=1e-8, atol=1e-12)


def test_nce_loss_is_finite_for_tiny_temperature():
    logits = torch.tensor([[1.0, 0.5, -1.0]]) / 1e-3  # exp() would overflow float32
    assert torch.isfinite(nce_loss(logits - 900.0, 100))


def test_log_z_is_the_monte_carlo_estimate():
    logits = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    expected = math.log(100 * (1 + math.e + math.e**2 + math.e**3) / 4)
    assert estimate_log_z(logits, 100).item() == pytest.approx(expected, rel=1e-6)


def test_bank_update_formula_and_norm():
    bank = MemoryBank(10, 4, momentum=0.3)
    old = bank.bank.clone()
    z = torch.randn(3, 4)
    idx = torch.tensor([1, 5, 7])
    bank.update(idx, z)
    expected = F.normalize(0.3 * old[idx] + 0.7 * z, dim=1)
    assert torch.allclose(bank.bank[idx], expected, atol=1e-6)
    untouched = torch.tensor([0, 2, 3, 4, 6, 8, 9])
    assert torch.equal(bank.bank[untouched], old[untouched])
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(10), atol=1e-5)
    with pytest.raises(ValueError):
        MemoryBank(10, 4, momentum=1.0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))

    def forward(self, x):
        return self.net(x)


def make(n=32, **kw):
    torch.manual_seed(0)
    return NPID(Tiny(), 16, n, NPIDConfig(dim=8, **kw))


@pytest.mark.parametrize(
    "kw",
    [dict(nce_k=0), dict(nce_k=8, loss="nce"), dict(nce_k=8, loss="softmax"),
     dict(nce_k=8, negatives="per-sample"), dict(nce_k=8, prox=0.5), dict(nce_k=8, nce_z="ema")],
)
def test_forward_backward_updates_bank_after_loss(kw):
    m = make(**kw)
    x, idx = torch.randn(4, 3, 4, 4), torch.tensor([0, 3, 9, 31])
    before = m.memory.bank.clone()
    out = m([x], idx)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()  # must not fail: the in-place bank write happened after the logits were built
    assert m.backbone.net[1].weight.grad.abs().sum() > 0
    f = m.embed(x)
    expected = F.normalize(0.5 * before[idx] + 0.5 * f, dim=1)
    assert torch.allclose(m.memory.bank[idx], expected, atol=1e-5)


def test_full_softmax_gradient_uses_pre_update_bank():
    m = make(nce_k=0)
    x, idx = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 3])
    bank = m.memory.bank.clone()
    out = m([x], idx)
    out.loss.backward()
    g_model = m.backbone.net[1].weight.grad.clone()
    m.zero_grad()
    f = F.normalize(m.head(m.backbone(x)), dim=1)
    F.cross_entropy(f @ bank.t() / m.cfg.nce_t, idx).backward()
    assert torch.allclose(g_model, m.backbone.net[1].weight.grad, atol=1e-6)


def test_z_is_set_once_or_tracked():
    m = make(nce_k=8, nce_z="once")
    assert torch.isnan(m.log_z)
    m([torch.randn(4, 3, 4, 4)], torch.arange(4))
    z1 = m.log_z.clone()
    assert torch.isfinite(z1)
    m([torch.randn(4, 3, 4, 4) * 3], torch.arange(4, 8))
    assert torch.equal(m.log_z, z1)
    e = make(nce_k=8, nce_z="ema", z_momentum=0.5)
    e([torch.randn(4, 3, 4, 4)], torch.arange(4))
    z1 = e.log_z.clone()
    e([torch.randn(4, 3, 4, 4) * 3], torch.arange(4, 8))
    assert not torch.equal(e.log_z, z1)


def test_config_validation():
    for kw in [dict(nce_t=0.0), dict(nce_m=1.0), dict(nce_m=-0.1), dict(nce_k=32), dict(nce_k=-1)]:
        with pytest.raises(ConfigError):
            make(n=32, **kw)


@pytest.mark.parametrize("init", ["random", "features"])
def test_bank_init_from_features_only_at_the_first_epoch(init):
    from instdisc.methods.base import EpochContext

    m = make(nce_k=0, bank_init=init)
    images = torch.randn(m.num_samples, 3, 4, 4)
    random_bank = m.memory.bank.clone()

    def ctx(epoch):
        return EpochContext(epoch=epoch, num_epochs=3, predict_all=lambda fn: fn(images))

    m.on_epoch_start(ctx(0))
    if init == "random":
        assert torch.equal(m.memory.bank, random_bank)
        return
    expected = m.embed(images)  # (N, D) unit rows
    assert torch.allclose(m.memory.bank, expected, atol=1e-6)
    m.memory.bank.copy_(random_bank)
    m.on_epoch_start(ctx(1))  # later epochs keep the trained bank
    assert torch.equal(m.memory.bank, random_bank)
