"""The state-dict keys and shapes of torchvision's resnet18() and resnet50(), written out from
torchvision's documented architecture (torchvision/models/resnet.py: conv1 7x7/2, bn1, relu,
maxpool, layer1..4 of BasicBlock(conv1, bn1, conv2, bn2[, downsample = Sequential(conv 1x1, BN)])
or Bottleneck(conv1 1x1, bn1, conv2 3x3, bn2, conv3 1x1, bn3[, downsample]), avgpool, fc), not
from instdisc's models, so that the export test compares two independent descriptions.

Every BatchNorm2d contributes weight, bias, running_mean, running_var (C,) and a scalar
num_batches_tracked.
"""


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


RESNET18 = {
    "conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64),
    # layer1: two BasicBlocks 64 -> 64, stride 1, no downsample
    "layer1.0.conv1.weight": (64, 64, 3, 3), **_bn("layer1.0.bn1", 64),
    "layer1.0.conv2.weight": (64, 64, 3, 3), **_bn("layer1.0.bn2", 64),
    "layer1.1.conv1.weight": (64, 64, 3, 3), **_bn("layer1.1.bn1", 64),
    "layer1.1.conv2.weight": (64, 64, 3, 3), **_bn("layer1.1.bn2", 64),
    # layer2: 64 -> 128, stride 2 on the first block's conv1, downsample conv 1x1/2
    "layer2.0.conv1.weight": (128, 64, 3, 3), **_bn("layer2.0.bn1", 128),
    "layer2.0.conv2.weight": (128, 128, 3, 3), **_bn("layer2.0.bn2", 128),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1), **_bn("layer2.0.downsample.1", 128),
    "layer2.1.conv1.weight": (128, 128, 3, 3), **_bn("layer2.1.bn1", 128),
    "layer2.1.conv2.weight": (128, 128, 3, 3), **_bn("layer2.1.bn2", 128),
    # layer3: 128 -> 256
    "layer3.0.conv1.weight": (256, 128, 3, 3), **_bn("layer3.0.bn1", 256),
    "layer3.0.conv2.weight": (256, 256, 3, 3), **_bn("layer3.0.bn2", 256),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1), **_bn("layer3.0.downsample.1", 256),
    "layer3.1.conv1.weight": (256, 256, 3, 3), **_bn("layer3.1.bn1", 256),
    "layer3.1.conv2.weight": (256, 256, 3, 3), **_bn("layer3.1.bn2", 256),
    # layer4: 256 -> 512
    "layer4.0.conv1.weight": (512, 256, 3, 3), **_bn("layer4.0.bn1", 512),
    "layer4.0.conv2.weight": (512, 512, 3, 3), **_bn("layer4.0.bn2", 512),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1), **_bn("layer4.0.downsample.1", 512),
    "layer4.1.conv1.weight": (512, 512, 3, 3), **_bn("layer4.1.bn1", 512),
    "layer4.1.conv2.weight": (512, 512, 3, 3), **_bn("layer4.1.bn2", 512),
    "fc.weight": (1000, 512), "fc.bias": (1000,),
}


def _bottleneck(prefix, c_in, width, downsample):
    """torchvision Bottleneck: 1x1 c_in->width, 3x3 width->width (the stride), 1x1 width->4*width."""
    out = {
        f"{prefix}.conv1.weight": (width, c_in, 1, 1), **_bn(f"{prefix}.bn1", width),
        f"{prefix}.conv2.weight": (width, width, 3, 3), **_bn(f"{prefix}.bn2", width),
        f"{prefix}.conv3.weight": (4 * width, width, 1, 1), **_bn(f"{prefix}.bn3", 4 * width),
    }
    if downsample:
        out.update({f"{prefix}.downsample.0.weight": (4 * width, c_in, 1, 1), **_bn(f"{prefix}.downsample.1", 4 * width)})
    return out


RESNET50 = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
# (blocks, inner width, stage input channels) of layer1..4: [3, 4, 6, 3] blocks, widths 64..512;
# the first block of every stage has a downsample (layer1's changes 64 -> 256 channels).
for _layer, (_blocks, _width, _c_in) in enumerate([(3, 64, 64), (4, 128, 256), (6, 256, 512), (3, 512, 1024)], 1):
    for _b in range(_blocks):
        RESNET50.update(_bottleneck(f"layer{_layer}.{_b}", _c_in if _b == 0 else 4 * _width, _width, _b == 0))
RESNET50.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
