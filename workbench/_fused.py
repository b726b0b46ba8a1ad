"""Fast building blocks of the perturbation, each with a hand-written backward.

They compute exactly what the plain-PyTorch formulas in ``perturb.reference_perturb`` compute (tests compare values
and gradients), but with far fewer passes over the feature map, in its own memory layout:

* :class:`ReluMean` - the spatial mean of ``relu(y)``. Autograd's version materialises the broadcast gradient in
  NCHW and then runs the ReLU backward across two layouts, which on the CPU is ~30x slower than the forward.
* :class:`NoiseTail` - ``min(x * (1 + k (s * softplus(mu + eps) - 1)), clip)`` in one forward of ~8 passes and a
  backward of ~9, instead of ~25 autograd nodes. softplus is written as ``max(a, 0) + log(1 + exp(-|a|))``:
  torch's own CPU softplus and log1p are not vectorised and cost ~10x an ``exp``.
* :func:`standard_normal` - the noise draw, split over threads on the CPU (``torch.randn`` fills serially; it is
  the largest single cost of a perturbed step). Each chunk's generator is seeded from the global torch RNG, so
  ``torch.manual_seed`` still makes a run reproducible.

It also holds what the eager path (``perturb``) and the native kernel (``_native``) both use: :func:`site_scale`
(the per-channel scale from the scale features), :func:`batch_norm` and :func:`relu_and_pool`. So dispatch goes one
way: ``perturb`` chooses ``_native`` or the eager ops, and ``_native`` depends on this module, never on ``perturb``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

_PARALLEL_MIN_NUMEL = 1 << 18


def batch_norm(module: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``module``'s own BatchNorm2d forward, also while attach has it pass its input through (the site in front of
    which it stands then applies it: fused, or by calling this)."""
    return torch.nn.BatchNorm2d.forward(module, x)


def relu_and_pool(x: torch.Tensor, relu: bool, pool: bool) -> torch.Tensor:
    """The layers a site can stand in for, in their order: the ReLU, then the 2x2 max-pool of stride 2."""
    x = torch.relu(x) if relu else x
    return torch.nn.functional.max_pool2d(x, 2) if pool else x


def site_scale(phi, features: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor,
               channel_ratio: float, size_ratio: float, momentum: float, double_bessel: bool) -> torch.Tensor:
    """The per-channel scale s (C,) of phi (a ``MetaPerturb``) at a site: from the batch statistics of ``features``
    (B, C, 4), updating the running ones in place (training), or from the running statistics when ``features`` is
    None (evaluation). Shared by the eager path and the native kernel's two sweeps."""
    if features is None:
        mean, var = running_mean, running_var
    else:
        b = features.shape[0]
        mean, var = features.mean(dim=0), features.var(dim=0)
        with torch.no_grad():
            correction = b / (b - 1) if double_bessel else 1.0
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * correction, alpha=momentum)
    return phi.channel_scale(mean, var, channel_ratio, size_ratio)

_NOISE_CHUNKS = 8
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


class ReluMean(torch.autograd.Function):
    """``relu(y).mean((2, 3))`` for y of shape (B, C, H, W)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y)
        return torch.relu(y).mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        per_plane = (grad / (y.shape[2] * y.shape[3]))[:, :, None, None].expand_as(y)
        return torch.ops.aten.threshold_backward(per_plane, y, 0.0)


class NoiseTail(torch.autograd.Function):
    """``out = min(x * m, clip)`` with ``m = 1 + k * (s * z - 1)`` and ``z = softplus(mu + eps)``.

    Returns ``(out, m)``; ``m`` (the multiplier) is returned for statistics and carries no gradient.
    """

    @staticmethod
    def forward(ctx, x, mu, scale, eps, noise_coeff: float, clip: Optional[float]):
        a = mu + eps
        z = a.abs().neg_().exp_().add_(1).log_().add_(a.clamp_(min=0))  # softplus(mu + eps), a reused as relu(a)
        s = scale.view(1, -1, 1, 1)
        m = z * s
        if noise_coeff != 1.0:
            m.sub_(1).mul_(noise_coeff).add_(1)
        out = x * m
        kept = None
        if clip is not None:
            kept = out <= clip  # a mask, not `out`: the next layer's in-place ReLU may overwrite `out`
            out.clamp_(max=clip)
        ctx.noise_coeff = noise_coeff
        ctx.save_for_backward(x, z, m, scale, kept)
        ctx.mark_non_differentiable(m)
        return out, m

    @staticmethod
    def backward(ctx, grad_out, _grad_m):
        x, z, m, scale, kept = ctx.saved_tensors
        if kept is not None:
            grad_out = torch.where(kept, grad_out, 0.0)
        grad_x = grad_out * m if ctx.needs_input_grad[0] else None
        grad_mu = grad_scale = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_m = grad_out * x
            if ctx.noise_coeff != 1.0:
                grad_m.mul_(ctx.noise_coeff)
            if ctx.needs_input_grad[2]:
                grad_scale = (grad_m * z).sum(dim=(0, 2, 3))
            if ctx.needs_input_grad[1]:
                # d softplus(a) / da = sigmoid(a) = 1 - exp(-softplus(a))
                sigmoid = z.neg().exp_().neg_().add_(1)
                grad_mu = grad_m.mul_(scale.view(1, -1, 1, 1)).mul_(sigmoid)
        return grad_x, grad_mu, grad_scale, None, None, None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="workbench-noise"), workers
    return _pool


def standard_normal(like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise shaped and laid out like ``like`` (NCHW or channels_last), drawn from the global RNG."""
    b, c, height, width = like.shape
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    shape = (b, height, width, c) if channels_last else (b, c, height, width)
    if like.device.type != "cpu" or like.numel() < _PARALLEL_MIN_NUMEL:
        out = torch.randn(shape, dtype=like.dtype, device=like.device)
    else:
        # A fixed number of chunks, each from its own seeded generator: the draw does not depend on the thread count.
        out = torch.empty(shape, dtype=like.dtype)
        chunks = out.view(-1).chunk(_NOISE_CHUNKS)
        seeds = torch.randint(0, 2**62, (len(chunks),)).tolist()

        def fill(index: int) -> None:
            chunks[index].normal_(generator=torch.Generator().manual_seed(seeds[index]))

        workers = min(torch.get_num_threads(), len(chunks))
        if workers < 2:
            for index in range(len(chunks)):
                fill(index)
        else:
            list(_executor(workers).map(fill, range(len(chunks))))
    return out.permute(0, 3, 1, 2) if channels_last else out
