"""Tests for instdisc.models: shapes, stems, widths, heads, init options, bf16/channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instdisc.errors import ConfigError
from instdisc.models import ARCHS, ProjectionHead, build_backbone


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# Narrow widths keep the suite fast; the dims formula is what is under test.
@pytest.mark.parametrize(
    ("arch", "width", "cifar_stem", "side", "expected_dim"),
    [
        ("resnet18", 8, True, 16, 64),
        ("resnet18", 16, False, 32, 128),
        ("resnet34", 4, True, 16, 32),
        ("resnet50", 4, True, 16, 128),
        ("resnet50", 2, False, 32, 64),
    ],
)
def test_backbone_output_shape_and_feat_dim(
    arch: str, width: int, cifar_stem: bool, side: int, expected_dim: int
) -> None:
    net, dim = build_backbone(arch, width=width, cifar_stem=cifar_stem)
    assert dim == expected_dim == net.feat_dim
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, side, side))
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


def test_feat_dim_standard_widths() -> None:
    # 8 * width * expansion, without running the (slow) full-width nets.
    assert build_backbone("resnet18")[1] == 512
    assert build_backbone("resnet34", width=32)[1] == 256
    assert build_backbone("resnet50")[1] == 2048


@pytest.mark.parametrize(("cifar_stem", "side", "final_res"), [(True, 16, 2), (False, 64, 2)])
def test_stem_resolution(cifar_stem: bool, side: int, final_res: int) -> None:
    # The CIFAR stem keeps full resolution (total stride 8); the ImageNet stem adds 4x more.
    net, _ = build_backbone("resnet18", width=4, cifar_stem=cifar_stem)
    x = net.stem(torch.randn(1, 3, side, side))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    assert x.shape[-2:] == (final_res, final_res)
    first = net.stem[0]
    assert isinstance(first, nn.Conv2d)
    assert first.kernel_size == ((3, 3) if cifar_stem else (7, 7))
    assert first.stride == ((1, 1) if cifar_stem else (2, 2))
    assert any(isinstance(m, nn.MaxPool2d) for m in net.stem) is (not cifar_stem)


@pytest.mark.parametrize(("arch", "mult"), [("resnet18", 1), ("resnet50", 4)])
def test_forward_stages(arch: str, mult: int) -> None:
    width = 4
    net, dim = build_backbone(arch, width=width)
    net.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        feats = net.forward_stages(x)
        out = net(x)
    assert [f.shape for f in feats] == [(3, width * 2**s * mult) for s in range(4)]
    assert net.stage_dims == tuple(width * 2**s * mult for s in range(4))
    torch.testing.assert_close(feats[-1], out)


def test_channels_last_and_bf16_autocast() -> None:
    net, dim = build_backbone("resnet18", width=8)
    head = ProjectionHead(dim, 16, hidden_dim=32)
    model = nn.Sequential(net, head).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    ref = model(x)  # fp32, train mode
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
    assert z.shape == (4, 16)
    assert torch.isfinite(z.float()).all()
    # bf16 has ~3 significant digits; the result must still be the same function.
    torch.testing.assert_close(z.float(), ref, atol=0.15, rtol=0.1)
    z.float().pow(2).mean().backward()
    assert net.stem[0].weight.grad is not None
    assert torch.isfinite(net.stem[0].weight.grad).all()


def test_projection_heads() -> None:
    linear = ProjectionHead(64, 128)
    assert isinstance(linear.net, nn.Linear)
    assert linear(torch.randn(5, 64)).shape == (5, 128)

    mlp = ProjectionHead(64, 32, hidden_dim=48)
    kinds = [type(m) for m in mlp.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp.net[0].bias is None  # BN follows, bias would be redundant
    assert mlp(torch.randn(5, 64)).shape == (5, 32)

    no_bn = ProjectionHead(64, 32, hidden_dim=48, bn=False)
    assert [type(m) for m in no_bn.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert no_bn(torch.randn(1, 64)).shape == (1, 32)

    with pytest.raises(ConfigError):
        ProjectionHead(0, 128)


def test_unknown_arch_raises_config_error_listing_choices() -> None:
    with pytest.raises(ConfigError) as info:
        build_backbone("vgg16")
    msg = str(info.value)
    assert "vgg16" in msg
    for name in ARCHS:
        assert name in msg
    with pytest.raises(ConfigError):
        build_backbone("resnet18", width=0)


def test_gradient_reaches_first_conv() -> None:
    net, dim = build_backbone("resnet18", width=4)
    head = ProjectionHead(dim, 16)
    loss = head(net(torch.randn(4, 3, 16, 16))).pow(2).mean()
    loss.backward()
    g = net.stem[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_init_and_zero_init_residual() -> None:
    net, _ = build_backbone("resnet18", width=8)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = net.layer3[0].conv1  # fan_out = 32 * 3 * 3 -> std = sqrt(2 / 288)
    assert abs(conv.weight.std().item() - (2 / (32 * 9)) ** 0.5) < 0.02

    zero, _ = build_backbone("resnet50", width=2, zero_init_residual=True)
    blocks = [m for m in zero.modules() if hasattr(m, "last_bn")]
    assert len(blocks) == 16
    for blk in blocks:
        assert torch.all(blk.last_bn.weight == 0)
        assert torch.all(blk.bn1.weight == 1)
    # With zero-initialised residual branches each block is ReLU(shortcut(x)): the stage-1 block
    # of ResNet-18 has an identity shortcut, so its output equals its (non-negative) input.
    z18, _ = build_backbone("resnet18", width=4, zero_init_residual=True)
    z18.eval()
    h = z18.stem(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(z18.layer1(h), h)
