"""CIFAR-style ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

Stem conv3x3(16)+BN+ReLU, three stages of 16/32/64 channels with n BasicBlocks each (depth = 6n + 2),
option-A shortcuts (stride-2 subsampling plus zero channel padding: no parameters), global average pool and
a linear head. This is the source architecture of MetaPerturb (ResNet-20, 0.27M parameters).

Perturbation site: each ``BasicBlock`` applies its final ReLU through its own module ``act_out`` (the inner
ReLU is the separate ``act1``), and declares ``site_activation = "act_out"``: the perturbation goes on the
input of ``act_out``, i.e. after the residual sum and before the block's final ReLU, as in the original code.
The stem is not perturbed. Sites: 9 / 15 / 21 / 27 / 54 for depth 20 / 32 / 44 / 56 / 110.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: keep every other pixel and zero-pad the new channels on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError("option-A shortcut pads channels symmetrically: out - in must be even and >= 0")
        self.stride = stride
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # One pad of a strided view: no zeros tensor and no concatenation per call.
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, channel_pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then the final ReLU ``act_out``."""

    #: The perturbation goes on the input of this child module (after the residual sum, before the final ReLU).
    site_activation = "act_out"

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()
        self.act_out = nn.ReLU()
        self.site_channels = out_channels  # channels at the site, for sizing the site's statistics up front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act_out(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: ``depth`` = 6n + 2, stage widths ``widths`` (16, 32, 64)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, as in the original code; Linear keeps
    PyTorch's default initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _cifar_resnet(depth: int):
    def builder(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels)

    builder.__name__ = f"resnet{depth}"
    builder.__doc__ = f"CIFAR ResNet-{depth}: 16/32/64 channels, {(depth - 2) // 2} option-A BasicBlocks."
    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", family="cifar_resnet")(_cifar_resnet(_depth))
