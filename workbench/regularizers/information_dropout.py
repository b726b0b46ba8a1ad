"""Information Dropout: learned, input-dependent multiplicative log-normal noise with a KL penalty."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import WorkbenchError
from ._core import Option, Regularizer, TrainContext, register_regularizer
from ._points import HookSet, find_points, stage_ends

_ALPHA_FLOOR = 0.001  # the authors' "small value for numerical stability" added to alpha


class InformationDropoutLayer(nn.Module):
    """Multiplies a (pre-ReLU) feature map by log-normal noise ``exp(alpha(h) * eps)``, ``eps ~ N(0, 1)``.

    ``alpha(h) = 0.001 + max_alpha * sigmoid(conv3x3(h))`` per unit. Since the noise is positive, noise before the
    ReLU equals noise after it (the authors put it on the post-activation output). At evaluation the noise is
    off (the authors' ``sigma0 = 0``). ``last_kl`` holds the batch mean over examples of the summed KL term
    ``-log(alpha / (max_alpha + 0.001))`` (log-uniform prior, ReLU activations) of the last training forward.
    """

    def __init__(self, channels: int, max_alpha: float):
        super().__init__()
        self.alpha_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.max_alpha = float(max_alpha)
        self.last_kl: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        alpha = _ALPHA_FLOOR + self.max_alpha * torch.sigmoid(self.alpha_conv(h))
        kl = -torch.log(alpha / (self.max_alpha + _ALPHA_FLOOR))
        self.last_kl = kl.flatten(1).sum(1).mean()
        return h * torch.exp(alpha * torch.randn_like(h))

    def extra_repr(self) -> str:
        return f"max_alpha={self.max_alpha}"


@register_regularizer("information_dropout")
class InformationDropout(Regularizer):
    """Information Dropout (Achille & Soatto, 2018) at the end of each resolution stage.

    Settings and sources (the authors' CIFAR code, github.com/ucla-vision/information-dropout, ``cifar.py``):

    - ``beta = 3.0``, ``max_alpha = 0.7``, log-uniform prior for ReLU networks (KL = ``-log(alpha / (max_alpha +
      0.001))``), the KL summed over units, averaged over the batch, summed over layers and divided by the number of
      training images, then added to the loss times beta; noise off at evaluation;
    - ``alpha`` from a 3x3 convolution with sigmoid: the authors compute it from the layer's input with the
      layer's stride; since we add the method to an existing network without editing it, the convolution reads the
      feature map at the place itself (our adaptation);
    - placement: the authors replace the downsampling layer of each resolution block; we act at the last
      perturbation place of each resolution (3 places in ResNet-20, 4 in Conv-4), our choice.

    The MetaPerturb paper's Information Dropout setting is NOT FOUND (paper-notes 2.5).
    """

    options = {
        "beta": Option(3.0, "Information Dropout authors' CIFAR code (cifar.py); MetaPerturb's: NOT FOUND"),
        "max_alpha": Option(0.7, "Information Dropout authors' CIFAR code (cifar.py)"),
    }

    def validate(self) -> None:
        if self.settings["beta"] < 0:
            raise WorkbenchError(f"information_dropout beta must be >= 0, got {self.settings['beta']}")
        if not 0 < self.settings["max_alpha"] <= 10:
            raise WorkbenchError(f"information_dropout max_alpha must be in (0, 10], got {self.settings['max_alpha']}")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        points = stage_ends(find_points(model, ctx.in_channels, ctx.image_size))
        self.train_size = max(1, int(ctx.train_size))
        self.layers = nn.ModuleList()
        self.hooks = HookSet()
        self.place_names = []
        for point in points:
            layer = InformationDropoutLayer(point.channels, self.settings["max_alpha"])
            self.layers.append(layer)
            self.hooks.add(point.hook_feature(layer))
            self.place_names.append(point.name)
        model.add_module("regularizer_information_dropout", self.layers)
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        for layer in self.layers:
            layer.last_kl = None
        ce, acc = super().loss(model, x, y, step)
        kls = [layer.last_kl for layer in self.layers if layer.last_kl is not None]
        kl = torch.stack(kls).sum() / self.train_size if kls else ce.new_zeros(())
        self.last_kl = float(kl.detach())
        self.last_ce = float(ce.detach())
        return ce + self.settings["beta"] * kl, acc

    def train_metrics(self) -> dict[str, float]:
        if not hasattr(self, "last_kl"):
            return {}
        return {"kl": self.last_kl, "ce": self.last_ce}
