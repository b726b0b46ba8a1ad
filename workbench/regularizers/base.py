"""Base: no regularizer beyond what every method shares."""
from __future__ import annotations

from ._core import Regularizer, register_regularizer


@register_regularizer("base")
class Base(Regularizer):
    """Base: plain supervised training, the paper's reference point ("the base model", paper-notes 2.5).

    Nothing is added: the shared loop's Adam weight decay (5e-4), random crop + flip augmentation and learning-rate
    schedule are the whole recipe, as in the original target training without the perturbation. No settings.
    """
