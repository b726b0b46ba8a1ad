"""MetaPerturb: the meta-learned perturbation function phi, frozen and attached to the target network."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ._core import Regularizer, TrainContext, register_regularizer

NOISE_WARMUP = 0.4  # fraction of the steps over which the noise coefficient rises from 0 to 1 (original code)
TRAIN_CLIP = 100.0  # perturbed activations are clamped to at most this in training forwards (original code)


def noise_coefficient(step: int, total_steps: int, warmup: float = NOISE_WARMUP) -> float:
    """``min(1, step / (warmup * total_steps))`` at the 0-based ``step``: 0 at the first step, 1 from 40% on.

    ``warmup = 0`` (or no steps) gives 1 from the start.
    """
    span = warmup * total_steps
    if span <= 0:
        return 1.0
    return min(1.0, max(0.0, step / span))


@register_regularizer("metaperturb")
class MetaPerturbRegularizer(Regularizer):
    """MetaPerturb (Ryu et al., 2020): the frozen, meta-learned phi perturbs every site of the target network.

    Exactly the original target recipe (paper-notes 1.8, 2.4, 5.7-5.10), all from the authors' code:

    - phi is loaded (``phi = official`` for the authors' released ``perturb_750.pth``, a path, or a meta-train run
      id), frozen (``requires_grad`` off) and never given to the optimiser;
    - ``attach`` inserts fresh sites (running statistics start at mean 0 / var 1 and are re-estimated on the target);
    - noise coefficient ``min(1, step / (noise_warmup * steps))`` with ``noise_warmup = 0.4``; clip 100 in training;
    - evaluation with coefficient 1 and no clip; the noise is still drawn, so prediction is the MC average
      (``eval_mc_samples = 5`` during training, ``final_mc_samples = 100`` at the end).

    The two schedule settings are the transfer config's ``noise_warmup`` and ``clip``; the method has no others.
    """

    stochastic_eval = True
    needs_phi = True

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        from ..attach import attach

        phi = ctx.phi
        phi.requires_grad_(False)
        phi.to(ctx.device)
        self.phi = phi
        self.noise_warmup = ctx.noise_warmup
        self.clip = ctx.clip
        self.handle = attach(model, phi, image_size=ctx.image_size)
        return model

    def on_train_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.coefficient = noise_coefficient(step, total_steps, self.noise_warmup)
        self.handle.set_noise_coeff(self.coefficient)
        self.handle.set_clip(self.clip)
        self._record(False)  # the per-forward statistics are read at evaluation only; they cost a sync each

    def on_eval(self, model: nn.Module) -> None:
        self.handle.set_noise_coeff(1.0)
        self.handle.set_clip(None)
        self._record(True)

    def _record(self, on: bool) -> None:
        for site in self.handle.sites:
            if hasattr(site, "record_stats"):
                site.record_stats = on

    def train_metrics(self) -> dict[str, float]:
        return {"noise_coeff": self.coefficient} if hasattr(self, "coefficient") else {}

    def sites(self) -> tuple[list[nn.Module], list[str]]:
        return list(self.handle.sites), list(self.handle.site_names)

    def tile_at(self) -> nn.Module | None:
        return self.handle.sites[0] if self.handle.sites else None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["settings"] = {"noise_warmup": getattr(self, "noise_warmup", NOISE_WARMUP),
                           "clip": getattr(self, "clip", TRAIN_CLIP)}
        out["sources"] = {"noise_warmup": "original code (train_tgt.py)", "clip": "original code (train_tgt.py)"}
        if hasattr(self, "handle"):
            out["sites"] = len(self.handle.sites)
        return out
