"""Compiled perturbation sites: ``torch.compile`` of the site's function (Inductor: Triton on CUDA, C++ on the CPU).

On a GPU the eager site is about a hundred small kernels per call (six depthwise convolutions and their backward,
~30 elementwise passes, the scale path), so a perturbed ResNet-20 step is bound by kernel launches, not by the GPU.
Here the site is written once as plain tensor code (:func:`site_function`) in which every 3x3 stencil is nine
shifted multiply-adds instead of a convolution call, so that Inductor fuses the whole site, forward and backward,
into a handful of generated kernels.

* Which sites: those with ``PerturbSite.compiled`` set (:func:`set_compiled`); the training loops set it from the
  ``compile_sites`` option (``auto``: on CUDA, ``off`` on the CPU, where the fused C++ kernel of ``_native`` serves
  the sites; ``on`` everywhere, which is how the compiled site is tested on the CPU). :func:`decide` makes that
  choice and says why.
* The stencils: shifted multiply-adds, or depthwise convolution calls where :data:`STENCIL` says so for the device
  type (kept for comparison; run uncompiled, the site function always uses the convolutions).
* What it covers: training and evaluation mode, phi frozen (transfer) or trained (meta-training's first-order meta
  gradient), forward and backward, the fused ReLU / 2x2 max-pool / BatchNorm of ``attach`` (the BatchNorm runs
  eagerly in front of the compiled function). Not the second-order look-ahead: that needs a double backward, and
  ``lookahead.twice_differentiable`` switches the sites to their plain-autograd form (``fused=False``), which never
  comes here, so meta-training with ``second_order`` stays eager at the sites.
* Compiled once per (device, dtype, flags): every flag combination (training, ReLU, pool, clip or not, double
  Bessel, multiplier statistics, grad mode, phi trained or frozen, input requiring grad) gets its own compiled
  function, and so its own Dynamo cache; the feature map's sizes are dynamic, so one compilation serves every site
  of a network and every batch size (the convolution form: one compilation per site shape). A compilation that
  fails logs one warning with the reason and that flag combination keeps the eager path from then on
  (:func:`failures` lists them).
* Numbers: computed in float32 inside (a bf16 map under autocast is read and written as bf16), the noise ``eps``
  drawn outside the compiled code exactly as the eager path draws it (same RNG stream and layout), so the same seed
  gives the same noise on either path. Checked against ``perturb.reference_perturb`` and the eager path
  (``tests/test_compiled.py``).
* The noise coefficient may be a 0-d device tensor (``PerturbSite.noise_coeff``): the CUDA-graph step
  (``workbench.graphs``) points the sites at one, updated in place before each replay. A float coefficient is turned
  into a cached device scalar here (no host-to-device copy per call).

Dispatch goes one way: ``perturb.perturb`` calls :func:`perturb` here (which may answer None: use the eager path);
the site code depends only on ``_fused`` and ``errors``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._fused import batch_norm as apply_batch_norm, standard_normal
from .errors import WorkbenchError

_log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
_NUM_SCALE_KERNELS = 4

_functions: dict[tuple, Callable] = {}  # flags key -> compiled function
_failed: dict[tuple, str] = {}  # flags key -> why its compilation failed (that key stays eager)
_constants: dict[tuple, torch.Tensor] = {}  # (device, values) -> float32 device tensor (coefficients, size ratios)
_CONSTANT_CACHE = 256
#: Device type -> the compiled site's 3x3 stencils as shifted multiply-adds (True: Inductor fuses the whole site into
#: a few generated kernels, the point on a launch-bound GPU, and every size stays dynamic) or as depthwise
#: convolution calls (False: kept for comparison, ``benchmarks/compiled_site.py``; a convolution's groups fix the
#: channel count, and on the CPU oneDNN's lowering fixes the map size too: a compilation per site shape).
STENCIL = {"cuda": True, "cpu": True}


# ============================================================================================ the decision
@dataclass(frozen=True)
class Decision:
    """Whether an option (``compile_sites``, ``cuda_graphs``) is in effect for a run, and why (for the log)."""

    on: bool
    reason: str


def decide(mode: str, device: torch.device | str) -> Decision:
    """``compile_sites`` for a run on ``device``: ``auto`` is on for CUDA and off elsewhere (the CPU has its fused
    C++ kernel), ``on`` compiles on any device, ``off`` never."""
    if mode not in MODES:
        raise WorkbenchError(f"compile_sites must be one of {list(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "off":
        return Decision(False, "compile_sites=off")
    if mode == "on":
        return Decision(True, f"compile_sites=on ({device.type})")
    if device.type == "cuda":
        return Decision(True, "compile_sites=auto on a CUDA device")
    return Decision(False, f"compile_sites=auto on {device.type}: the sites keep the fused CPU kernel or eager ops")


def set_compiled(modules: Iterable[nn.Module], on: bool) -> int:
    """Set ``compiled`` on every perturbation site in or under ``modules`` (models, handles' sites ...); returns
    how many sites there were. A site is a module with a ``compiled`` switch (``PerturbSite``: looked up by that
    attribute, since ``perturb`` imports this module and not the other way round)."""
    count = 0
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(getattr(sub, "compiled", None), bool) and id(sub) not in seen:
                seen.add(id(sub))
                sub.compiled = bool(on)
                count += 1
    return count


def apply(mode: str, device: torch.device | str, modules: Iterable[nn.Module], what: str = "run") -> Decision:
    """Decide ``compile_sites`` for ``device``, set the sites under ``modules`` accordingly and log the choice."""
    decision = decide(mode, device)
    sites = set_compiled(modules, decision.on)
    if sites:
        _log.info("workbench %s: %s compiled perturbation sites (%s)", what, "using" if decision.on else "no",
                  decision.reason)
    return decision


def failures() -> dict[tuple, str]:
    """Flag combinations whose compilation failed in this process, and why (they run the eager site)."""
    return dict(_failed)


def reset() -> None:
    """Forget the compiled functions, failures and cached constants (tests; after ``torch._dynamo.reset()``)."""
    _functions.clear()
    _failed.clear()
    _constants.clear()


# ============================================================================================ the function
def _stencil(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The 3x3 cross-correlation (zero padding 1) of every channel of ``h`` with one 3x3 kernel, as nine shifted
    multiply-adds: elementwise code Inductor fuses with its neighbours (a convolution call would stay a library
    kernel of its own)."""
    height, width = h.shape[-2], h.shape[-1]
    padded = F.pad(h, (1, 1, 1, 1))
    taps = kernel.reshape(9)
    out = taps[0] * padded[..., 0:height, 0:width]
    for tap in range(1, 9):
        i, j = divmod(tap, 3)
        out = out + taps[tap] * padded[..., i:i + height, j:j + width]
    return out


def _depthwise(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same 3x3 cross-correlation as one depthwise convolution call (uncompiled, or compiled for the CPU). A
    one-channel map (the channel mean) would take a slow CPU convolution path: compiled, it is a stencil (a small
    map; a batch reshaped into channels does not compile with a dynamic batch size), uncompiled a (1, B, H, W)
    depthwise map, as ``perturb`` does."""
    b, channels, height, width = h.shape
    weight = kernel.reshape(1, 1, 3, 3)
    if channels == 1 and torch.compiler.is_compiling():
        return _stencil(h, kernel)
    if channels == 1:
        batch_as_channels = h.reshape(1, b, height, width)
        return F.conv2d(batch_as_channels, weight.expand(b, 1, 3, 3), padding=1, groups=b).reshape(b, 1, height, width)
    return F.conv2d(h, weight.expand(channels, 1, 3, 3), padding=1, groups=channels)


def _equivariant(h: torch.Tensor, w_identity: torch.Tensor, w_all: torch.Tensor, conv: Callable) -> torch.Tensor:
    """``E(h)_c = w_identity * h_c + w_all * mean_c(h)``."""
    return conv(h, w_identity) + conv(h.mean(dim=1, keepdim=True), w_all)


def site_function(h: torch.Tensor, eps: torch.Tensor, coeff: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, w_identity1: torch.Tensor, w_all1: torch.Tensor,
                  w_identity2: torch.Tensor, w_all2: torch.Tensor, scale_kernels: torch.Tensor,
                  fc_weight: torch.Tensor, ratios: torch.Tensor, momentum: float,
                  clip: Optional[float], training: bool, double_bessel: bool, relu: bool, pool: bool, stats: bool,
                  stencil: bool = True):
    """The site as plain tensor code (what is compiled): returns ``(out, scale, [mean, std] of the multiplier or
    None)``. Same function as ``perturb.perturb``; in training mode ``running_mean``/``running_var`` are updated in
    place. ``coeff`` is the noise coefficient as a 0-d tensor, ``ratios`` the scale's two size inputs ``[C /
    channel_norm, H / spatial_norm]`` as a tensor (floats would be compiled in as constants: one compilation per
    site). ``stencil``: the 3x3 stencils as shifted
    multiply-adds (for Inductor) rather than depthwise convolution calls (for an uncompiled run)."""
    conv = _stencil if stencil else _depthwise
    x = h if h.dtype in (torch.float32, torch.float64) else h.float()  # bf16 / fp16 maps: computed in float32
    b, c = x.shape[0], x.shape[1]
    mu = _equivariant(torch.relu(_equivariant(x, w_identity1, w_all1, conv)), w_identity2, w_all2, conv)
    if training:
        features = torch.stack([torch.relu(conv(x, scale_kernels[j])).mean(dim=(2, 3))
                                for j in range(_NUM_SCALE_KERNELS)], dim=2)  # (B, C, 4)
        mean, var = features.mean(dim=0), features.var(dim=0)
        with torch.no_grad():
            correction = b / (b - 1) if double_bessel else 1.0
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * correction, alpha=momentum)
    else:
        mean, var = running_mean, running_var
    w = fc_weight[0]
    k = _NUM_SCALE_KERNELS
    scale = torch.sigmoid(mean @ w[:k] + var @ w[k:2 * k] + (w[2 * k] * ratios[0] + w[2 * k + 1] * ratios[1]))
    multiplier = 1 + coeff * (scale.view(1, c, 1, 1) * F.softplus(mu + eps.to(x.dtype)) - 1)
    out = x * multiplier
    if clip is not None:
        out = out.clamp(max=clip)
    if relu:
        out = torch.relu(out)
    if pool:
        out = F.max_pool2d(out, 2)
    summary = torch.stack([multiplier.mean(), multiplier.std()]).detach() if stats else None
    return out.to(h.dtype), scale, summary


def _own_code(function: Callable, tag: str) -> Callable:
    """A copy of ``function`` with a code object of its own: Dynamo keeps its cache (and its recompilation limit)
    per code object, so every flag combination compiles into a cache of its own."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{tag}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def _compiled_for(key: tuple) -> Callable:
    function = _functions.get(key)
    if function is None:
        tag = "_".join(str(part).replace(".", "").replace(":", "") for part in key)
        function = torch.compile(_own_code(site_function, tag), fullgraph=True)
        _functions[key] = function
    return function


def _device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Floats as a float32 tensor on ``device`` (0-d for one value), cached; made by fill kernels, so no
    host-to-device copy, and legal inside a CUDA graph capture (where the tensor is made afresh, in the graph's
    memory, and never cached: a cached tensor the graph read could later be dropped from the cache)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device.type, device.index, values)
    tensor = None if capturing else _constants.get(key)
    if tensor is None:
        if len(values) == 1:
            tensor = torch.full((), values[0], dtype=torch.float32, device=device)
        else:
            tensor = torch.empty(len(values), dtype=torch.float32, device=device)
            for index, value in enumerate(values):
                tensor[index].fill_(value)
        if not capturing:
            if len(_constants) >= _CONSTANT_CACHE:
                _constants.pop(next(iter(_constants)))
            _constants[key] = tensor
    return tensor


