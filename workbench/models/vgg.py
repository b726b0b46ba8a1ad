"""VGG-9 of the original code: eight conv3x3-BN-ReLU blocks of width 64-128-256-256-512-512-512-512, max-pooled
after blocks 1, 2, 4, 6 and 8 (32x32 -> 1x1), then one linear layer.

Built from the same ``ConvBlock`` as Conv-4/6 (``site_activation = "act"``: perturbation after conv+BN, before
ReLU and pool; 8 sites). A global average pool before the linear layer lets sizes other than 32 work (at 32 it is
the original's flatten of a 1x1 map); a pool that would shrink a map already smaller than 2x2 at the build-time
``image_size`` is left out (at 28x28 the fifth pool goes: 28 -> 14 -> 7 -> 3 -> 1).
"""
from __future__ import annotations

from torch import nn

from ._registry import register_model
from .convnet import PlainConvNet

VGG9_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
VGG9_POOLS = (True, True, False, True, False, True, False, True)


@register_model("vgg9", family="vgg")
def vgg9(num_classes: int, in_channels: int = 3, image_size: int = 32, head: str = "gap") -> nn.Module:
    """VGG-9: 8 conv layers (64-128-256-256-512-512-512-512) with BN and 5 max-pools, one linear layer."""
    return PlainConvNet(VGG9_WIDTHS, VGG9_POOLS, num_classes, in_channels, image_size, head)
