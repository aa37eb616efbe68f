"""Backbones (ResNet-18/34/50 with CIFAR or ImageNet stem, any width; SeLa's AlexNet) and projection heads.

The backbones are plain ResNets with the classifier removed: ``module(x)`` returns globally
average-pooled features ``(B, feat_dim)``, ``module.forward_stages(x)`` the pooled features of
each of the four stages (for per-stage linear probes). ``width`` scales every stage (64 is the
standard ResNet; 16 or 32 give narrow variants that train in reasonable time on a CPU).

The CIFAR stem is the one of NPID's CIFAR code (a 3x3 stride-1 convolution, no max-pool), which
keeps 32x32 inputs at full resolution in the first stage; the ImageNet stem is a 7x7 stride-2
convolution followed by a 3x3 stride-2 max-pool. Bottleneck blocks put the stride on the 3x3
convolution ("ResNet v1.5", as torchvision).

``alexnet`` is the AlexNet with BatchNorm that SeLa (and DeepCluster before it) trains; see
:class:`AlexNet` for its two layouts (224 px ImageNet, 32 px CIFAR).

Example:
    >>> net, dim = build_backbone("resnet18", width=32)
    >>> head = ProjectionHead(dim, 128)
    >>> z = head(net(images))  # (B, 128), not normalised
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.errors import ConfigError

__all__ = [
    "ARCHS",
    "AlexNet",
    "BasicBlock",
    "Bottleneck",
    "ProjectionHead",
    "ResNet",
    "alexnet",
    "build_backbone",
    "resnet18",
    "resnet34",
    "resnet50",
]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection + BN (ResNet option B)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Args:
        c_in: Input channels.
        planes: Channels of both convolutions; output channels = ``planes * expansion``.
        stride: Stride of the first convolution (2 halves the resolution).
    """

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zero-initialised with ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50).

    Args:
        c_in: Input channels.
        planes: Channels of the inner convolutions; output channels = ``planes * 4``.
        stride: Stride of the 3x3 convolution.
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BN closing the residual branch (zero-initialised with ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def _global_pool(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C) mean over space; works for any memory format and under autocast."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ResNet(nn.Module):
    """ResNet trunk without classifier.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        width: Inner channels of the first stage; stage s has ``width * 2**s`` (times the block's
            expansion at its output).
        cifar_stem: 3x3 stride-1 stem without max-pool (for 32x32 inputs) instead of the ImageNet
            7x7 stride-2 stem + max-pool.
        zero_init_residual: Initialise the last BN scale of every residual branch to 0, so each
            block starts as the identity (Goyal et al. 2017; used by PIC). Helps large-batch
            training; off by default as in NPID.

    Attributes:
        feat_dim: Dimension of the pooled output, ``8 * width * expansion``.
        stage_dims: Channels of the four stage outputs.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        width: int = 64,
        cifar_stem: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if cifar_stem:
            self.stem = nn.Sequential(
                _conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        c_in = width
        stages: list[nn.Module] = []
        stage_dims: list[int] = []
        for s, n_blocks in enumerate(layers):
            planes = width * 2**s
            stride = 1 if s == 0 else 2
            blocks: list[nn.Module] = []
            for b in range(n_blocks):
                blocks.append(block(c_in, planes, stride if b == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
            stage_dims.append(c_in)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.stage_dims: tuple[int, ...] = tuple(stage_dims)
        self.feat_dim: int = c_in
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for ReLU nets; fan_out as in the reference ResNets (torchvision, NPID).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) -> (B, feat_dim) globally average-pooled features."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return _global_pool(x)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Pooled features of every stage.

        Args:
            x: (B, 3, H, W).

        Returns:
            Four tensors ``(B, stage_dims[s])``; the last equals ``forward(x)``.
        """
        x = self.stem(x)
        feats: list[Tensor] = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(_global_pool(x))
        return feats


def resnet18(*, width: int = 64, cifar_stem: bool = True, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 trunk (BasicBlock, 2-2-2-2); ``feat_dim = 8 * width``."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, cifar_stem=cifar_stem,
                  zero_init_residual=zero_init_residual)


def resnet34(*, width: int = 64, cifar_stem: bool = True, zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 trunk (BasicBlock, 3-4-6-3); ``feat_dim = 8 * width``."""
    return ResNet(BasicBlock, (3, 4, 6, 3), width=width, cifar_stem=cifar_stem,
                  zero_init_residual=zero_init_residual)


def resnet50(*, width: int = 64, cifar_stem: bool = True, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 trunk (Bottleneck, 3-4-6-3); ``feat_dim = 32 * width``."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, cifar_stem=cifar_stem,
                  zero_init_residual=zero_init_residual)


class AlexNet(nn.Module):
    """AlexNet with BatchNorm, as trained by SeLa (its ``--arch alexnet``, "big" layout).

    ImageNet layout (``cifar_stem=False``, SeLa's models/alexnet.py, from DeepCluster), for
    224 px input: conv 11x11/4 (96) - maxpool 3/2 - conv 5x5 (256) - maxpool 3/2 - conv 3x3 (384)
    - conv 3x3 (384) - conv 3x3 (256) - maxpool 3/2 -> 256 x 6 x 6, then dropout - FC 4096 - ReLU
    - dropout - FC 4096 - ReLU. Every convolution is followed by BatchNorm and ReLU.

    CIFAR layout (``cifar_stem=True``, for 32 px input; our variant): the same five convolutions
    and three max-pools, but the first convolution is 5x5 with stride 1 (the 11x11/4 one would
    leave 7x7 maps after the first layer), so 32 px gives 256 x 3 x 3 before the FC layers. SeLa's
    CIFAR code instead upsamples the images to 224 px and uses the ImageNet layout: 49x the pixels.

    Output: the 4096-d activations after the second FC layer (SeLa's kNN features and the input of
    its heads). An adaptive average pool to the layout's grid (6x6 or 3x3) before the FC layers is
    the identity at the nominal input size and lets other sizes through.

    Args:
        width: 64 gives the standard channels (96, 256, 384, 384, 256) and FC width 4096; other
            values scale all of them by width / 64 (for tests and CPU runs).
        cifar_stem: the 32 px layout instead of the 224 px one.

    Attributes:
        feat_dim: the FC width (4096 at width 64).
        stage_dims: channels of the five convolutions (``forward_stages``).
    """

    def __init__(self, *, width: int = 64, cifar_stem: bool = True) -> None:
        super().__init__()
        ch = [max(1, c * width // 64) for c in (96, 256, 384, 384, 256)]
        fc = max(1, 4096 * width // 64)
        first = (5, 1, 2) if cifar_stem else (11, 4, 2)  # (kernel, stride, padding)
        specs = [(ch[0], *first), (ch[1], 5, 1, 2), (ch[2], 3, 1, 1), (ch[3], 3, 1, 1), (ch[4], 3, 1, 1)]
        pool_after = {0, 1, 4}
        convs: list[nn.Module] = []
        c_in = 3
        for i, (c_out, k, s, p) in enumerate(specs):
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=p, bias=False),  # BN follows
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i in pool_after:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            convs.append(nn.Sequential(*layers))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        grid = 3 if cifar_stem else 6
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(ch[4] * grid * grid, fc), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(fc, fc), nn.ReLU(inplace=True),
        )
        self.stage_dims: tuple[int, ...] = tuple(ch)
        self.feat_dim: int = fc
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # SeLa: N(0, 2/(k*k*c_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) -> (B, feat_dim) post-FC features."""
        for conv in self.convs:
            x = conv(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Globally average-pooled output of each convolution block (conv1 .. conv5): five (B, C_s)."""
        feats: list[Tensor] = []
        for conv in self.convs:
            x = conv(x)
            feats.append(_global_pool(x))
        return feats


def alexnet(*, width: int = 64, cifar_stem: bool = True, zero_init_residual: bool = False) -> AlexNet:
    """SeLa's AlexNet (BatchNorm, 4096-d output at width 64); ``zero_init_residual`` has no effect."""
    return AlexNet(width=width, cifar_stem=cifar_stem)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "alexnet": alexnet,
}


def build_backbone(
    arch: str = "resnet18",
    *,
    width: int = 64,
    cifar_stem: bool = True,
    zero_init_residual: bool = False,
) -> tuple[nn.Module, int]:
    """Build a backbone by name.

    Args:
        arch: One of ``ARCHS`` (resnet18, resnet34, resnet50, alexnet).
        width: Channels of the first stage (64 standard; 16/32 narrow CPU variants).
        cifar_stem: CIFAR stem (3x3 stride 1, no max-pool) instead of the ImageNet one; for
            AlexNet, its 32 px layout.
        zero_init_residual: Zero-init the last BN scale of each residual branch (PIC; ResNets only).

    Returns:
        ``(module, feat_dim)``; ``module(x)`` maps (B, 3, H, W) to (B, feat_dim).

    Raises:
        ConfigError: Unknown ``arch`` or a non-positive ``width``.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; valid choices: {', '.join(sorted(ARCHS))}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model width must be a positive integer, got {width!r}")
    net = ARCHS[arch](width=width, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)
    return net, net.feat_dim


class ProjectionHead(nn.Module):
    """Maps backbone features to the embedding used by the instance-discrimination loss.

    ``hidden_dim == 0`` gives a single linear layer (NPID's 128-d ``fc``); otherwise
    Linear -> [BN] -> ReLU -> Linear (the MLP head of MoCo v2, SimCLR and PIC; MoCo v2 has no BN,
    SimCLR has BN). The output is *not* L2-normalised: the methods normalise where their loss needs.

    Args:
        in_dim: Backbone feature dimension.
        out_dim: Embedding dimension (128 in all of these papers).
        hidden_dim: Hidden width of the MLP, 0 for a linear head (MoCo v2 uses ``in_dim``).
        bn: BatchNorm after the hidden linear layer (the hidden layer then has no bias).
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 0, *, bn: bool = True) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1 or hidden_dim < 0:
            raise ConfigError(
                f"projection head dims must be positive (hidden_dim may be 0), got "
                f"in_dim={in_dim}, out_dim={out_dim}, hidden_dim={hidden_dim}"
            )
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        if hidden_dim == 0:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
            self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        return self.net(x)
