"""The untrained-phi control: MetaPerturb with phi at its initialisation, to tell noise from learned noise."""
from __future__ import annotations

from typing import Any

from ._core import register_regularizer
from .metaperturb import MetaPerturbRegularizer


@register_regularizer("metaperturb_untrained")
class MetaPerturbUntrained(MetaPerturbRegularizer):
    """MetaPerturb with the phi a meta-training run *started* from (``phi`` names the run, as for ``metaperturb``):
    the same seed, the same N(0, 0.01^2) draw, the same sites, noise schedule, clip and MC prediction; only the
    meta-training is missing. An untrained phi gives a scale of about 0.5 everywhere and feature-independent noise
    ``softplus(N(0, 1))``, so the difference between ``metaperturb`` and this control is what meta-learning added.

    With ``phi = official`` or a phi file (no run to take the initialisation from) the control is a fresh phi
    drawn as a run of seed 0 draws it. No settings of its own (workbench's control; not in the paper).
    """

    initial_phi = True

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["phi"] = "the initialisation of the named phi's meta-training run (untrained control)"
        return out
