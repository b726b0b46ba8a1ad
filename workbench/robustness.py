"""Adversarial robustness: PGD under L-inf, L2 and L1 with Expectation over Transformation (EoT).

The attack works in pixel space, ``[0, 1]``: wrap the classifier with :class:`PixelModel`, which applies the
normalisation the network was trained with, so the epsilon ball and the valid range are those of images.

Protocol of the paper (supplement, paper-notes 3.5): 200 steps, step size ``0.025 * eps`` for L-inf and L2 and
``0.033 * eps`` for L1, and the gradient averaged over 10 stochastic forward passes (EoT) for stochastic models.
That step size is meant for 200 steps (a total travel of 5 eps, 6.6 eps for L1); with fewer steps it could never
reach the edge of the ball (10 steps: 0.25 eps). So the default step is ``max(fraction * eps, MIN_TRAVEL * eps /
steps)`` with ``MIN_TRAVEL = 2.5``, the common ``2.5 * eps / steps`` rule (e.g. Madry lab's ``robustness``
library): the paper's value at 200 steps (and whenever it travels farther), a total travel of 2.5 eps below.
What the paper does not state (NOT FOUND), and is our choice here:

- a random start for short attacks only: ``random_start`` defaults to on below the paper's 200 steps (where a
  single start from the clean image is weakest) and off at 200 steps or more, so the paper's protocol is
  unchanged. The start is drawn uniformly in the eps ball: uniform in the cube for L-inf (Madry et al., 2018); for
  L2 and L1 a direction from the cone measure of the unit sphere (normalised Gaussian, normalised Laplace) times a
  radius ``eps * U ** (1 / d)`` (the uniform distribution in a norm ball; ART's ``random_sphere`` samples the same
  law for L2), then clipped to the valid range. It is drawn on the CPU from ``generator`` (or the global stream),
  so a seed gives the same start on every device; one restart;
- untargeted, cross-entropy loss on the true label;
- the models are attacked in eval mode (BN and perturbation running statistics), the same mode they are
  evaluated in, with the noise still drawn, so EoT averages over the noise;
- each step is ``x + step * d``, clipped to the valid range, then the perturbation is projected onto the eps ball.
  ``d`` is ``sign(g)`` (L-inf), ``g / ||g||_2`` (L2), and for L1 the sparse descent direction of Tramèr & Boneh
  (2019, "Adversarial Training and Robustness for Multiple Perturbations", SLIDE): ``sign(g)`` on the
  coordinates whose ``|g|`` is at or above the ``l1_sparsity`` quantile (99% by default, i.e. the top 1%),
  zero elsewhere, normalised to unit L1 norm; coordinates already at the edge of the valid range in the ascent
  direction are left out first, as they suggest. The L1 projection is the exact Euclidean projection onto the
  L1 ball (Duchi et al., 2008), the L2 one a rescaling, the L-inf one a clamp. Clipping first and projecting
  second keeps both constraints, because each projection moves every coordinate towards the clean image.
  This is the order the Adversarial Robustness Toolbox uses, and without random start the L-inf/L2 attacks agree
  with its ``ProjectedGradientDescent`` at equal settings (tests/test_robustness.py).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import WorkbenchError
from .evaluate import DEFAULT_MAX_ROWS, check_samples, eval_mode, mc_predict

NORMS = ("linf", "l2", "l1")
# Step size as a fraction of eps (paper supplement): 0.025 for L-inf and L2, 0.033 for L1.
STEP_FRACTION = {"linf": 0.025, "l2": 0.025, "l1": 0.033}
PAPER_STEPS = 200
# Least total travel of the default step size, in units of eps: a step of at least MIN_TRAVEL * eps / steps, so an
# attack of any number of steps can cross the ball (the common 2.5 * eps / steps rule).
MIN_TRAVEL = 2.5
PAPER_EOT_SAMPLES = 10


class PixelModel(nn.Module):
    """``model(normalise(x))`` for images ``x`` in [0, 1]: lets an attack work in pixel space."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def check_norm(norm: str) -> str:
    key = str(norm).lower().replace("-", "").replace("_", "")
    key = {"inf": "linf", "linfinity": "linf", "2": "l2", "1": "l1"}.get(key, key)
    if key not in NORMS:
        raise WorkbenchError(f"unknown attack norm {norm!r}; use one of {', '.join(NORMS)}")
    return key


