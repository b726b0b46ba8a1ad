"""Wide ResNets (Zagoruyko & Komodakis 2016) for small images: WRN-d-k, d = 6n + 4.

conv3x3(16) stem, three stages of 16k/32k/64k channels with n pre-activation wide blocks each, final
BN-ReLU, global average pool, linear head. A block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the
shortcut (identity, or a 1x1 conv on the pre-activated input where the shape changes).

Perturbation site: a pre-activation block has no final ReLU of its own (the next block's BN-ReLU comes first),
so its output *is* the residual sum. ``WideBasicBlock.site_output = True`` means: perturb this module's output
(a forward hook on the block). Sites: 3n (6 for WRN-16-k, 12 for WRN-28-k). The stem is not perturbed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import WorkbenchError
from ._registry import register_model, register_pattern
from .cifar_resnet import init_conv_bn


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; its output is the residual sum."""

    #: Perturb this module's output (forward hook on the block): the residual sum.
    site_output = True

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if self.projects else nn.Identity()
        )
        self.site_channels = out_channels  # channels at the site, for sizing the site's statistics up front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(pre)))))
        # The projection sees the pre-activated input (as in the reference WRN code); the identity sees x.
        return out + (self.shortcut(pre) if self.projects else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for small images."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise WorkbenchError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40 ...), got {depth}")
        if widen_factor < 1:
            raise WorkbenchError(f"WRN widen factor must be >= 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise WorkbenchError(f"WRN drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages, channels = [], 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(channels, width, 2 if (i > 0 and j == 0) else 1, drop_rate))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.act(self.bn(x))), 1))


def wide_resnet(
    num_classes: int, in_channels: int = 3, image_size: int = 32, depth: int = 16, widen_factor: int = 4,
    drop_rate: float = 0.0,
) -> nn.Module:
    """WRN-depth-widen_factor (any 6n + 4 depth): reached by name as ``wrn<depth>_<widen_factor>``."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, drop_rate)


def _named_wrn(depth: int, widen_factor: int):
    def builder(num_classes: int, in_channels: int = 3, image_size: int = 32, drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(depth, widen_factor, num_classes, in_channels, drop_rate)

    builder.__name__ = f"wrn{depth}_{widen_factor}"
    builder.__doc__ = f"Wide ResNet WRN-{depth}-{widen_factor}: pre-activation wide blocks, widest 64x{widen_factor}."
    return builder


for _depth, _k in ((16, 4), (16, 8), (28, 2), (40, 2)):
    register_model(f"wrn{_depth}_{_k}", family="wrn")(_named_wrn(_depth, _k))

register_pattern(r"wrn(?P<depth>\d+)_(?P<widen_factor>\d+)", family="wrn", builder=wide_resnet, example="wrn22_8")
