"""Every method in METHODS: the contract, a state_dict round trip, and that it learns on a tiny set."""

import dataclasses

import pytest
import torch

from instdisc.augment import AugmentConfig, augment, preprocess
from instdisc.engine import build_method
from instdisc.methods import METHODS, EpochContext, StepOutput, resolve_config
from instdisc.sources import open_source

# MoCo: a queue of one batch and a faster key encoder, so 80 steps on 32 images show learning.
TINY = {"arch": "resnet18", "width": 8, "nce_k": 16, "moco_k": 16, "moco_m": 0.99}
# SeLa: two heads of 8 clusters; supervised: 4 classes (the labels given by epoch_start below).
TINY.update({"hc": 2, "ncl": [8], "num_classes": 4})


def build(name, n, **kw):
    # Method hyper-parameters (NPID's nce_k, ...) go only to the methods that have them.
    own = {f.name for f in dataclasses.fields(METHODS[name].Config)} | {"arch", "width"}
    cfg = resolve_config({k: v for k, v in {**TINY, **kw}.items() if k in own}, {}, name)
    torch.manual_seed(0)
    return cfg, build_method(cfg, n)


def epoch_start(m, images, labels):
    """What the engine does before every epoch (SeLa relabels here, supervised loads its labels)."""
    return m.on_epoch_start(EpochContext(
        epoch=0, num_epochs=1, predict_all=lambda fn: fn(preprocess(images, 32)), labels=labels,
    ))


@pytest.mark.parametrize("name", list(METHODS))
def test_contract_and_state_dict_round_trip(name):
    cfg, m = build(name, 64)
    views_cfg = m.views(cfg.aug)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    epoch_start(m, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 4)
    g = torch.Generator().manual_seed(0)
    views = [augment(x, vc, g) for vc in views_cfg]
    out = m(views, torch.arange(8))
    assert isinstance(out, StepOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    first_conv = next(p for p in m.backbone.parameters() if p.ndim == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    emb = m.embed(preprocess(x, 32))
    assert emb.shape[0] == 8 and torch.allclose(emb.norm(dim=1), torch.ones(8), atol=1e-4)
    _, m2 = build(name, 64)
    m2.load_state_dict(m.state_dict())
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", list(METHODS))
def test_learns_to_tell_instances_apart(name):
    """32 images, mild augmentation, 80 steps: each image's embedding must find itself among the 32
    (instance discrimination), far above the 1/32 of chance."""
    ds = open_source("synthetic:32", "train")
    x = torch.from_numpy(ds.images[:]).permute(0, 3, 1, 2)
    # SeLa with K = N clusters, and a classifier with one class per image, are instance discrimination.
    cfg, m = build(name, len(ds), nce_k=0, nce_t=0.1, ncl=[len(ds)], num_classes=len(ds))
    epoch_start(m, x, torch.arange(len(ds)))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    aug = AugmentConfig(scale=(0.6, 1.0), jitter_p=0.0, grayscale_p=0.0)
    g = torch.Generator().manual_seed(0)

    def instance_acc():
        m.eval()
        with torch.no_grad():
            f = m.embed(preprocess(x, 32))
            f_aug = m.embed(augment(x, aug, g))
        m.train()
        return (f_aug @ f.t()).argmax(1).eq(torch.arange(len(ds))).float().mean().item()

    before = instance_acc()
    losses = []
    for _ in range(80):
        idx = torch.randperm(len(ds), generator=g)[:16]
        out = m([augment(x[idx], vc, g) for vc in m.views(aug)], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    after = instance_acc()
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert after > 0.5 and after > before, (before, after)
