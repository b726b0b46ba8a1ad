"""Dropout before the classifier."""
from __future__ import annotations

import torch.nn as nn

from ..errors import WorkbenchError
from ._core import Option, Regularizer, TrainContext, register_regularizer


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier: its last ``nn.Linear`` in registration order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise WorkbenchError(f"{type(model).__name__} has no nn.Linear classifier to put dropout in front of")
    return found[-1]


@register_regularizer("dropout")
class Dropout(Regularizer):
    """Dropout (Srivastava et al., 2014) on the classifier's input features.

    Setting: ``p = 0.5``, the rate Srivastava et al. recommend for hidden units; placement on the input of the
    final linear layer (the pooled features), the classic place for dropout in a CNN. Dropout is not among the
    baselines whose settings the MetaPerturb paper gives (NOT FOUND, paper-notes 2.5), so both are our choice.
    Standard inverted dropout: deterministic at evaluation.
    """

    options = {
        "p": Option(0.5, "Srivastava et al. (2014)'s recommended rate for hidden units; MetaPerturb's: NOT FOUND"),
    }

    def validate(self) -> None:
        if not 0.0 <= self.settings["p"] < 1.0:
            raise WorkbenchError(f"dropout p must be in [0, 1), got {self.settings['p']}")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        name, linear = last_linear(model)
        drop = nn.Dropout(self.settings["p"])
        # A child of the model (so train()/eval() reach it) applied by a pre-hook: no state_dict key changes.
        model.add_module("regularizer_dropout", drop)
        self.handle = linear.register_forward_pre_hook(lambda _m, args: (drop(args[0]),) + tuple(args[1:]))
        self.classifier = name
        return model
