"""How a training step runs on its device: mixed precision (``precision``) and CUDA-graph capture (``cuda_graphs``).

A perturbed step on a GPU is bound by kernel launches (``docs/results.md``, GPU section): compiled sites
(``workbench.compiled``) cut the launches per site, and a CUDA graph replays the whole step (forward, backward,
optimizer) with one launch. :class:`CapturedStep` is the capture machinery; :class:`TrainStep` is the target-network
update of ``transfer`` built on it, and ``meta_train.trainer`` captures each task's first-order meta step with it.

What a captured step needs, and how it is met here:

* **Static inputs**: the batch is copied into the graph's own input tensors before each replay; a batch of
  another shape runs eagerly (``BatchIterator`` drops partial batches, so that does not happen in the loops).
* **The learning rate** lives in the optimizer as a 0-d device tensor (:func:`make_capturable`: ``capturable=True``
  Adam, ``lr`` a tensor); ``MultiStepLR`` writes it in place, so the graph reads the new value. Checkpoints are
  written as an eager run writes them (float ``lr``, ``capturable`` false) and converted back on load, so a run can
  be resumed with or without graphs.
* **The noise coefficient** (MetaPerturb's ramp changes it every step): the sites are pointed at 0-d views of one
  device tensor while the step is warmed up and captured, and :class:`TrainStep` writes the sites' current
  coefficients into it before every replay (a 0-d tensor coefficient routes a site through ``workbench.compiled``).
* **The RNG**: the noise is drawn on the device inside the graph; ``torch.cuda.graph`` registers the default CUDA
  generator, whose seed and offset are read at every replay, so each replay draws fresh noise and a task's own
  generator state (``TaskRNG``) set before a replay is the one used.
* **Python state the graph bakes in** (clip, the sites' active/compiled flags, train mode): compared before every
  replay; a change runs that step eagerly.

:func:`decide` says whether a run can capture at all, and why not: not a CUDA device, a module that declares
``data_dependent_control_flow = True``, an optimizer that cannot be made capturable (Adam and AdamW can), a method
whose loss reads values on the host or draws host-side randomness (only :data:`CAPTURE_SAFE_METHODS` are captured),
or a caller's own reason (meta-training's second-order look-ahead). A capture that fails anyway logs the reason once
and the step stays eager. ``auto`` captures where possible (silently eager elsewhere); ``on`` warns when it cannot.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import nn

from .compiled import MODES, Decision
from .config import SharedSettings, require
from .errors import WorkbenchError

_log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
#: Eager calls before a step is captured: lazy initialisation (optimizer state, cuDNN/cuBLAS workspaces, the
#: compiled sites' compilation) must happen outside the capture.
WARMUP_CALLS = 3
#: Methods whose training loss is device work only (no host reads, no host-side randomness, no use of ``step``).
CAPTURE_SAFE_METHODS = frozenset({"base", "dropout", "finetune", "metaperturb", "metaperturb_untrained",
                                  "finetune_metaperturb"})
#: Optimizers that :func:`make_capturable` can switch to ``capturable=True`` with a tensor learning rate.
_CAPTURABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


# ============================================================================================ precision
@dataclass
class AccelerationSettings(SharedSettings):
    """How a stage's training steps run on their device (transfer and meta-training derive from this; the
    defaults leave CPU runs bit-identical). compile_sites: the perturbation sites compiled by torch.compile
    (``workbench.compiled``; ``auto``: on CUDA devices). cuda_graphs: training steps captured as CUDA graphs
    (:func:`decide`; ``auto``: where the device and method allow). precision: ``bf16`` runs the training forward
    passes under bf16 autocast (float32 weights, optimizers and losses; evaluation stays float32)."""

    compile_sites: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        for name, allowed in (("compile_sites", MODES), ("cuda_graphs", MODES), ("precision", PRECISIONS)):
            value = getattr(self, name)
            require(value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}")
        super().validate()


def autocast(precision: str, device: torch.device | str, cache: bool = True) -> ContextManager:
    """The context of a forward pass at ``precision``: nothing for ``fp32``; bf16 autocast for ``bf16`` (weights,
    gradients and optimizer state stay float32; callers take the loss in float32). ``cache=False`` inside a CUDA
    graph capture (autocast's cast cache must not outlive the capture)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise WorkbenchError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)


# ============================================================================================ the decision
def data_dependent_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that declare ``data_dependent_control_flow = True``."""
    return [name or type(model).__name__ for name, module in model.named_modules()
            if getattr(module, "data_dependent_control_flow", False)]


def decide(mode: str, device: torch.device | str, *, models: Sequence[nn.Module] = (),
           optimizers: Sequence[torch.optim.Optimizer] = (), method: Optional[str] = None,
           blockers: Optional[Mapping[str, bool]] = None, what: str = "run") -> Decision:
    """Whether a run on ``device`` captures its steps as CUDA graphs (``cuda_graphs`` = ``mode``), with the reason,
    logged: at info level, or as a warning when ``mode`` is ``on`` and capture is impossible. ``blockers``: the
    caller's own reasons, ``{reason: applies}``."""
    if mode not in MODES:
        raise WorkbenchError(f"cuda_graphs must be one of {list(MODES)}, got {mode!r}")
    if mode == "off":
        return Decision(False, "cuda_graphs=off")
    device = torch.device(device)
    reason = None
    if device.type != "cuda":
        reason = f"a {device.type} device (CUDA graphs need a CUDA device)"
    elif not torch.cuda.is_available():
        reason = "CUDA is not available"
    if reason is None:
        for model in models:
            flagged = data_dependent_modules(model)
            if flagged:
                reason = (f"{type(model).__name__} has data-dependent control flow (module {flagged[0]} declares "
                          "data_dependent_control_flow)")
                break
    if reason is None:
        for optimizer in optimizers:
            if not isinstance(optimizer, _CAPTURABLE_OPTIMIZERS):
                reason = f"optimizer {type(optimizer).__name__} is not capturable (Adam and AdamW are)"
                break
    if reason is None and method is not None and method not in CAPTURE_SAFE_METHODS:
        reason = (f"method {method!r} is not known to be capture-safe (its loss reads values on the host or draws "
                  f"host-side randomness; captured: {', '.join(sorted(CAPTURE_SAFE_METHODS))})")
    if reason is None:
        reason = next((text for text, applies in (blockers or {}).items() if applies), None)
    if reason is None:
        decision = Decision(True, f"cuda_graphs={mode} on {device}")
        _log.info("workbench %s: training steps captured as CUDA graphs (%s)", what, decision.reason)
        return decision
    decision = Decision(False, f"cuda_graphs={mode}, but {reason}")
    if mode == "on":
        _log.warning("workbench %s: %s; the steps run eagerly", what, decision.reason)
    else:
        _log.info("workbench %s: steps run eagerly (%s)", what, decision.reason)
    return decision


# ============================================================================================ the optimizer
def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device | str) -> torch.optim.Optimizer:
    """Switch an Adam/AdamW to ``capturable=True`` with its learning rates as 0-d tensors on ``device`` (an LR
    scheduler then writes them in place). Its ``state_dict()`` stays the eager form (float ``lr``, ``capturable``
    false) and ``load_state_dict()`` converts back, so checkpoints do not depend on the option."""
    if not isinstance(optimizer, _CAPTURABLE_OPTIMIZERS):
        raise WorkbenchError(f"optimizer {type(optimizer).__name__} cannot be made capturable (Adam and AdamW can)")
    device = torch.device(device)
    if getattr(optimizer, "_workbench_capturable", False):
        return optimizer
    _to_capturable(optimizer, device)
    optimizer.register_state_dict_post_hook(_eager_state_dict)
    optimizer.register_load_state_dict_post_hook(lambda opt: _to_capturable(opt, device))
    optimizer._workbench_capturable = True
    return optimizer


