"""The paper's one-step look-ahead meta-gradient (second order), written with ``torch.func.functional_call``.

The original code (and the default of :mod:`workbench.meta_train`) is first order: phi's gradient is taken from the
held-out loss at the already-updated task weights, which are held constant. The look-ahead instead differentiates the
held-out loss *through* one update of the task weights::

    g(theta, phi)   = d/dtheta  L_train(theta, phi)                      (graph kept: create_graph=True)
    theta'(phi)     = theta - lr * g(theta, phi)                          (one plain SGD step, differentiable)
    meta gradient   = d/dphi    L_valid(theta'(phi), phi)                 (direct term + term through theta')

The step that is differentiated is a **plain SGD step with learning rate ``lr``** (the paper's look-ahead), not the
Adam update the task network actually takes: Adam's normalisation by the running second moment would put the
optimiser state into the graph. The task weights are parameters of ``model``; phi is reached through the model's
perturbation sites and its tensors are passed as ``meta_params``. Task weights are held as a plain dict of tensors
so the look-ahead weights can be swapped in with ``functional_call`` without touching the module.

The sites' fast path (``workbench._fused``) has hand-written backward passes, which autograd cannot differentiate
a second time: through them the look-ahead term would be silently wrong. :func:`twice_differentiable` switches the
sites to their plain-autograd form (``PerturbSite.fused = False``) for the duration of a look-ahead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def twice_differentiable(sites: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, every :class:`~workbench.perturb.PerturbSite` in ``sites`` computes with plain autograd
    ops (``fused=False``: the same function, differentiable twice) instead of the fused fast path."""
    before = [site.fused for site in sites]
    try:
        for site in sites:
            site.fused = False
        yield
    finally:
        for site, flag in zip(sites, before):
            site.fused = flag


@dataclass
class LookaheadResult:
    """What one look-ahead evaluation produced (every tensor detached)."""

    meta_grads: tuple[torch.Tensor, ...]  # d L_valid(theta'(phi), phi) / d meta_params, in the order given
    theta_grads: dict[str, torch.Tensor]  # d L_train / d theta at theta (for the task optimiser's own step)
    train_loss: torch.Tensor
    train_logits: torch.Tensor
    valid_loss: torch.Tensor
    valid_logits: torch.Tensor


def sgd_lookahead(params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """``theta' = theta - lr * g`` for every named tensor (differentiable when ``grads`` carry a graph)."""
    return {name: p - lr * g for (name, p), g in zip(params.items(), grads)}


def lookahead_meta_grad(
    model: nn.Module,
    meta_params: Sequence[torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    lr: float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    valid_mode: Optional[Callable[[nn.Module], ContextManager]] = None,
) -> LookaheadResult:
    """Second-order meta-gradient of the held-out loss after one differentiable SGD step of the task weights.

    ``model`` is run in whatever mode it is in for the train pass (its BatchNorm and perturbation-site buffers are
    updated as by any forward); ``valid_mode(model)``, when given, is a context manager that sets the mode of the
    held-out pass (the meta-trainer puts BatchNorm in evaluation mode there). The task weights are the model's
    parameters that require a gradient; ``meta_params`` (phi's tensors) must require a gradient too.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    train_logits = model(x_train)
    train_loss = loss_fn(train_logits, y_train)
    grads = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    fast = sgd_lookahead(params, grads, lr)
    with valid_mode(model) if valid_mode is not None else contextlib.nullcontext():
        valid_logits = functional_call(model, fast, (x_valid,), strict=False)
    valid_loss = loss_fn(valid_logits, y_valid)
    meta_grads = torch.autograd.grad(valid_loss, list(meta_params), allow_unused=True)
    meta_grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, meta_grads))
    return LookaheadResult(
        meta_grads=tuple(g.detach() for g in meta_grads),
        theta_grads={name: g.detach() for name, g in zip(params, grads)},
        train_loss=train_loss.detach(),
        train_logits=train_logits.detach(),
        valid_loss=valid_loss.detach(),
        valid_logits=valid_logits.detach(),
    )


__all__ = ["LookaheadResult", "lookahead_meta_grad", "sgd_lookahead", "twice_differentiable"]
