"""Regularizers compared with MetaPerturb: one registry, one file per method, the same training loop.

``build_regularizer("dropblock", {"drop_prob": 0.1})`` returns a configured :class:`Regularizer`; the transfer
loop calls its hooks (see ``_core.py``). ``available_regularizers()`` lists the names. Each method's docstring
states its setting and where that setting comes from (the paper, the method's authors, or our choice where the
paper's is NOT FOUND, paper-notes 2.5).

Adding a method: a new file with ``@register_regularizer("name") class X(Regularizer)`` imported below.
"""
from ._core import (
    Option,
    Regularizer,
    SourceNetwork,
    TrainContext,
    available_regularizers,
    build_regularizer,
    linear_ramp,
    register_regularizer,
    regularizer_class,
)
from . import (  # noqa: F401  (importing registers each method)
    base,
    dropblock,
    dropout,
    finetune,
    finetune_metaperturb,
    information_dropout,
    l2sp,
    manifold_mixup,
    metaperturb,
    metaperturb_untrained,
    mixup,
)
from .metaperturb import NOISE_WARMUP, TRAIN_CLIP, noise_coefficient

__all__ = [
    "Option",
    "Regularizer",
    "SourceNetwork",
    "TrainContext",
    "available_regularizers",
    "build_regularizer",
    "linear_ramp",
    "noise_coefficient",
    "register_regularizer",
    "regularizer_class",
    "NOISE_WARMUP",
    "TRAIN_CLIP",
]
