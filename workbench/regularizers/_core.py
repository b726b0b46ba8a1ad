"""The regularizer interface, its registry and the context the training loop hands to it.

The transfer loop (``workbench/transfer.py``) is the same for every method; a regularizer changes it only through
these hooks, called in this order:

1. ``prepare(model, ctx)``: modify the freshly built network (insert modules, attach phi, load source weights)
   and return it; the loop then moves it to the device and builds the optimiser from
2. ``param_groups(model, weight_decay)``: Adam parameter groups (default: every trainable parameter of the model,
   with the loop's weight decay);
3. each step, ``on_train_step(model, step, total_steps)`` (schedules such as the noise coefficient), then
   ``loss(model, x, y, step) -> (loss, accuracy)`` (the forward pass and the objective; default cross-entropy);
4. before each evaluation, for methods with ``needs_recalibration``, ``recalibrate(model, batches)`` with fresh
   training batches (e.g. BatchNorm statistics re-estimated without noise), then ``on_eval(model)`` (evaluation
   settings, e.g. no clipping).

``stochastic_eval`` says whether the trained network is still random in eval mode (then the prediction is the
Monte-Carlo average of ``K`` passes and adversarial attacks use EoT). ``sites()`` names the perturbation sites
whose scales are reported; ``tile_at()`` the first stochastic module (everything before it is deterministic in
eval mode, so MC prediction can compute it once). ``state_dict()`` holds any state outside the model.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WorkbenchError


@dataclasses.dataclass
class Option:
    """One setting of a method: its default and where that default comes from."""

    default: Any
    source: str


@dataclasses.dataclass
class SourceNetwork:
    """A network trained on the source dataset, to fine-tune from."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    origin: str  # run id or file path, for messages and the run record


@dataclasses.dataclass
class TrainContext:
    """What a regularizer may need to know about the run (the loop fills it)."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    total_steps: int
    train_size: int
    # the recipe's noise ramp (fraction of the steps to coefficient 1) and training clamp (None: none), for the
    # methods with phi; the recipe's defaults are NOISE_WARMUP and TRAIN_CLIP of ``regularizers.metaperturb``
    noise_warmup: float
    clip: float | None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    phi: Any = None  # a workbench.perturb.MetaPerturb for methods with needs_phi
    source: SourceNetwork | None = None  # for methods with needs_source


class Regularizer:
    """Base class: the plain supervised recipe. Subclasses override only the hooks they change."""

    name: ClassVar[str] = ""
    #: the trained network is random in eval mode (MC prediction, EoT attacks)
    stochastic_eval: ClassVar[bool] = False
    #: the loop must load phi into ``ctx.phi``
    needs_phi: ClassVar[bool] = False
    #: with ``needs_phi``: the loop loads the phi that ``phi``'s meta-training run started from (a control)
    initial_phi: ClassVar[bool] = False
    #: the loop must load a source network into ``ctx.source``
    needs_source: ClassVar[bool] = False
    #: before each evaluation the loop calls ``recalibrate`` with an iterable of training batches
    needs_recalibration: ClassVar[bool] = False
    #: settings of the method: name -> Option(default, where the default comes from)
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, **settings: Any):
        unknown = sorted(set(settings) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise WorkbenchError(
                f"method {self.name!r} has no setting {unknown[0]!r}; its method_options are: {known}"
            )
        self.settings: dict[str, Any] = {k: opt.default for k, opt in self.options.items()}
        for key, value in settings.items():
            default = self.options[key].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise WorkbenchError(f"method_options.{key} of {self.name!r} must be true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise WorkbenchError(f"method_options.{key} of {self.name!r} must be a number, got {value!r}")
                if isinstance(default, int) and not float(value).is_integer():
                    raise WorkbenchError(f"method_options.{key} of {self.name!r} must be an integer, got {value!r}")
                value = type(default)(value)
            self.settings[key] = value
        self.validate()

    # ------------------------------------------------------------------------------------------------ hooks
    def validate(self) -> None:
        """Raise WorkbenchError for settings that make no sense."""

    def prepare(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def on_train_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    def recalibrate(self, model: nn.Module, batches: Any) -> None:
        """With ``needs_recalibration``: update evaluation statistics from ``batches``, an iterable (possibly
        endless: take what you need) of augmented ``(x, y)`` training batches on the model's device."""

    def on_eval(self, model: nn.Module) -> None:
        pass

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective on one batch: ``(loss, accuracy)`` (accuracy detached, for the curves)."""
        logits = model(x)
        return F.cross_entropy(logits, y), (logits.detach().argmax(1) == y).float().mean()

    def train_metrics(self) -> dict[str, float]:
        """Extra scalars of the last step for the training curve (e.g. a penalty term)."""
        return {}

    def sites(self) -> tuple[list[nn.Module], list[str]]:
        """Perturbation sites whose scales and multiplier statistics are reported (none by default)."""
        return [], []

    def tile_at(self) -> nn.Module | None:
        """The first stochastic module in eval mode, where MC prediction may start tiling (None: at the input)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """Name, settings and their sources, for the run record."""
        doc = inspect.getdoc(type(self)) or ""
        return {
            "method": self.name,
            "settings": dict(self.settings),
            "sources": {k: opt.source for k, opt in self.options.items()},
            "stochastic_eval": self.stochastic_eval,
            "summary": doc.split("\n", 1)[0],
        }

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({inner})"


_REGISTRY: dict[str, type[Regularizer]] = {}


def register_regularizer(name: str) -> Callable[[type[Regularizer]], type[Regularizer]]:
    """Class decorator adding a :class:`Regularizer` subclass to the registry under ``name``."""

    def decorator(cls: type[Regularizer]) -> type[Regularizer]:
        if name in _REGISTRY:
            raise ValueError(f"regularizer {name!r} is registered twice")
        if not issubclass(cls, Regularizer):
            raise TypeError(f"{cls.__name__} must derive from Regularizer")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_regularizers() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def regularizer_class(name: str) -> type[Regularizer]:
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise WorkbenchError(f"unknown method {name!r}; available methods: {', '.join(available_regularizers())}")
    return _REGISTRY[key]


def build_regularizer(name: str, options: dict[str, Any] | None = None) -> Regularizer:
    """A configured regularizer by name (unknown names and settings are one-line errors)."""
    return regularizer_class(name)(**(options or {}))


def linear_ramp(step: int, total: float) -> float:
    """``min(1, step / total)``, and 1 when ``total`` is 0: the warm-up of schedules."""
    if total <= 0:
        return 1.0
    return min(1.0, max(0.0, step / total))
