"""L2-SP: fine-tuning with an L2 penalty towards the source weights."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import WorkbenchError
from ._core import Option, TrainContext, register_regularizer
from .finetune import Finetune


@register_regularizer("l2sp")
class L2SP(Finetune):
    """L2-SP (Li, Grandvalet & Davoine, 2018): fine-tuning where the transferred weights are pulled towards their
    source values instead of towards zero.

    Loss = CE + ``alpha / 2 * sum ||w - w_source||^2`` over the transferred conv weights, which get no weight
    decay; the new layers (BN, classifier) keep the loop's weight decay (L2-SP's beta term, here Adam's coupled
    decay 5e-4 like every other method).

    Setting: ``alpha = 0.1``, our choice on the scale of the L2-SP authors' cross-validated values (they tune alpha
    and beta per task); the MetaPerturb paper's L2-SP setting, and whether it is one of its baselines, are
    NOT FOUND (paper-notes 2.5).
    """

    options = {
        "alpha": Option(0.1, "our choice on the L2-SP authors' scale (tuned per task by them); MetaPerturb's: NOT FOUND"),
    }

    def validate(self) -> None:
        if self.settings["alpha"] < 0:
            raise WorkbenchError(f"l2sp alpha must be >= 0, got {self.settings['alpha']}")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().prepare(model, ctx)
        params = dict(model.named_parameters())
        self.anchor_params = {k: params[k] for k in self.loaded}
        self.anchors = {k: params[k].detach().clone() for k in self.loaded}
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        anchored = {id(p) for p in self.anchor_params.values()}
        for key, param in self.anchor_params.items():  # the model is on its device by now
            self.anchors[key] = self.anchors[key].to(param.device)
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in anchored]
        return [
            {"params": list(self.anchor_params.values()), "weight_decay": 0.0},
            {"params": rest, "weight_decay": weight_decay},
        ]

    def penalty(self) -> torch.Tensor:
        """``alpha / 2 * sum ||w - w_source||^2`` over the transferred weights."""
        total = sum(((p - self.anchors[k]) ** 2).sum() for k, p in self.anchor_params.items())
        return 0.5 * self.settings["alpha"] * total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        ce, acc = super().loss(model, x, y, step)
        sp = self.penalty()
        self.last_sp = float(sp.detach())
        return ce + sp, acc

    def train_metrics(self) -> dict[str, float]:
        return {"l2sp": self.last_sp} if hasattr(self, "last_sp") else {}

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": {k: v.detach().cpu() for k, v in self.anchors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchors = state.get("anchors", {})
        if set(anchors) != set(self.anchors):
            raise WorkbenchError("the checkpoint's L2-SP anchors do not match this network; resume with its own config")
        for key, value in anchors.items():
            self.anchors[key] = value.to(self.anchors[key].device)
