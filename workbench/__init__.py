"""MetaPerturb Workbench: meta-learned, transferable regularization for any CNN."""
from .errors import WorkbenchError
from .perturb import MetaPerturb, PerturbSite
from .attach import attach

__all__ = ["MetaPerturb", "PerturbSite", "attach", "WorkbenchError"]
__version__ = "0.1.0"