def _to_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for group in optimizer.param_groups:
        group["capturable"] = True
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].to(device=device, dtype=torch.float32)
        else:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        for param in group["params"]:  # a state loaded from an eager checkpoint keeps its step count on the CPU
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def _eager_state_dict(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    for group in state["param_groups"]:
        group["capturable"] = False
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
    return state


# ============================================================================================ capture
class CapturedStep:
    """``function(*tensors) -> tuple of tensors``, run eagerly for :data:`WARMUP_CALLS` calls (on a side stream),
    then captured once as a CUDA graph and replayed: each call copies its inputs into the graph's static inputs and
    returns the graph's static outputs (valid until the next call). A capture that fails logs why and the function
    runs eagerly from then on; inputs of other shapes, or a changed ``signature()`` (Python state the graph baked
    in), run eagerly for that call.

    ``context``: entered around the warm-up calls and the capture (not the replays).
    """

    def __init__(self, function: Callable[..., tuple], device: torch.device | str, name: str, *,
                 warmup: int = WARMUP_CALLS, context: Callable[[], ContextManager] = contextlib.nullcontext,
                 signature: Callable[[], Any] = lambda: None):
        self.function = function
        self.device = torch.device(device)
        self.name = name
        self.warmup = int(warmup)
        self.context = context
        self.signature = signature
        self.calls = 0
        self.replays = 0
        self.eager_calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failure: Optional[str] = None
        self._static_inputs: tuple[torch.Tensor, ...] = ()
        self._static_outputs: tuple[torch.Tensor, ...] = ()
        self._captured_signature: Any = None
        self._noted: set[str] = set()
        self._stream = torch.cuda.Stream(self.device)

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        if self.failure is not None:
            return self.function(*inputs)
        if self.graph is not None:
            mismatch = self._mismatch(inputs)
            if mismatch is None:
                for static, value in zip(self._static_inputs, inputs):
                    static.copy_(value)
                self.graph.replay()
                self.replays += 1
                return self._static_outputs
            self._note(mismatch)
            self.eager_calls += 1
            return self.function(*inputs)
        if self.calls < self.warmup:
            self.calls += 1
            return self._on_side_stream(inputs)
        return self._capture(inputs)

    def _on_side_stream(self, inputs: tuple) -> tuple:
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream), self.context():
            outputs = self.function(*inputs)
        current.wait_stream(self._stream)
        return outputs

    def _capture(self, inputs: tuple) -> tuple:
        self._static_inputs = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            with self.context(), torch.cuda.graph(graph):
                outputs = tuple(self.function(*self._static_inputs))
        except Exception as exc:  # an op that is not capturable, a host sync...: stay eager, say why once
            from .artifacts.formatting import _exception_line

            self.failure = _exception_line(exc)
            self._static_inputs = ()
            _log.warning("workbench: capturing the %s as a CUDA graph failed (%s); it runs eagerly", self.name,
                         self.failure)
            return self.function(*inputs)
        self.graph, self._static_outputs = graph, outputs
        self._captured_signature = self.signature()
        _log.info("workbench: captured the %s as a CUDA graph after %d eager calls", self.name, self.calls)
        graph.replay()
        self.replays += 1
        return self._static_outputs

    def _mismatch(self, inputs: tuple) -> Optional[str]:
        for static, value in zip(self._static_inputs, inputs):
            if static.shape != value.shape or static.dtype != value.dtype or static.device != value.device:
                return (f"an input of shape {tuple(value.shape)} ({value.dtype}) where the graph has "
                        f"{tuple(static.shape)} ({static.dtype})")
        if self.signature() != self._captured_signature:
            return "a setting baked into the graph changed (clip, a site's flags or the train mode)"
        return None

    def _note(self, what: str) -> None:
        if what not in self._noted:
            self._noted.add(what)
            _log.info("workbench: the %s ran eagerly for %s", self.name, what)


