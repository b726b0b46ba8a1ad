"""Fine-tuning: start from the conv weights of a network trained on the source dataset."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import WorkbenchError
from ._core import Regularizer, SourceNetwork, TrainContext, register_regularizer


def source_conv_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every convolution's weight and bias in ``model`` (what fine-tuning transfers)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            for pname in ("weight", "bias"):
                if getattr(module, pname, None) is not None:
                    keys.append(f"{name}.{pname}" if name else pname)
    return keys


def load_source_convs(model: nn.Module, source: SourceNetwork, arch: str) -> list[str]:
    """Copy the convolution weights (not BN, not the classifier) of ``source`` into ``model``; returns the keys.

    The source must have the target's architecture; any missing key or shape difference is a one-line error.
    """
    if source is None:
        raise WorkbenchError("this method fine-tunes a source network; set finetune_from to a source run id or file")
    if source.arch.lower() != arch.lower():
        raise WorkbenchError(
            f"fine-tuning source {source.origin} is a {source.arch} but the target network is a {arch}; fine-tune "
            f"from a source of the same architecture (workbench source-train --set arch={arch})"
        )
    params = dict(model.named_parameters())
    loaded = []
    with torch.no_grad():
        for key in source_conv_keys(model):
            if key not in source.state_dict:
                raise WorkbenchError(f"fine-tuning source {source.origin} has no tensor {key!r}; is it a {arch}?")
            value = source.state_dict[key]
            if tuple(value.shape) != tuple(params[key].shape):
                raise WorkbenchError(
                    f"fine-tuning source {source.origin}: {key} has shape {tuple(value.shape)} but the target network "
                    f"needs {tuple(params[key].shape)}; use the source's input channels ({source.in_channels}) and "
                    "architecture options"
                )
            params[key].copy_(value.to(params[key].dtype))
            loaded.append(key)
    return loaded


@register_regularizer("finetune")
class Finetune(Regularizer):
    """Fine-tuning: initialise every convolution from a network of the same architecture trained on the source
    dataset, then train everything on the target with the shared recipe.

    As in the original code (``--fine_tune``, paper-notes 1.8 and 5.13): all tensors but BatchNorm and the
    classifier are transferred, i.e. the conv weights; BN and the new classifier start fresh. The original source
    network was trained for 100k steps on Tiny ImageNet with an unpublished recipe; ``workbench source-train``
    trains one with this loop's recipe (our choice). No settings.
    """

    needs_source = True

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.loaded = load_source_convs(model, ctx.source, ctx.arch)
        self.origin = ctx.source.origin
        return model

    def describe(self):
        out = super().describe()
        out["source"] = getattr(self, "origin", None)
        out["transferred"] = len(getattr(self, "loaded", []))
        return out
