"""torchvision classification models by name (``tv:resnet18``), randomly initialised and adapted to the task.

Every name in ``torchvision.models.list_models(module=torchvision.models)`` can be built. The builder is called
with ``weights=None`` and ``num_classes``; then

* **input channels**: the first convolution is replaced by one taking ``in_channels`` (same output channels,
  kernel, stride, padding; Kaiming-normal fan_out init, the init torchvision gives its CNN stems);
* **small inputs** (``image_size <= 64``, or ``small_input=True``): the stem stops discarding resolution, the
  usual CIFAR adaptation. What changes, per family:

  ============================  ===========================================================================
  family (names)                change for small inputs
  ============================  ===========================================================================
  resnet (resnet*, resnext*,    ``conv1`` 7x7/2 -> 3x3/1 (padding 1); ``maxpool`` removed
  wide_resnet*)
  densenet                      ``features.conv0`` 7x7/2 -> 3x3/1; ``features.pool0`` removed
  googlenet                     ``conv1`` 7x7/2 -> 3x3/1; ``maxpool1`` removed
  inception_v3                  ``Conv2d_1a_3x3`` stride 2 -> 1; ``maxpool1`` removed
  shufflenet_v2                 ``conv1`` stride 2 -> 1; ``maxpool`` removed
  squeezenet                    ``features.0`` -> 3x3/1 (padding 1); the first max-pool removed
  alexnet                       ``features.0`` 11x11/4 -> 3x3/1 (padding 1)
  mobilenet_v2/v3, efficientnet stem conv ``features.0.0`` stride 2 -> 1
  (b0-b7, v2)
  mnasnet                       stem conv ``layers.0`` stride 2 -> 1
  regnet                        stem conv ``stem.0`` stride 2 -> 1
  convnext                      patchify stem 4x4/4 -> 3x3/1 (padding 1)
  vgg                           a max-pool that would shrink a map smaller than 2x2 is removed (the fifth at
                                28x28); ``avgpool`` -> global average pool and the first classifier layer
                                takes 512 inputs (not 512x7x7 copies of a 1x1 map)
  vit                           no change; ``image_size`` is passed on (it must be a multiple of the patch)
  swin, maxvit                  no change (maxvit needs sizes its 7x7 partitions divide, e.g. 224)
  ============================  ===========================================================================

  Larger inputs keep the architecture as torchvision defines it.
* googlenet and inception_v3 are built with ``aux_logits=False`` (``forward`` returns logits only) and
  ``init_weights=True``.

Other keyword options go to the torchvision builder (``dropout=0.3``, ``width_mult=0.5`` ...).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import WorkbenchError

SMALL_INPUT_MAX = 64


def torchvision_names() -> list[str]:
    """Every torchvision classification model name (``torchvision.models.list_models``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> str:
    """``name`` in lower case if torchvision has a classification model of that name, else a one-line error."""
    names = torchvision_names()
    key = name.lower()
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join('tv:' + c for c in close)}? " if close else ""
        raise WorkbenchError(
            f"unknown torchvision model 'tv:{name}'; {hint}"
            f"any name from torchvision.models.list_models() works, e.g. tv:resnet18, tv:mobilenet_v2"
        )
    return key


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def _replace_conv(
    model: nn.Module,
    path: str,
    in_channels: int | None = None,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
) -> None:
    """Swap the conv at ``path`` for one with the given fields changed (freshly initialised)."""
    old = model.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"expected a Conv2d at {path!r}, found {type(old).__name__}")
    new = nn.Conv2d(
        in_channels if in_channels is not None else old.in_channels,
        old.out_channels,
        kernel_size if kernel_size is not None else old.kernel_size,
        stride=stride if stride is not None else old.stride,
        padding=padding if padding is not None else old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    _set_module(model, path, new)


def _drop(model: nn.Module, path: str) -> None:
    _set_module(model, path, nn.Identity())


def _stem(path: str, *, conv3x3: bool = False, drop: tuple[str, ...] = ()) -> Callable[[nn.Module], None]:
    """Small-input change: the stem conv at ``path`` gets stride 1 (and becomes 3x3, padding 1, if
    ``conv3x3``); the modules in ``drop`` (initial max-pools) become identities."""

    def adapt(model: nn.Module, image_size: int) -> None:
        if conv3x3:
            _replace_conv(model, path, kernel_size=3, stride=1, padding=1)
        else:
            _replace_conv(model, path, stride=1)
        for p in drop:
            _drop(model, p)

    return adapt


def _vgg_small(model: nn.Module, image_size: int) -> None:
    side = image_size
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            if side < 2:
                model.features[i] = nn.Identity()
            else:
                side //= 2
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    old = model.classifier[0]
    last_width = [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
    model.classifier[0] = nn.Linear(
        last_width,
        old.out_features,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    nn.init.normal_(model.classifier[0].weight, 0, 0.01)  # torchvision's VGG init for Linear layers
    nn.init.zeros_(model.classifier[0].bias)


def _no_change(model: nn.Module, image_size: int) -> None:
    return None


@dataclass(frozen=True)
class _Family:
    name: str
    pattern: str
    adapt_small: Callable[[nn.Module, int], None]
    defaults: Callable[[int], dict[str, Any]] = lambda image_size: {}


_FAMILIES = (
    _Family("resnet", r"(resnet\d+|resnext.*|wide_resnet.*)", _stem("conv1", conv3x3=True, drop=("maxpool",))),
    _Family("densenet", r"densenet.*", _stem("features.conv0", conv3x3=True, drop=("features.pool0",))),
    _Family(
        "googlenet", r"googlenet", _stem("conv1.conv", conv3x3=True, drop=("maxpool1",)),
        lambda s: dict(aux_logits=False, init_weights=True),
    ),
    _Family(
        "inception", r"inception_v3", _stem("Conv2d_1a_3x3.conv", drop=("maxpool1",)),
        lambda s: dict(aux_logits=False, init_weights=True),
    ),
    _Family("shufflenet_v2", r"shufflenet_v2.*", _stem("conv1.0", drop=("maxpool",))),
    _Family("squeezenet", r"squeezenet.*", _stem("features.0", conv3x3=True, drop=("features.2",))),
    _Family("alexnet", r"alexnet", _stem("features.0", conv3x3=True)),
    _Family("mobilenet", r"mobilenet_v[23].*", _stem("features.0.0")),
    _Family("efficientnet", r"efficientnet.*", _stem("features.0.0")),
    _Family("mnasnet", r"mnasnet.*", _stem("layers.0")),
    _Family("regnet", r"regnet.*", _stem("stem.0")),
    _Family("convnext", r"convnext.*", _stem("features.0.0", conv3x3=True)),
    _Family("vgg", r"vgg.*", _vgg_small),
    _Family("vit", r"vit_.*", _no_change, lambda s: dict(image_size=s)),
    _Family("swin", r"swin.*", _no_change),
    _Family("maxvit", r"maxvit.*", _no_change, lambda s: dict(input_size=(s, s))),
)


def _family(name: str) -> _Family:
    for family in _FAMILIES:
        if re.fullmatch(family.pattern, name):
            return family
    # A torchvision family added after this table: only channels and classes are adapted.
    return _Family(name.rstrip("0123456789_"), re.escape(name), _no_change)


def _first_conv_path(model: nn.Module) -> str:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return path
    raise WorkbenchError(f"{type(model).__name__} has no Conv2d layer, so its input channels cannot be set")


def build_torchvision(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, small_input: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``torchvision.models.<name>(weights=None, num_classes=...)`` adapted as the module docstring says.

    ``small_input`` overrides the ``image_size <= 64`` rule for the stem change; ``kwargs`` go to torchvision.
    """
    import torchvision

    key = check_torchvision_name(name)
    for fixed in ("weights", "num_classes"):
        if fixed in kwargs:
            raise WorkbenchError(f"tv:{key} is always built with weights=None and build()'s num_classes; drop {fixed}=")
    family = _family(key)
    options = {**family.defaults(image_size), **kwargs}
    if options.get("aux_logits"):
        raise WorkbenchError(f"tv:{key} needs aux_logits=False: workbench models return logits only")
    small = image_size <= SMALL_INPUT_MAX if small_input is None else bool(small_input)
    try:
        model = torchvision.models.get_model(key, weights=None, num_classes=num_classes, **options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise WorkbenchError(
            f"torchvision could not build tv:{key} with options {options} for image_size {image_size}: {exc}"
        ) from None
    if small:
        family.adapt_small(model, image_size)
    first = _first_conv_path(model)
    if model.get_submodule(first).in_channels != in_channels:
        _replace_conv(model, first, in_channels=in_channels)
    model.workbench_family = f"torchvision.{family.name}"
    model.small_input = small
    return model
