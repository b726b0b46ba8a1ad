"""Fine-tuning + MetaPerturb: start from the source network's conv weights and train with frozen phi."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ._core import TrainContext, register_regularizer
from .finetune import load_source_convs
from .metaperturb import MetaPerturbRegularizer


@register_regularizer("finetune_metaperturb")
class FinetuneMetaPerturb(MetaPerturbRegularizer):
    """Fine-tuning + MetaPerturb: the conv weights come from a source network of the same architecture (as for
    ``finetune``: BN and classifier excluded, like the original ``--fine_tune``), then phi is attached, frozen, with
    the MetaPerturb schedule. The original code allows this combination (``train_tgt.py --fine_tune`` always
    attaches phi); whether the paper reports it is NOT FOUND (paper-notes 3.1, 3.3). No settings of its own.
    """

    needs_source = True

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        self.loaded = load_source_convs(model, ctx.source, ctx.arch)  # before attach: the model is still plain
        self.origin = ctx.source.origin
        return super().prepare(model, ctx)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["source"] = getattr(self, "origin", None)
        out["transferred"] = len(getattr(self, "loaded", []))
        return out
