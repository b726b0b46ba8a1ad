"""Manifold Mixup: mixup of hidden representations at a randomly chosen layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import WorkbenchError
from ._core import Option, Regularizer, TrainContext, register_regularizer
from ._points import HookSet, find_points, stage_ends
from .mixup import mixed_loss, sample_lambda


@register_regularizer("manifold_mixup")
class ManifoldMixup(Regularizer):
    """Manifold Mixup (Verma et al., 2019): each step mixes, with lambda ~ Beta(alpha, alpha), the
    representations of pairs of examples at one layer drawn uniformly from {input, end of stage 1, end of stage 2},
    and mixes their labels the same way.

    Settings and sources:

    - ``alpha = 2.0`` and the eligible layers {input, output of the first residual stage, output of the second}
      (k in {0, 1, 2} for PreActResNet): the Manifold Mixup authors' CIFAR setting;
    - a "stage" here is a run of perturbation places with the same resolution; its end is the output of its last
      block after the block's ReLU (for Conv-4: the outputs of blocks 1 and 2).

    The MetaPerturb paper names Manifold Mixup as a baseline; its alpha and layers are NOT FOUND
    (paper-notes 2.5). Deterministic at evaluation (no mixing).
    """

    options = {
        "alpha": Option(2.0, "Manifold Mixup authors (Verma et al. 2019), CIFAR setting; MetaPerturb's: NOT FOUND"),
        "stages": Option(2, "Manifold Mixup authors: input and the outputs of the first two stages (k in {0,1,2})"),
    }

    def validate(self) -> None:
        if self.settings["alpha"] < 0:
            raise WorkbenchError(f"manifold_mixup alpha must be >= 0, got {self.settings['alpha']}")
        if self.settings["stages"] < 0:
            raise WorkbenchError(f"manifold_mixup stages must be >= 0, got {self.settings['stages']}")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        ends = stage_ends(find_points(model, ctx.in_channels, ctx.image_size))[: self.settings["stages"]]
        self.layer_names = ["input"] + [p.name for p in ends]
        self.hooks = HookSet()
        self._mix: tuple[int, float, torch.Tensor] | None = None
        for index, point in enumerate(ends, start=1):
            self.hooks.add(point.hook_output(lambda h, index=index: self._mix_at(index, h)))
        return model

    def _mix_at(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if self._mix is None or self._mix[0] != index:
            return h
        _, lam, perm = self._mix
        return lam * h + (1 - lam) * h[perm]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        lam = sample_lambda(self.settings["alpha"])
        layer = int(torch.randint(len(self.layer_names), (1,)))
        perm = torch.randperm(x.shape[0], device="cpu").to(x.device)
        self.last_lambda, self.last_layer = lam, layer
        if layer == 0:
            x = lam * x + (1 - lam) * x[perm]
        self._mix = (layer, lam, perm)
        try:
            logits = model(x)
        finally:
            self._mix = None
        return mixed_loss(logits, y, perm, lam)

    def train_metrics(self) -> dict[str, float]:
        if not hasattr(self, "last_lambda"):
            return {}
        return {"mix_lambda": self.last_lambda, "mix_layer": self.last_layer}
