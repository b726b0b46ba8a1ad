"""The model zoo: ``build(name, num_classes, in_channels=3, image_size=32, **options) -> nn.Module``.

Registered names (``available()``): CIFAR ResNets ``resnet20/32/44/56/110``, ``vgg9``, ``conv4`` / ``conv6``
(width by name, ``conv4_32``, or ``width=``), wide ResNets ``wrn16_4``, ``wrn16_8``, ``wrn28_2``, ``wrn40_2``
(any ``wrn<depth>_<k>`` by name), and every torchvision classification model as ``tv:<name>``.

Perturbation sites are declared by the blocks themselves, as class attributes, so ``workbench.attach`` needs no
per-model table and no model file mentions the perturbation:

* ``site_activation = "<child name>"`` (CIFAR ``BasicBlock``: ``"act_out"``; ``ConvBlock`` of VGG-9 and
  Conv-4/6: ``"act"``): the site is the *input* of that child ReLU module, i.e. a forward pre-hook on it. In a
  residual block this is the residual sum before the block's final ReLU; in a conv block, after conv+BN and
  before the ReLU and pool (a forward hook on the block's ``bn`` is the same place).
* ``site_output = True`` (pre-activation ``WideBasicBlock``): the site is the block's own output (the residual
  sum), i.e. a forward hook on the block.
* Each such block also has an instance attribute ``site_channels`` (the channel count at its site), so sites
  can be sized without a dry forward pass. Blocks are registered in forward order (``model.modules()`` order).

Every model built here carries ``workbench_name``, ``workbench_family``, ``channel_norm`` (its widest conv width,
the perturbation's channel normaliser), ``image_size`` and ``workbench_build_args``.
"""
from ._registry import (
    IMAGE_SIZE_RANGE,
    ModelEntry,
    available,
    build,
    check_image_size,
    check_name,
    model_info,
    register_model,
    register_pattern,
    site_rule,
    widest_conv_width,
)

# Importing the model files fills the registry.
from . import cifar_resnet, convnet, vgg, wrn  # noqa: E402,F401  (registration side effects)
from .cifar_resnet import BasicBlock, CifarResNet, OptionAShortcut  # noqa: E402
from .convnet import ConvBlock, PlainConvNet  # noqa: E402
from .wrn import WideBasicBlock, WideResNet  # noqa: E402

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ConvBlock",
    "IMAGE_SIZE_RANGE",
    "ModelEntry",
    "OptionAShortcut",
    "PlainConvNet",
    "WideBasicBlock",
    "WideResNet",
    "available",
    "build",
    "check_image_size",
    "check_name",
    "model_info",
    "register_model",
    "register_pattern",
    "site_rule",
    "widest_conv_width",
]