def _channels_last_like(h: torch.Tensor) -> torch.Tensor:
    """``h`` itself when it is channels_last, else an (unfilled) channels_last tensor of its shape: the eager path
    draws the noise in that layout, and :func:`perturb` draws the same numbers."""
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        return h
    return torch.empty_like(h, memory_format=torch.channels_last)


def perturb(h: torch.Tensor, phi, running_mean: torch.Tensor, running_var: torch.Tensor, *, channel_norm: float,
            spatial_norm: float, training: bool, momentum: float, noise_coeff: Union[float, torch.Tensor],
            clip: Optional[float], eps: Optional[torch.Tensor], double_bessel: bool, relu: bool, pool: bool,
            batch_norm: Optional[nn.BatchNorm2d], compile: bool = True, stats: bool = True):
    """The site through :func:`site_function`, compiled (``compile``) or run as it is (eager tensor code, for a
    tensor noise coefficient without compilation); returns ``(out, scale, [mean, std] or None)`` like
    ``perturb.perturb``, or None when this call should take the eager path instead (this site form failed to
    compile earlier, and the coefficient is a float the eager path takes). The call whose compilation fails is
    served by the uncompiled site function."""
    if h.dim() != 4:
        raise WorkbenchError(f"a perturbation site expects a (B, C, H, W) feature map, got shape {tuple(h.shape)}")
    b, c, height, width = h.shape
    if training and b < 2:
        raise WorkbenchError(
            "a perturbation site in training mode needs a batch of at least 2 (it uses the batch variance); "
            "use a larger batch or call model.eval()"
        )
    tensors = phi.function_tensors()
    grad = torch.is_grad_enabled()
    stencil = STENCIL.get(h.device.type, True)
    key = (h.device.type, h.device.index, str(h.dtype).replace("torch.", ""), "train" if training else "eval",
           "relu" if relu else "", "pool" if pool else "", "clip" if clip is not None else "",
           "bessel2" if double_bessel else "", "stats" if stats else "", "grad" if grad else "nograd",
           "phigrad" if grad and any(t.requires_grad for t in tensors) else "", "hgrad" if h.requires_grad else "",
           # the convolution form specialises the channel count (a convolution's groups): one compilation per width
           "stencil" if stencil else f"conv{c}")
    coefficient_is_float = not isinstance(noise_coeff, torch.Tensor)
    if compile and key in _failed:
        if coefficient_is_float:
            return None
        compile = False
    if batch_norm is not None:
        h = apply_batch_norm(batch_norm, h)
    coeff = _device_constant((float(noise_coeff),), h.device) if coefficient_is_float else noise_coeff
    ratios = _device_constant((c / channel_norm, height / spatial_norm), h.device)
    if eps is None:
        eps = standard_normal(_channels_last_like(h))
    arguments = (h, eps, coeff, running_mean, running_var, *tensors, ratios, float(momentum), None if clip is None else float(clip), bool(training), bool(double_bessel),
                 bool(relu), bool(pool), bool(stats))
    if not compile:
        return site_function(*arguments, stencil=False)
    from torch import _dynamo

    function = _compiled_for(key)
    map_dims = (0, 1, 2, 3) if stencil else (0, 2, 3)
    dynamic = [(h, map_dims), (eps, map_dims)] + ([(running_mean, (0,)), (running_var, (0,))] if stencil else [])
    if eps._base is not None and eps._base.dim() == 4:  # the noise drawn in NHWC and permuted: Dynamo guards its base
        dynamic.append((eps._base, (0, 1, 2, 3) if stencil else (0, 1, 2)))
    for tensor, dims in dynamic:
        _dynamo.maybe_mark_dynamic(tensor, dims)
    try:
        return function(*arguments, stencil=stencil)
    except WorkbenchError:
        raise
    except Exception as exc:  # Dynamo / Inductor / a missing compiler or Triton: this flag combination stays eager
        from .artifacts.formatting import _exception_line

        reason = _exception_line(exc)
        _failed[key] = reason
        _functions.pop(key, None)
        _log.warning("workbench: compiling the perturbation site for %s failed (%s); that site form runs eagerly",
                     "/".join(str(part) for part in key if part not in ("", None)), reason)
        return site_function(*arguments, stencil=False)


__all__ = ["Decision", "MODES", "apply", "decide", "failures", "perturb", "reset", "set_compiled", "site_function"]
