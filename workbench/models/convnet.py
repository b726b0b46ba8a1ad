"""Plain conv nets: Conv-4 and Conv-6 (the few-shot backbones of the original code), and their ``ConvBlock``.

``ConvBlock`` is conv3x3 -> BN -> ReLU -> (max-pool 2 or nothing), kept as four named children of an
``nn.Sequential`` in forward order (``conv``, ``bn``, ``act``, ``pool``). Perturbation site: after conv+BN,
before the ReLU and the pool, as in the original code. The block declares ``site_activation = "act"`` (a
forward pre-hook on ``act``); a forward hook on ``bn`` is the same place.

Conv-4: four blocks, each pooled. Conv-6: six blocks, pooled after blocks 1, 2, 4, 6 (the original layout).
Width is settable (default 64): ``conv4`` / ``conv4_32`` / ``build("conv4", ..., width=32)``. The head is a
global average pool and a linear layer, so 28x28, 32x32 and 84x84 inputs all work; the original flattened the
final map instead (``head="flatten"`` reproduces that, for the ``image_size`` given at build time). A pool that
would shrink a map already smaller than 2x2 (at the build-time ``image_size``) is left out.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import WorkbenchError
from ._registry import register_model, register_pattern
from .cifar_resnet import init_conv_bn


class ConvBlock(nn.Sequential):
    """conv3x3 -> BN -> ReLU -> pool (``nn.MaxPool2d(2)`` or ``nn.Identity``)."""

    #: The perturbation goes on the input of this child module (after conv+BN, before ReLU and pool).
    site_activation = "act"

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        # No conv bias: the BN right after it has one (the original kept a redundant conv bias).
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.site_channels = out_channels  # channels at the site, for sizing the site's statistics up front


class PlainConvNet(nn.Module):
    """A stack of ``ConvBlock``s (``features``) and a linear head on the pooled final map."""

    def __init__(
        self,
        widths: Sequence[int],
        pools: Sequence[bool],
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        head: str = "gap",
    ):
        super().__init__()
        if head not in ("gap", "flatten"):
            raise WorkbenchError(f"head must be 'gap' (global average pool) or 'flatten' (original), got {head!r}")
        blocks, channels, side = [], in_channels, image_size
        for width, pool in zip(widths, pools):
            pool = pool and side >= 2
            blocks.append(ConvBlock(channels, width, pool))
            channels, side = width, side // 2 if pool else side
        self.features = nn.Sequential(*blocks)
        self.head_kind = head
        self.pool = nn.AdaptiveAvgPool2d(1) if head == "gap" else nn.Identity()
        self.fc = nn.Linear(channels * (1 if head == "gap" else side * side), num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def extra_repr(self) -> str:
        return f"head={self.head_kind!r}"


def _check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise WorkbenchError(f"conv net width must be a positive integer, got {width!r}")
    return width


@register_model("conv4", family="convnet")
def conv4(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 64, head: str = "gap") -> nn.Module:
    """Conv-4: four conv3x3-BN-ReLU-maxpool blocks of ``width`` channels (default 64)."""
    w = _check_width(width)
    return PlainConvNet([w] * 4, [True] * 4, num_classes, in_channels, image_size, head)


@register_model("conv6", family="convnet")
def conv6(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 64, head: str = "gap") -> nn.Module:
    """Conv-6: six conv3x3-BN-ReLU blocks of ``width`` channels (default 64), max-pooled after 1, 2, 4, 6."""
    w = _check_width(width)
    return PlainConvNet([w] * 6, [True, True, False, True, False, True], num_classes, in_channels, image_size, head)


register_pattern(r"conv4_(?P<width>\d+)", family="convnet", builder=conv4, example="conv4_32")
register_pattern(r"conv6_(?P<width>\d+)", family="convnet", builder=conv6, example="conv6_32")
