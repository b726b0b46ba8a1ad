"""Where feature-level regularizers act: the same places MetaPerturb perturbs, found without editing the model.

A model block declares its perturbation place (see ``workbench/models``): ``site_activation = "<child>"`` means
the input of that child activation (after the residual sum / after conv+BN, before the block's final ReLU);
``site_output = True`` means the block's own output. For other models (torchvision) the attach module's rule is
used when it offers one. Each :class:`Point` can hook a function onto the feature there (``hook_feature``) or onto
the block's output after its activation (``hook_output``), through forward (pre-)hooks: the model's code and its
``state_dict`` keys stay as they were.

DropBlock, Information Dropout and Manifold Mixup use these points, so every feature-level method is compared at
the same places in the network.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from ..errors import WorkbenchError


@dataclasses.dataclass
class Point:
    """One place: ``module``'s input (``pre=True``) or output (``pre=False``) is the feature map."""

    name: str
    module: nn.Module
    pre: bool
    channels: int = 0
    size: int = 0  # spatial side (height) of the feature map at the model's image size

    def hook_feature(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Replace the feature ``h`` at this place by ``fn(h)``; returns the hook handle."""
        if self.pre:
            return self.module.register_forward_pre_hook(lambda _m, args: (fn(args[0]),) + tuple(args[1:]))
        return self.module.register_forward_hook(lambda _m, _args, out: fn(out))

    def hook_output(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Replace the block's output (after its activation, where the place is an activation's input)."""
        return self.module.register_forward_hook(lambda _m, _args, out: fn(out))


def _declared_points(model: nn.Module) -> list[Point]:
    points = []
    for name, module in model.named_modules():
        act = getattr(type(module), "site_activation", None)
        if isinstance(act, str) and isinstance(getattr(module, act, None), nn.Module):
            points.append(Point(f"{name}.{act}" if name else act, getattr(module, act), pre=True))
        elif getattr(type(module), "site_output", False):
            points.append(Point(name, module, pre=False))
    return points


def _attach_points(model: nn.Module, in_channels: int, image_size: int) -> list[Point]:
    """Points from the attach module's own place discovery, for models that declare nothing (torchvision).

    A block whose forward attach replaces (torchvision ResNet blocks share one ReLU module) cannot be hooked
    before its last ReLU from outside; there the point is the block's output, after the ReLU.
    """
    import importlib

    attach_module = importlib.import_module("..attach", __package__)  # the module, not the attach() function
    finder = attach_module.find_places
    reference = next(model.parameters(), None)
    probe = torch.zeros(2, in_channels, image_size, image_size,
                        device=reference.device if reference is not None else "cpu")
    points = []
    for place in finder(model, probe):
        host = getattr(place, "host", None)
        if isinstance(host, nn.Module):
            points.append(Point(getattr(place, "name", ""), host, pre=getattr(place, "how", "") == "pre"))
    return points


def find_points(model: nn.Module, in_channels: int, image_size: int) -> list[Point]:
    """The model's perturbation places in forward order, with their channel count and spatial size.

    A dry forward pass on a zero batch (eval mode, no gradient) records each place's feature shape and order.
    """
    points = _declared_points(model) or _attach_points(model, in_channels, image_size)
    if not points:
        raise WorkbenchError(
            f"{type(model).__name__} declares no perturbation places (site_activation / site_output) and the "
            "attach module has no rule for it; use a registered workbench model"
        )
    order: list[int] = []
    handles = []
    for i, point in enumerate(points):
        def record(t: torch.Tensor, i=i) -> torch.Tensor:
            if i not in order:
                order.append(i)
                points[i].channels, points[i].size = int(t.shape[1]), int(t.shape[2])
            return t

        handles.append(point.hook_feature(record))
    modes = [(m, m.training) for m in model.modules()]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, in_channels, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return [points[i] for i in order]


def stage_ends(points: list[Point]) -> list[Point]:
    """The last place of each spatial resolution (the end of each stage), in forward order."""
    out = []
    for i, point in enumerate(points):
        if i + 1 == len(points) or points[i + 1].size != point.size:
            out.append(point)
    return out


def last_resolutions(points: list[Point], count: int) -> list[Point]:
    """The places whose resolution is one of the ``count`` smallest (the last stages)."""
    sizes = sorted({p.size for p in points})[:count]
    return [p for p in points if p.size in sizes]


class HookSet:
    """Hook handles a regularizer installed, removable together."""

    def __init__(self):
        self.handles = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
