"""The model registry: names -> builder functions, plus the ``build`` entry point.

A model file registers each architecture with ``@register_model("name", family=...)``; a builder takes
``num_classes``, ``in_channels``, ``image_size`` and its own keyword options and returns an ``nn.Module``.
Families whose size is part of the name (``conv4_32``, ``wrn22_8``) also register a pattern, so any width or
depth can be asked for by name. ``tv:<name>`` is routed to torchvision (see ``torchvision_models.py``).
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import WorkbenchError

TV_PREFIX = "tv:"
#: Working resolutions a run may ask for (``image_size`` of meta-training and transfer). Below 8 pixels the CIFAR
#: ResNets' two stride-2 stages leave a 2x2 map and Conv-4 skips its pools, so nothing image-like is learned; above
#: 512 one resized copy of a small dataset and one batch of activations already take gigabytes.
IMAGE_SIZE_RANGE = (8, 512)

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: its name, family, builder and a one-line description."""

    name: str
    family: str
    builder: Builder
    description: str


@dataclass(frozen=True)
class _PatternEntry:
    regex: re.Pattern
    family: str
    builder: Builder
    example: str


_MODELS: dict[str, ModelEntry] = {}
_PATTERNS: list[_PatternEntry] = []


def register_model(name: str, *, family: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator adding a builder to the registry under ``name`` (lower case, no ``tv:`` prefix)."""
    if name != name.lower() or name.startswith(TV_PREFIX):
        raise ValueError(f"model names are lower case and never start with {TV_PREFIX!r}: {name!r}")

    def decorator(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _MODELS[name] = ModelEntry(name=name, family=family, builder=fn, description=doc)
        return fn

    return decorator


def register_pattern(regex: str, *, family: str, builder: Builder, example: str) -> None:
    """Let every name matching ``regex`` (full match) build with ``builder``.

    The regex's named groups are passed to the builder as integer keyword options, e.g.
    ``conv4_(?P<width>\\d+)`` turns ``conv4_32`` into ``builder(..., width=32)``.
    """
    _PATTERNS.append(_PatternEntry(re.compile(regex), family, builder, example))


def available(torchvision: bool = False) -> list[str]:
    """Registered model names, sorted; with ``torchvision=True`` also every ``tv:<name>`` that can be built."""
    names = sorted(_MODELS)
    if torchvision:
        from .torchvision_models import torchvision_names

        names += [TV_PREFIX + n for n in torchvision_names()]
    return names


def _unknown_name_error(name: str) -> WorkbenchError:
    close = difflib.get_close_matches(name.lower(), available(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    patterns = ", ".join(p.example for p in _PATTERNS)
    return WorkbenchError(
        f"unknown model {name!r}; {hint}available: {', '.join(available())}"
        + (f" (sizes by name too, e.g. {patterns})" if patterns else "")
        + f"; torchvision models as '{TV_PREFIX}<name>', e.g. '{TV_PREFIX}resnet18'"
    )


def _resolve(name: str) -> tuple[str, Builder, dict[str, Any]]:
    """(family, builder, options implied by the name) for a registered or pattern name."""
    key = name.strip().lower()
    if key in _MODELS:
        entry = _MODELS[key]
        return entry.family, entry.builder, {}
    for pattern in _PATTERNS:
        match = pattern.regex.fullmatch(key)
        if match:
            return pattern.family, pattern.builder, {k: int(v) for k, v in match.groupdict().items()}
    raise _unknown_name_error(name)


def check_image_size(value: Any, what: str = "image_size") -> int:
    """``value`` if it is an integer in :data:`IMAGE_SIZE_RANGE`, else a one-line WorkbenchError saying the range."""
    low, high = IMAGE_SIZE_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WorkbenchError(f"{what} must be an integer from {low} to {high} pixels (the side images are resized "
                             f"to), got {value!r}; e.g. {what}=32")
    return value


def check_name(name: Any) -> str:
    """Check that ``name`` names a model :func:`build` knows (registered, sized by name, or ``tv:<name>``) without
    building it; returns the name. Raises the same one-line WorkbenchError as ``build`` for an unknown one."""
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError(f"model name must be a non-empty string, got {name!r}; see workbench.models.available()")
    key = name.strip()
    if key.lower().startswith(TV_PREFIX):
        from .torchvision_models import check_torchvision_name

        check_torchvision_name(key[len(TV_PREFIX):].strip().lower())
    else:
        _resolve(key)
    return name


def _check_int(what: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WorkbenchError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _call_builder(name: str, builder: Builder, options: dict[str, Any], **fixed: Any) -> nn.Module:
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        allowed = [p for p in params if p not in ("num_classes", "in_channels", "image_size")]
        for key in options:
            if key not in params:
                raise WorkbenchError(
                    f"model {name!r} has no option {key!r}; its options are: {', '.join(allowed) or 'none'}"
                )
    return builder(**fixed, **options)


def build(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build a model by name: ``forward(x) -> logits`` of shape (B, num_classes).

    ``name`` is a registered name (``available()``), a sized name (``conv4_32``, ``wrn22_8``) or
    ``tv:<torchvision name>``. ``in_channels`` is the number of input channels (1 for grey images),
    ``image_size`` the input side the architecture is laid out for (pooling for VGG-9 / Conv-4/6, the
    small-input stem of torchvision models); ``kwargs`` are the family's own options (``width=`` for
    Conv-4/6, ``drop_rate=`` for WRN, torchvision builder arguments for ``tv:`` names).

    The model carries ``workbench_name``, ``channel_norm`` (its widest conv width, the perturbation's channel
    normaliser), ``image_size`` and ``workbench_build_args`` (``build(**model.workbench_build_args)`` rebuilds it).
    """
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError(f"model name must be a non-empty string, got {name!r}; see workbench.models.available()")
    _check_int("num_classes", num_classes)
    _check_int("in_channels", in_channels)
    _check_int("image_size", image_size)
    fixed = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    name = name.strip()
    if name.lower().startswith(TV_PREFIX):
        from .torchvision_models import build_torchvision

        tv_name = name[len(TV_PREFIX):].strip().lower()
        model = build_torchvision(tv_name, **fixed, **kwargs)
        family, name = "torchvision", TV_PREFIX + tv_name
    else:
        family, builder, implied = _resolve(name)
        for key, value in kwargs.items():
            if key in implied and implied[key] != value:
                raise WorkbenchError(
                    f"model {name!r} fixes {key}={implied[key]} by its name but {key}={value!r} was also given; "
                    f"give one of them"
                )
        model = _call_builder(name, builder, {**implied, **kwargs}, **fixed)
        name = name.lower()
    model.workbench_name = name
    model.workbench_family = getattr(model, "workbench_family", family)
    model.image_size = image_size
    model.channel_norm = widest_conv_width(model)
    model.workbench_build_args = dict(name=name, **fixed, **kwargs)
    return model


def widest_conv_width(model: nn.Module) -> int:
    """The largest ``out_channels`` of any conv layer: the perturbation's channel normaliser (64 for CIFAR
    ResNets, 512 for VGG-9, the width for Conv-4/6, 256 for WRN-16-4)."""
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not widths:
        raise WorkbenchError(f"{type(model).__name__} has no convolution layer; the model zoo holds CNNs only")
    return max(widths)


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Every parameter and buffer registered inside this block moves to the ``meta`` device as it is registered,
    so a model's layout can be read without allocating or initialising its weights. (A ``torch.device("meta")``
    block would also turn the plain tensors some builders compute with, e.g. RegNet's widths, into meta tensors.)"""

    def to_meta(module: nn.Module, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(tensor.to("meta"), requires_grad=tensor.requires_grad)
        return tensor.to("meta")

    handles = [
        nn.modules.module.register_module_parameter_registration_hook(to_meta),
        nn.modules.module.register_module_buffer_registration_hook(to_meta),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_info(name: str, **kwargs: Any) -> dict[str, Any]:
    """Facts about a model without allocating its weights (they are created on the ``meta`` device).

    Returns ``name``, ``family``, ``channel_norm`` (widest conv width), ``num_params`` (for
    ``num_classes=10``, 3 input channels), ``site_rule`` (where the perturbation goes) and ``description``.
    ``kwargs`` are the same as for ``build`` (``num_classes``, ``in_channels``, ``image_size``, options).
    """
    kwargs.setdefault("num_classes", 10)
    with _weights_on_meta():
        model = build(name, **kwargs)
    key = model.workbench_name
    entry = _MODELS.get(key)
    if entry is not None:
        description = entry.description
    elif key.startswith(TV_PREFIX):
        description = f"torchvision {key[len(TV_PREFIX):]} (weights=None)"
    else:
        builder = next(p.builder for p in _PATTERNS if p.regex.fullmatch(key))
        description = (inspect.getdoc(builder) or "").split("\n", 1)[0]
    return dict(
        name=key,
        family=model.workbench_family,
        channel_norm=model.channel_norm,
        num_params=sum(p.numel() for p in model.parameters()),
        site_rule=site_rule(model),
        description=description,
    )


def site_rule(model: nn.Module) -> str:
    """A sentence saying where the perturbation goes in ``model``, read from its blocks' site attributes."""
    for m in model.modules():
        if getattr(type(m), "site_output", False):
            return f"output of each {type(m).__name__} (the residual sum), forward hook on the block"
        if isinstance(getattr(type(m), "site_activation", None), str):
            act = type(m).site_activation
            return (
                f"input of each {type(m).__name__}.{act} (before the block's final ReLU), "
                f"forward pre-hook on that module"
            )
    return "torchvision model: the attach module's documented rule for this family"