# ============================================================================================ noise coefficients
def perturbation_sites(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Every ``PerturbSite`` in or under ``modules``, once each, in module order."""
    from .perturb import PerturbSite

    found: dict[int, nn.Module] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, PerturbSite):
                found.setdefault(id(sub), sub)
    return list(found.values())


class DeviceCoefficients:
    """The sites' noise coefficients as 0-d device tensors the graph reads (one per site: a view into a shared
    tensor would differ between sites in its storage offset, which the compiled site guards on): :meth:`load`
    writes the sites' current (float) coefficients into them before a call; within :meth:`in_sites` the sites hold
    these tensors instead of their floats."""

    def __init__(self, sites: Sequence[nn.Module], device: torch.device):
        self.sites = list(sites)
        self.values = [torch.ones((), dtype=torch.float32, device=device) for _ in self.sites]

    def load(self) -> None:
        for site, value in zip(self.sites, self.values):
            if not isinstance(site.noise_coeff, torch.Tensor):
                value.fill_(float(site.noise_coeff))  # a fill kernel with the value as its argument: no host copy

    @contextlib.contextmanager
    def in_sites(self) -> Iterator[None]:
        before = [site.noise_coeff for site in self.sites]
        try:
            for site, value in zip(self.sites, self.values):
                site.noise_coeff = value
            yield
        finally:
            for site, value in zip(self.sites, before):
                site.noise_coeff = value


def site_signature(model: nn.Module, sites: Sequence[nn.Module]) -> tuple:
    """The Python state of ``model`` and its sites that a captured step bakes in."""
    return (model.training,) + tuple((site.training, site.active, site.fused, site.compiled, site.clip,
                                      site.record_stats) for site in sites)


# ============================================================================================ transfer's step
class TrainStep:
    """One update of a target network: ``step(x, y, index) -> (loss, accuracy)`` (detached; with graphs, valid
    until the next call): the regularizer's loss (under bf16 autocast with ``precision="bf16"``, the loss itself in
    float32), ``zero_grad``, backward, the optimizer's step. With ``graphs.on`` it is captured (see the module
    docstring; the method's loss must not depend on the step index, as for :data:`CAPTURE_SAFE_METHODS`)."""

    def __init__(self, model: nn.Module, regularizer: Any, optimizer: torch.optim.Optimizer,
                 device: torch.device | str, precision: str = "fp32", graphs: Decision = Decision(False, "off"),
                 warmup: int = WARMUP_CALLS):
        self.model, self.regularizer, self.optimizer = model, regularizer, optimizer
        self.device = torch.device(device)
        self.precision = precision
        autocast(precision, self.device)  # refuses an unknown precision now
        self.captured: Optional[CapturedStep] = None
        self.coefficients: Optional[DeviceCoefficients] = None
        self._index = 0
        if graphs.on:
            make_capturable(optimizer, self.device)
            sites = perturbation_sites([model])
            self.coefficients = DeviceCoefficients(sites, self.device)
            self.captured = CapturedStep(self._captured_update, self.device, "transfer training step",
                                         warmup=warmup, context=self.coefficients.in_sites,
                                         signature=lambda: site_signature(model, sites))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.captured is None:
            return self._update(x, y, index)
        self.coefficients.load()
        self._index = index
        return self.captured(x, y)

    def _update(self, x: torch.Tensor, y: torch.Tensor, index: int, cache: bool = True):
        with autocast(self.precision, self.device, cache):
            loss, acc = self.regularizer.loss(self.model, x, y, index)
        if self.precision != "fp32":
            loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, acc

    def _captured_update(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, acc = self._update(x, y, self._index, cache=False)
        return loss.detach(), acc.detach()

    @property
    def mode(self) -> str:
        """``eager``, ``graph`` (replaying), ``warming up`` or ``eager (capture failed: ...)``, for logs and tests."""
        if self.captured is None:
            return "eager"
        if self.captured.failure is not None:
            return f"eager (capture failed: {self.captured.failure})"
        return "graph" if self.captured.graph is not None else "warming up"


__all__ = ["CAPTURE_SAFE_METHODS", "CapturedStep", "DeviceCoefficients", "MODES", "PRECISIONS", "TrainStep",
           "autocast", "data_dependent_modules", "decide", "make_capturable", "perturbation_sites", "site_signature"]
