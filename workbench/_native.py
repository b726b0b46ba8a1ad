"""Optional fused C++ CPU kernel for the perturbation site (the math of ``perturb.perturb``, in two sweeps).

The eager fast path runs six depthwise convolutions and ~30 elementwise passes per site, each allocating a feature
map; here the site is two sweeps over the channels_last (NHWC) map, each 3x3 stencil vectorised over W*C:

* sweep 1 reads h and writes ``r1 = relu(E1(h))`` and its channel mean, and accumulates the scale features
  ``f[b, c, j]`` (spatial means of ``relu(K_j * h)``, never stored) plus one mask byte per element for the backward;
* the per-channel scale (batch statistics of f, running-stat update, the linear map) stays in PyTorch: it works on
  (B, C, 4) tensors, so it costs microseconds, and autograd gives phi's ``scale_fc`` gradient for free;
* sweep 2 computes ``mu = E2(r1)``, draws eps in-kernel when none is given (counter-based SplitMix64 keyed by a
  seed taken from the global torch RNG, Box-Muller; so ``torch.manual_seed`` reproduces a run for any thread count),
  and writes
  ``out = min(h * (1 + k (s softplus(mu + eps) - 1)), clip)``.

The stencil-heavy rows have two forms: hand-written AVX-512 (each 16-channel block one register; the five stencils
of sweep 1 share their tap loads; the scale path's backward reads the mask bytes instead of expanded maps) and
compiler-vectorised C++ for any CPU. :func:`isa` tells which is in use (AVX-512 where the CPU has it),
:func:`set_isa` switches; both are tested against each other.

With a frozen phi (transfer, evaluation) on an AVX-512 CPU the site is fused further (``fuse_frozen_sites``): a
pre-pass over h gives the channel mean and the scale features, then E1, E2 and the noise tail run in one sweep with
r1 held in a three-row ring, and the backward is one sweep with g_mu and g_E1 in rings plus a pass that adds the
scale path. r1 and the multiplier map are never written (the multiplier's mean and std come back instead): about
40% less memory traffic, which is what bounds these sweeps on maps of a few MB and more. A site can also apply the
layer's ReLU and then its 2x2 max-pool (``relu``, ``pool``; attach does where the model has them): pooled, only
each window's winner gets a gradient, so the forward keeps the winners' multiplier and noise-path derivatives at
pooled size and the backward is a single sweep, the scale path included, with no transcendental functions. The site
of a training pass also takes the BatchNorm in front of it (``batch_norm``; attach passes it for conv -> BN -> ReLU):
one pass over the BatchNorm's input gives its batch statistics, the sweeps make h's rows from that input as they read
them (h is never written), and the backward's last sweep takes BatchNorm's two sums from each gradient row as it
writes it, then BatchNorm's backward runs in place. Against ATen's BatchNorm beside the site, the normalising
pass goes (a read and a write of the map) and the backward's sums read no map of their own
(``fuse_batch_norm = False`` leaves the BatchNorm to ATen).

Large maps the kernel returns come from a pool of recycled buffers (a fresh 25 MB map cost as much in page faults
and page zeroing as the sweep that fills it); :func:`release_pool` frees what the pool holds.

Each sweep is a ``torch.autograd.Function`` whose backward is the transposed stencils in the same fused style,
including the gradients of phi's kernels when phi requires grad; the fused site is one C++ autograd node
(``FusedSiteFunction``: no Python between its kernels, either way), differentiable once. The kernel builds on first
use with ``torch.utils.cpp_extension.load`` from the sources in ``_native_src/`` (``common.h`` lists the parts;
cached in torch's extension directory under a hash of the sources and the CPU); when it cannot be built, one warning
is logged, :func:`build_error` says why and :func:`available` returns False, so callers keep the eager path.
``WORKBENCH_NATIVE=0`` disables it.

Dispatch goes one way, from ``perturb.perturb``, which holds the eager path (and ``fused=False``); this module
depends only on the lower-level ``_fused`` (the pieces both paths share, ``site_scale`` among them)::

    if fused and _native.available(h, phi):
        return _native.perturb(h, phi, running_mean, running_var, ...same keyword arguments but fused...)
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._fused import batch_norm as apply_batch_norm, relu_and_pool, site_scale
from .errors import WorkbenchError

_log = logging.getLogger(__name__)
# The kernel's sources: translation units (*.cpp) and the headers they share (*.h); see common.h for the parts.
_SOURCE_DIR = Path(__file__).with_name("_native_src")
_module = None
_build_failed = False
_build_error: Optional[str] = None  # why the build failed (the compiler's output included), once it has
# Frozen phi on an AVX-512 CPU (transfer, evaluation): the fused site (two passes over h each way, ~40% less memory
# traffic). False keeps the two sweeps everywhere (tests compare the two).
fuse_frozen_sites = True
# A training BatchNorm in front of a fused site (attach wires it so) is folded into the site's passes. False
# applies it first with its own forward (the benchmark compares the two; tests too).
fuse_batch_norm = True
_NONE = torch.empty(0)  # the kernels' "no tensor" argument (never written)


def _sources() -> list[Path]:
    """The kernel's translation units, in a fixed order."""
    return sorted(_SOURCE_DIR.glob("*.cpp"))


