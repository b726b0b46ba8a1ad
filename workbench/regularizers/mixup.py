"""Mixup on the input images."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WorkbenchError
from ._core import Option, Regularizer, register_regularizer


def sample_lambda(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), drawn from torch's global generator (so checkpoints replay it)."""
    if alpha <= 0:
        return 1.0
    a = torch.tensor([alpha], dtype=torch.float64)
    return float(torch.distributions.Beta(a, a).sample())


def mixed_loss(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam * CE(y) + (1 - lam) * CE(y[perm])`` and the matching mixed accuracy."""
    loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    pred = logits.detach().argmax(1)
    acc = lam * (pred == y).float().mean() + (1 - lam) * (pred == y[perm]).float().mean()
    return loss, acc


@register_regularizer("mixup")
class Mixup(Regularizer):
    """Mixup (Zhang et al., 2018): train on convex combinations of pairs of images and of their labels.

    Setting: ``alpha = 1.0`` (lambda ~ Beta(1, 1)), the mixup authors' CIFAR setting; pairs are a random
    permutation of the batch and one lambda per batch, as in their code. Whether the MetaPerturb paper compares to
    input mixup, and with what alpha, is NOT FOUND (paper-notes 2.5). Deterministic at evaluation. The training
    accuracy in the curves is the lambda-weighted accuracy against both labels.
    """

    options = {
        "alpha": Option(1.0, "mixup authors (Zhang et al. 2018), CIFAR setting; MetaPerturb's: NOT FOUND"),
    }

    def validate(self) -> None:
        if self.settings["alpha"] < 0:
            raise WorkbenchError(f"mixup alpha must be >= 0, got {self.settings['alpha']}")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int):
        lam = sample_lambda(self.settings["alpha"])
        perm = torch.randperm(x.shape[0], device="cpu").to(x.device)
        self.last_lambda = lam
        return mixed_loss(model(lam * x + (1 - lam) * x[perm]), y, perm, lam)

    def train_metrics(self) -> dict[str, float]:
        return {"mix_lambda": self.last_lambda} if hasattr(self, "last_lambda") else {}