def default_step_size(norm: str, eps: float, steps: int = PAPER_STEPS) -> float:
    """``max(fraction * eps, MIN_TRAVEL * eps / steps)``: the paper's step (``fraction`` 0.025 for L-inf and L2,
    0.033 for L1) at its 200 steps, scaled up for fewer steps so the attack can still reach eps."""
    fraction = STEP_FRACTION[check_norm(norm)]
    if steps <= 0:
        return fraction * eps
    return max(fraction * eps, MIN_TRAVEL * eps / steps)


def uniform_in_ball(shape: Sequence[int], norm: str, eps: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Perturbations drawn uniformly in the ``norm`` ball of radius ``eps``, one per row, on the CPU (float32).

    L-inf: uniform in the cube. L2 and L1: ``eps * U ** (1 / d) * v / ||v||`` with ``v`` Gaussian (L2) or Laplace
    (L1), whose normalised direction follows the cone measure of the sphere; with that radius the point is uniform in
    the ball (Barthe, Guedon, Mendelson & Naor, 2005).
    """
    norm = check_norm(norm)
    shape = tuple(int(s) for s in shape)
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    n, d = shape[0], math.prod(shape[1:])
    if norm == "l2":
        v = torch.randn(n, d, generator=generator)
        p = 2.0
    else:  # Laplace by inversion: -sign(u) log(1 - 2|u|), u uniform in [-1/2, 1/2)
        u = torch.rand(n, d, generator=generator) - 0.5
        v = -u.sign() * torch.log((1 - 2 * u.abs()).clamp_min(1e-12))
        p = 1.0
    radius = eps * torch.rand(n, 1, generator=generator) ** (1.0 / d)
    v = v / v.norm(p=p, dim=1, keepdim=True).clamp_min(1e-12) * radius
    return v.view(shape)


def _flat_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    return v.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (v.dim() - 1)))


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each row of ``delta`` onto the L1 ball of radius ``eps`` (Duchi et al., 2008)."""
    flat = delta.flatten(1)
    abs_v = flat.abs()
    inside = abs_v.sum(1) <= eps
    if bool(inside.all()):
        return delta
    mu, _ = abs_v.sort(dim=1, descending=True)
    cssv = mu.cumsum(1) - eps
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu - cssv / j > 0
    rho = cond.to(torch.int64).cumsum(1).argmax(1)  # last index where cond holds (cond is a prefix)
    theta = (cssv.gather(1, rho.view(-1, 1)) / (rho.view(-1, 1) + 1).to(flat.dtype)).clamp_min(0)
    projected = flat.sign() * (abs_v - theta).clamp_min(0)
    out = torch.where(inside.view(-1, 1), flat, projected)
    return out.view_as(delta)


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project each example's perturbation onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        n = _flat_norm(delta, 2)
        return delta * torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    return project_l1_ball(delta, eps)


def _direction(grad: torch.Tensor, x_adv: torch.Tensor, norm: str, l1_sparsity: float, bounds) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _flat_norm(grad, 2).clamp_min(1e-12)
    lo, hi = bounds
    # Coordinates saturated in the ascent direction cannot move: leave them out before choosing the top ones.
    g = grad.masked_fill(((x_adv <= lo) & (grad < 0)) | ((x_adv >= hi) & (grad > 0)), 0.0)
    flat = g.flatten(1).abs()
    k = max(1, int(round((1.0 - l1_sparsity) * flat.shape[1])))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    mask = (flat >= threshold) & (flat > 0)
    e = g.flatten(1).sign() * mask
    e = e / e.abs().sum(1, keepdim=True).clamp_min(1.0)
    return e.view_as(grad)


def eot_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int = 1,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. ``x`` averaged over ``samples`` stochastic passes (batched by tiling ``x``)."""
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    b = x.shape[0]
    per_chunk = max(1, min(samples, max_rows // max(b, 1)))
    grad = torch.zeros_like(x)
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        xr = x.detach().clone().requires_grad_(True)
        tiled = xr.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else xr
        loss = loss_fn(model(tiled), y.repeat(k) if k > 1 else y)
        grad += torch.autograd.grad(loss, xr)[0]
        done += k
    return grad / samples


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float,
    steps: int = PAPER_STEPS,
    step_size: float | None = None,
    eot_samples: int = 1,
    random_start: bool | None = None,
    l1_sparsity: float = 0.99,
    bounds: tuple[float, float] = (0.0, 1.0),
    max_rows: int = DEFAULT_MAX_ROWS,
    generator: torch.Generator | None = None,
    random_init: bool | None = None,
) -> torch.Tensor:
    """Untargeted PGD with EoT on images ``x`` in ``bounds``; returns the adversarial images.

    ``model`` maps pixel-space images to logits (see :class:`PixelModel`) and is run in eval mode. ``step_size``
    defaults to :func:`default_step_size` (the paper's fraction of ``eps``, larger below 200 steps).
    ``random_start`` (default: on below the paper's 200 steps, off from 200 on) starts from a point drawn uniformly
    in the ball with ``generator`` (:func:`uniform_in_ball`); ``random_init`` is its former name. ``eot_samples``
    gradients are averaged per step (use 1 for a deterministic model). The result satisfies
    ``||x_adv - x||_norm <= eps`` and lies in ``bounds``.
    """
    norm = check_norm(norm)
    check_samples(eot_samples)
    if not eps >= 0 or not math.isfinite(eps):
        raise WorkbenchError(f"attack radius eps must be a finite number >= 0, got {eps!r}")
    if steps < 0:
        raise WorkbenchError(f"attack steps must be >= 0, got {steps}")
    if not 0.0 <= l1_sparsity < 1.0:
        raise WorkbenchError(f"l1_sparsity must be in [0, 1), got {l1_sparsity}")
    lo, hi = bounds
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    if random_start is None:
        random_start = random_init if random_init is not None else steps < PAPER_STEPS
    step = default_step_size(norm, eps, steps) if step_size is None else float(step_size)
    x_adv = x.clone()
    with eval_mode(model):
        if random_start:
            delta = uniform_in_ball(x.shape, norm, eps, generator).to(x)
            x_adv = x + project((x + delta).clamp(lo, hi) - x, norm, eps)
        for _ in range(steps):
            grad = eot_gradient(model, x_adv, y, eot_samples, max_rows=max_rows)
            d = _direction(grad, x_adv, norm, l1_sparsity, bounds)
            candidate = (x_adv + step * d).clamp(lo, hi)
            x_adv = (x + project(candidate - x, norm, eps)).detach()
    return x_adv


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ``norm`` of a perturbation batch."""
    norm = check_norm(norm)
    p = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}[norm]
    return delta.flatten(1).norm(p=p, dim=1)


def robustness_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norms: Sequence[str] = NORMS,
    epsilons: dict[str, Sequence[float]] | Sequence[float],
    steps: int = PAPER_STEPS,
    eot_samples: int = 1,
    mc_samples: int = 1,
    batch_size: int = 100,
    l1_sparsity: float = 0.99,
    max_rows: int = DEFAULT_MAX_ROWS,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    progress: bool = False,
    random_start: bool | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Accuracy under PGD/EoT for each norm and radius.

    ``model`` works on pixel-space images (see :class:`PixelModel`), ``x`` is float in [0, 1] or uint8 (divided by
    255). ``epsilons`` is either one list for every norm or a dict norm -> list (radii in [0, 1] pixel units).
    Adversarial accuracy is measured with ``mc_samples``-sample MC prediction. Returns
    ``{norm: {"eps": [...], "accuracy": [...]}}``. The global random stream is forked (and seeded with ``seed``);
    the random starts (``random_start``, default: on below 200 steps, see :func:`pgd`) come from a CPU generator of
    their own, seeded with ``seed`` afresh for each norm and radius, so they do not depend on the model's noise draws
    nor on the other radii.
    """
    device = torch.device(device)
    norms = [check_norm(n) for n in norms]
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    eps_of = {n: list(epsilons[n] if isinstance(epsilons, dict) else epsilons) for n in norms}
    jobs = [(n, e) for n in norms for e in eps_of[n]]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * math.ceil(len(x) / batch_size), desc="PGD", leave=False)
    out = {n: {"eps": [float(e) for e in eps_of[n]], "accuracy": []} for n in norms}
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for norm, eps in jobs:
            # every radius starts from the same draw, so its result does not depend on the other radii listed
            starts = torch.Generator().manual_seed(seed) if seed is not None else None
            correct = 0
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = torch.as_tensor(y[start : start + batch_size]).to(device).long()
                adv = pgd(model, xb, yb, norm=norm, eps=float(eps), steps=steps, eot_samples=eot_samples,
                          l1_sparsity=l1_sparsity, max_rows=max_rows, random_start=random_start, generator=starts)
                probs = mc_predict(model, adv, mc_samples, max_rows=max_rows)
                correct += int((probs.argmax(1) == yb).sum())
                if bar is not None:
                    bar.update(1)
            out[norm]["accuracy"].append(correct / len(x))
    if bar is not None:
        bar.close()
    return out