def _build_tag() -> str:
    """Short hash of the CPU's feature flags and of every source and header: the extension's name, so that
    -march=native objects are never reused on another CPU and a build of other sources is never loaded (torch's own
    check rebuilds on a changed .cpp only, not on a changed header)."""
    digest = hashlib.sha1(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as handle:
            digest.update(next((line for line in handle if line.startswith(("flags", "Features"))), "").encode())
    except OSError:
        pass
    for path in _sources() + sorted(_SOURCE_DIR.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


def enabled() -> bool:
    """False when the environment variable ``WORKBENCH_NATIVE`` is ``0`` (or ``false``/``off``)."""
    value = os.environ.get("WORKBENCH_NATIVE")
    return value is None or value.strip().lower() not in {"0", "false", "off", "no"}


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` found on PATH; the pip ``ninja`` package (a dependency) installs it into the
    environment's scripts folder, which is not on PATH when the interpreter is run without activating it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(verbose: bool = False):
    """Build (first time) and import the extension; returns the module or None when it cannot be built
    (:func:`build_error` then says why)."""
    global _module, _build_failed, _build_error
    if _module is not None or _build_failed:
        return _module
    try:
        _put_ninja_on_path()
        # Importing cpp_extension on a machine without CUDA logs "No CUDA runtime is found": noise for a CPU build.
        extension_log = logging.getLogger("torch.utils.cpp_extension")
        level = extension_log.level
        extension_log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load as load_extension
        finally:
            extension_log.setLevel(level)

        _module = load_extension(
            name=f"workbench_perturb_native_{_build_tag()}",
            sources=[str(path) for path in _sources()],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=verbose,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported flags...: keep the eager path
        _build_failed = True
        _build_error = f"{type(exc).__name__}: {exc}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _log.warning("workbench: native perturbation kernel unavailable (%s); using the eager path", first[:200])
    return _module


def build_error() -> Optional[str]:
    """Why the kernel could not be built (the exception, with the compiler's output when it ran), or None."""
    return _build_error


def available(h: torch.Tensor, phi) -> bool:
    """Whether :func:`perturb` can serve this call: enabled, float32 CPU tensors, no double backward, and built."""
    # every site asks on every call: attribute tests only (no torch.device objects)
    if not (h.is_cpu and h.dtype is torch.float32 and h.dim() == 4) or not enabled():
        return False
    if not all(t.is_cpu and t.dtype is torch.float32 for t in phi.function_tensors()):
        return False
    return load() is not None


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The NHWC-contiguous buffer of a (B, C, H, W) tensor (no copy when it is channels_last already)."""
    return t.permute(0, 2, 3, 1).contiguous()


class _Handoff:
    """Carries sweep 2's direct gradient term (g * m, for h) to sweep 1's backward, which adds its own terms into
    it in-kernel: h then gets one gradient instead of two that autograd would add as a further pass."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None


class _Sweep1(torch.autograd.Function):
    """(h, K_id1, K_all1, K_scale) -> (r1 = relu(E1(h)) [NHWC], mean_c r1 [B,H,W], f [B,C,4] or empty)."""

    @staticmethod
    def forward(ctx, h, kid, kall, kscale, training: bool, handoff: _Handoff):
        x = _nhwc(h.detach())
        r1, mr, f, mh, mask = _module.sweep1_forward(x, (kid.detach(), kall.detach()), kscale.detach(), training)
        ctx.handoff = handoff
        ctx.save_for_backward(x, mh, mask, kid, kall, kscale)
        ctx.mark_non_differentiable(*(() if training else (f,)))
        return r1, mr, f

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r1, g_mr, g_f):
        x, mh, mask, kid, kall, kscale = ctx.saved_tensors
        need_x, need_kid, need_kall, need_ks = ctx.needs_input_grad[:4]
        handed, ctx.handoff.grad = ctx.handoff.grad, None
        if not (need_x or need_kid or need_kall or need_ks):
            return None, None, None, None, None, None
        g_r1 = torch.zeros_like(x) if g_r1 is None else g_r1.contiguous()
        g_mr = torch.zeros_like(mh) if g_mr is None else g_mr.contiguous()
        g_f = torch.empty(0) if g_f is None or g_f.numel() == 0 else g_f.contiguous()
        gx, gkid, gkall, gks = _module.sweep1_backward(
            (x, mh, mask), (g_r1, g_mr, g_f), (kid.detach(), kall.detach()), kscale.detach(),
            (bool(need_x), bool(need_kid or need_kall), bool(need_ks and g_f.numel() > 0)),
            handed if handed is not None and need_x else torch.empty(0))
        return (gx if need_x else None, gkid if need_kid else None, gkall if need_kall else None,
                gks if need_ks and g_f.numel() > 0 else None, None, None)


class _Sweep2(torch.autograd.Function):
    """(h, r1, mr, scale, K_id2, K_all2) -> (out, multiplier), both (B, C, H, W) views of NHWC buffers."""

    @staticmethod
    def forward(ctx, h, r1, mr, scale, kid, kall, eps: Optional[torch.Tensor], seed: int, noise_coeff: float,
                clip: Optional[float], handoff: _Handoff):
        x = _nhwc(h.detach())
        e = torch.empty(0) if eps is None else _nhwc(eps.detach().to(torch.float32))
        out, mult, a = _module.sweep2_forward(
            x, r1.detach(), mr.detach(), scale.detach(), (kid.detach(), kall.detach()),
            (e, int(seed), float(noise_coeff), None if clip is None else float(clip)))
        ctx.noise_coeff, ctx.clip, ctx.handoff = float(noise_coeff), clip, handoff
        ctx.save_for_backward(x, r1, mr, a, mult, scale, kid, kall)
        ctx.mark_non_differentiable(mult)
        return out, mult  # (B, C, H, W) channels_last tensors of their own, not views

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, _g_mult):
        x, r1, mr, a, mult, scale, kid, kall = ctx.saved_tensors
        mult = _nhwc(mult)  # no copy: the same NHWC memory the kernel wrote
        need_x, need_r1, need_mr, need_scale, need_kid, need_kall = ctx.needs_input_grad[:6]
        if g_out is None or not any(ctx.needs_input_grad[:6]):
            return (None,) * 11
        clip = ctx.clip
        gx, gr1, gmr, gscale, gkid, gkall = _module.sweep2_backward(
            (x, r1.detach(), mr.detach(), a, mult, scale.detach()), _nhwc(g_out), (kid.detach(), kall.detach()),
            (ctx.noise_coeff, None if clip is None else float(clip)),
            (bool(need_x), bool(need_r1 or need_mr), bool(need_scale), bool(need_kid or need_kall)))
        grad_h = gx if need_x else None
        if need_x and need_r1:
            # r1 = relu(E1(h)) needs grad, so sweep 1's backward runs next and adds its terms into this map
            ctx.handoff.grad, grad_h = gx, None
        return (grad_h, gr1 if need_r1 else None, gmr if need_mr else None, gscale if need_scale else None,
                gkid if need_kid else None, gkall if need_kall else None, None, None, None, None, None)


def _batch_norm_arguments(bn) -> tuple:
    """The fused site's arguments for ``bn`` in training mode: its weight and bias (inputs of the autograd node) and
    (running_mean, running_var, eps, factor), counting the batch as BatchNorm2d.forward does
    (``num_batches_tracked``, and with ``momentum=None`` the cumulative average's factor)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    tracked = bn.track_running_stats and bn.running_mean is not None
    return (_NONE if bn.weight is None else bn.weight, _NONE if bn.bias is None else bn.bias,
            (bn.running_mean if tracked else _NONE, bn.running_var if tracked else _NONE, float(bn.eps), float(factor)))


def _fusable_batch_norm(bn, h, training: bool) -> bool:
    """Whether the fused site can take ``bn`` in: batch statistics (training, both) and float32 tensors."""
    if not (fuse_batch_norm and training and bn.training):
        return False
    if bn.running_mean is None and bn.track_running_stats:
        return False
    if bn.num_features != h.shape[1]:
        return False
    tensors = (bn.weight, bn.bias, bn.running_mean if bn.track_running_stats else None,
               bn.running_var if bn.track_running_stats else None)
    return all(t is None or (t.is_cpu and t.dtype is torch.float32) for t in tensors)


def _fused_site(h, phi, running_mean, running_var, *, channel_norm, spatial_norm, training, momentum, noise_coeff,
                clip, eps, double_bessel, relu, pool, batch_norm=None):
    if running_mean.dtype != torch.float32 or running_var.dtype != torch.float32:
        raise WorkbenchError(f"the fused site needs float32 running statistics, got {running_mean.dtype}; "
                             "keep the perturbation sites in float32 (or set _native.fuse_frozen_sites = False)")
    b, c, height, width = h.shape
    seed = draw_seed() if eps is None else 0
    # keep: a backward will follow, so the forward writes what it reads (the scale bits when training, the E1 ReLU
    # bits, and a or with pool the winners' maps); evaluation passes skip them. A fused BatchNorm's weight or bias
    # may want a gradient when h does not (a frozen layer before it)
    keep = torch.is_grad_enabled() and (h.requires_grad or (batch_norm is not None and any(
        t is not None and t.requires_grad for t in (batch_norm.weight, batch_norm.bias))))
    bn_weight, bn_bias, bn_options = (_NONE, _NONE, None) if batch_norm is None else _batch_norm_arguments(batch_norm)
    # one C++ autograd node (FusedSiteFunction, _native_src/autograd.cpp): differentiable once. Each tuple is one of
    # the kernel's parameter structs (see fused_site_py in _native_src/bindings.cpp)
    out, scale, multiplier_stats = _module.fused_site(
        h, bn_weight, bn_bias, phi.function_tensors(), (running_mean, running_var),
        (_NONE if eps is None else eps, seed, float(noise_coeff), None if clip is None else float(clip)),
        (bool(training), keep, bool(relu), bool(pool)),
        (c / channel_norm, height / spatial_norm, float(momentum), bool(double_bessel)), bn_options)
    return out, scale, multiplier_stats


def pooled_bytes() -> int:
    """Bytes of freed kernel maps kept for reuse (the kernel recycles its large outputs; at most 1 GiB is kept)."""
    return 0 if _module is None else int(_module.pool_held())


def release_pool() -> int:
    """Free the recycled kernel maps (for example after training, before a memory-hungry stage); returns the bytes
    freed. Maps still in use are unaffected."""
    return 0 if _module is None else int(_module.pool_release())


def _built():
    """The extension module, built on first use; a one-line error when it cannot be built."""
    if load() is None:
        raise WorkbenchError("the native perturbation kernel is not built; check the compiler or set WORKBENCH_NATIVE=0")
    return _module


def isa() -> str:
    """The row kernels the sweeps use: ``"avx512"`` (hand-vectorised, chosen where the CPU has AVX-512 F/BW/VL/DQ)
    or ``"generic"`` (compiler-vectorised C++, any CPU)."""
    return str(_built().isa())


def set_isa(name: str) -> None:
    """Choose the row kernels (``"avx512"`` or ``"generic"``), e.g. to compare them; both compute the same maths."""
    _built()
    if name not in ("avx512", "generic"):
        raise WorkbenchError(f"unknown kernel ISA {name!r}; choose 'avx512' or 'generic'")
    if name == "avx512" and not _module.cpu_has_avx512():
        raise WorkbenchError("this CPU lacks AVX-512 (F, BW, VL and DQ are needed); use set_isa('generic')")
    _module.set_isa(name)


def draw_seed() -> int:
    """A 63-bit seed from the global torch RNG (so ``torch.manual_seed`` fixes the in-kernel noise)."""
    return int(_built().draw_seed())


def standard_normal(like: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
    """The noise the kernel draws for a map shaped like ``like`` (B, C, H, W), as a channels_last tensor."""
    _built()
    b, c, height, width = like.shape
    values = _module.draw(like.numel(), draw_seed() if seed is None else int(seed))
    return values.view(b, height, width, c).permute(0, 3, 1, 2)


def perturb(h: torch.Tensor, phi, running_mean: torch.Tensor, running_var: torch.Tensor, *, channel_norm: float,
            spatial_norm: float, training: bool, momentum: float = 0.1, noise_coeff: float = 1.0,
            clip: Optional[float] = None, eps: Optional[torch.Tensor] = None, double_bessel: bool = True,
            fused: bool = True, relu: bool = False, pool: bool = False, batch_norm=None):
    """Same contract as :func:`workbench.perturb.perturb` (which chooses this path; this module never calls back
    into it): returns ``(out, scale, multiplier)``; ``relu`` applies
    the layer's ReLU to ``out`` and ``pool`` then its 2x2 max-pool (in-kernel on the fused site, saving those
    layers' own passes). With ``batch_norm`` (a BatchNorm2d), ``h`` is its input: the fused site of a training pass
    folds it into its own passes (its batch statistics in one more pass over h, the normalised map never written);
    elsewhere it is applied first.

    The kernel's backward is hand-written (differentiable once): ``fused=False`` (twice-differentiable plain ops,
    for second-order meta-training) is the eager path's, which ``perturb.perturb`` keeps; here it is an error.

    ``out`` keeps the input's layout (NCHW in, NCHW out; channels_last in, channels_last out); the multiplier is
    a channels_last tensor, except on the fused site (frozen phi, AVX-512, see ``fuse_frozen_sites``), which never
    writes the map and returns its ``[mean, std]`` (a (2,) tensor) instead. With ``eps=None`` the noise is drawn
    in-kernel (not the same numbers as the eager path's ``torch.randn`` draw, but the same distribution).
    """
    if not fused:
        raise WorkbenchError("the native kernel is differentiable once; fused=False (twice-differentiable) is the "
                             "eager path's: call workbench.perturb.perturb")
    if load() is None:
        raise WorkbenchError("the native perturbation kernel is not built; check available() before calling it")
    b, c, height, width = h.shape
    if training and b < 2:
        raise WorkbenchError(
            "a perturbation site in training mode needs a batch of at least 2 (it uses the batch variance); "
            "use a larger batch or call model.eval()"
        )
    channels_last_in = h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    if fuse_frozen_sites and _module.isa() == "avx512" and not any(t.requires_grad for t in phi.function_tensors()):
        pool_here = pool and height >= 2 and width >= 2  # smaller maps: max_pool2d's own error below
        if batch_norm is not None and not _fusable_batch_norm(batch_norm, h, training):
            h, batch_norm = apply_batch_norm(batch_norm, h), None
        out, scale, multiplier_stats = _fused_site(
            h, phi, running_mean, running_var, channel_norm=channel_norm, spatial_norm=spatial_norm,
            training=training, momentum=momentum, noise_coeff=noise_coeff, clip=clip, eps=eps,
            double_bessel=double_bessel, relu=relu, pool=pool_here, batch_norm=batch_norm)
        out = relu_and_pool(out, False, pool and not pool_here)
        return (out if channels_last_in else out.contiguous()), scale, multiplier_stats
    if batch_norm is not None:
        h = apply_batch_norm(batch_norm, h)
    handoff = _Handoff()
    r1, mr, features = _Sweep1.apply(h, phi.noise1.w_identity, phi.noise1.w_all, phi.scale_kernels, bool(training),
                                     handoff)
    scale = site_scale(phi, features if training else None, running_mean, running_var, c / channel_norm,
                       height / spatial_norm, momentum, double_bessel)
    seed = draw_seed() if eps is None else 0
    out, multiplier = _Sweep2.apply(h, r1, mr, scale, phi.noise2.w_identity, phi.noise2.w_all, eps, seed,
                                    float(noise_coeff), None if clip is None else float(clip), handoff)
    out = relu_and_pool(out, relu, pool)
    if not channels_last_in:
        out = out.contiguous()
    return out, scale, multiplier


__all__ = ["available", "build_error", "enabled", "load", "perturb", "standard_normal", "draw_seed", "pooled_bytes",
           "release_pool", "isa", "set_isa"]
