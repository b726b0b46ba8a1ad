"""Prediction and metrics: Monte-Carlo prediction, accuracy, NLL, ECE, reliability bins, perturbation scales.

Monte-Carlo (MC) prediction follows the original evaluation (paper-notes 1.8): the prediction is the argmax of
the softmax averaged over ``K`` noisy forward passes, with BatchNorm and the perturbation sites in eval mode
(running statistics) while the noise is still drawn. Because nothing in eval mode depends on the other rows of a
batch, the ``K`` passes are independent given the input, so they are batched: the batch is tiled ``K`` times
(sample-major, ``x.repeat(k, 1, 1, 1)``) in chunks of at most ``max_rows`` rows, which bounds memory while giving
the device large batches. Optionally the tiling happens at the input of the first stochastic module
(``tile_at``): everything before it is deterministic in eval mode, so it is computed once instead of ``K`` times;
the batch is then cut into blocks of a few images so that each forward holds many samples of each.

Calibration uses 15 equal-width confidence bins ``[0, 1/15), [1/15, 2/15), ..., [14/15, 1]`` (left-closed like
torchmetrics; the last bin also holds confidence exactly 1, which torchmetrics puts in a 16th bin of its own).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import WorkbenchError

DEFAULT_BINS = 15
# Rows per forward pass in MC prediction. On the CPU, 256-row passes measured 2.6x faster per row than 2048-row
# ones (ResNet-20, 32x32: benchmarks/transfer_speed.py --max-rows): the feature maps stay in cache.
DEFAULT_MAX_ROWS = 256
# log(0) guard for NLL of an averaged softmax (a probability can underflow to 0 in float32).
_PROB_FLOOR = 1e-12


def check_samples(samples: int) -> int:
    """Return ``samples`` if it is a valid number of MC samples, else raise a one-line error."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise WorkbenchError(f"the number of Monte-Carlo samples must be an integer >= 1, got {samples!r}")
    return samples


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each module's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _tile_input_of(module: nn.Module | None, k: int) -> Iterator[None]:
    """Repeat the first positional input of ``module`` ``k`` times along the batch (sample-major) while active."""
    if module is None or k == 1:
        yield
        return

    def pre_hook(_mod, args):
        return (args[0].repeat(k, *([1] * (args[0].dim() - 1))),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def _softmax_sum(model: nn.Module, x: torch.Tensor, k: int, tile_at: nn.Module | None) -> torch.Tensor:
    """Sum over ``k`` noisy passes of softmax(model(x)), done as one forward of ``k * len(x)`` rows.

    With ``tile_at`` the rows are repeated at that module's input; a network whose later layers reuse features
    from before it (e.g. DenseNet's concatenations) cannot be tiled there, and falls back to tiling the input.
    """
    b = x.shape[0]
    if tile_at is not None and k > 1:
        try:
            with _tile_input_of(tile_at, k):
                logits = model(x)
            if logits.shape[0] == k * b:
                return F.softmax(logits.float(), dim=1).view(k, b, -1).sum(0)
        except RuntimeError:
            pass
    if k > 1:
        x = x.repeat(k, *([1] * (x.dim() - 1)))
    logits = model(x)
    return F.softmax(logits.float(), dim=1).view(k, b, -1).sum(0)


def mc_predict(
    model: nn.Module,
    x: torch.Tensor,
    samples: int = 1,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    tile_at: nn.Module | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Average softmax over ``samples`` stochastic forward passes of ``model`` (in eval mode) on batch ``x``.

    Returns float32 probabilities of shape ``(len(x), num_classes)``. The passes are batched by tiling ``x`` in
    chunks of at most ``max_rows`` rows (at least one sample per chunk). ``samples=1`` is exactly one ordinary
    forward pass, so it uses the random stream exactly as ``model(x)`` would. ``on_forward(rows)`` is called after
    every forward (e.g. to read the sites' last statistics).
    """
    check_samples(samples)
    b = x.shape[0]
    # With ``tile_at`` the layers before it run once per image and forward, so each forward takes as many samples
    # of as few images as fit in ``max_rows`` (100 samples: 2 images x 100 rows, the prefix on 2 rows instead of
    # 200). Without it, tiling costs the same either way and the whole batch is tiled.
    block = max(1, max_rows // min(samples, max_rows)) if tile_at is not None and samples > 1 else max(b, 1)
    with eval_mode(model), torch.no_grad():
        parts = [_softmax_total(model, x[start:start + block], samples, max_rows, tile_at, on_forward)
                 for start in range(0, b, block)]
    total = parts[0] if len(parts) == 1 else torch.cat(parts)
    return total / samples


def _softmax_total(model: nn.Module, x: torch.Tensor, samples: int, max_rows: int, tile_at: nn.Module | None,
                   on_forward: Callable[[int], None] | None) -> torch.Tensor:
    """Sum of softmax over ``samples`` passes of ``x``, in forwards of at most ``max_rows`` rows (one sample at
    least)."""
    per_chunk = max(1, min(samples, max_rows // max(len(x), 1)))
    total = None
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        part = _softmax_sum(model, x, k, tile_at)
        total = part if total is None else total + part
        done += k
        if on_forward is not None:
            on_forward(k * len(x))
    return total


# ---------------------------------------------------------------------------------------------------------------
# metrics


def confidence_and_prediction(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probability and predicted label of each row of ``probs``."""
    conf, pred = probs.max(dim=1)
    return conf, pred


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((probs.argmax(dim=1) == labels).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``probs`` (probabilities floored at 1e-12)."""
    p = probs.double().gather(1, labels.view(-1, 1)).clamp_min(_PROB_FLOOR)
    return float(-p.log().mean())


def bin_edges(n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``n_bins + 1`` edges of equal-width confidence bins on [0, 1]."""
    if n_bins < 1:
        raise WorkbenchError(f"the number of calibration bins must be >= 1, got {n_bins}")
    return np.linspace(0.0, 1.0, n_bins + 1)


def reliability_bins(confidence, correct, n_bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Reliability-diagram bins of per-example ``confidence`` and 0/1 ``correct``.

    Returns arrays of length ``n_bins``: ``lower``/``upper`` edges, ``count`` (examples per bin), ``confidence``
    (mean confidence) and ``accuracy`` (mean correctness), the last two 0 where a bin is empty.
    """
    conf = np.asarray(torch.as_tensor(confidence).double().cpu()).reshape(-1)
    corr = np.asarray(torch.as_tensor(correct).double().cpu()).reshape(-1)
    edges = bin_edges(n_bins)
    # Left-closed bins; confidence 1.0 (or above, from rounding) goes into the last bin.
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(index, weights=corr, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count,
        "confidence": np.where(count > 0, conf_sum / safe, 0.0),
        "accuracy": np.where(count > 0, acc_sum / safe, 0.0),
    }


def ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    n = bins["count"].sum()
    if n == 0:
        return 0.0
    return float(np.sum(bins["count"] / n * np.abs(bins["accuracy"] - bins["confidence"])))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of ``probs`` against ``labels`` with ``n_bins`` equal-width bins (top-1 confidence)."""
    conf, pred = confidence_and_prediction(probs)
    return ece_from_bins(reliability_bins(conf, pred == labels, n_bins))


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float]:
    """``accuracy``, ``nll`` and ``ece`` of predicted probabilities ``probs`` (N, C) against ``labels`` (N,)."""
    if probs.shape[0] != labels.shape[0]:
        raise WorkbenchError(f"{probs.shape[0]} predictions for {labels.shape[0]} labels; pass one row per label")
    probs = probs.detach().cpu()
    labels = labels.detach().cpu().long()
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
    }


# ---------------------------------------------------------------------------------------------------------------
# perturbation statistics


class SiteStatistics:
    """Accumulates, over eval forwards, each site's per-channel scale and its noise-multiplier statistics.

    After each forward a perturbation site exposes ``last_scale`` (C,) and ``last_multiplier_stats`` (a dict of
    floats such as ``mean`` and ``std`` of the multiplier s*z); this class averages them over forwards weighted by
    the number of rows, so the result is the average over the test set.
    """

    def __init__(self, sites: Sequence[nn.Module], names: Sequence[str] | None = None):
        self.sites = list(sites)
        self.names = list(names) if names is not None else [f"site{i}" for i in range(len(self.sites))]
        self._rows = 0
        self._scale: list[torch.Tensor | None] = [None] * len(self.sites)
        self._stats: list[dict[str, float]] = [{} for _ in self.sites]

    def update(self, rows: int) -> None:
        for i, site in enumerate(self.sites):
            scale = getattr(site, "last_scale", None)
            if scale is not None:
                scale = scale.detach().double().cpu().reshape(-1) * rows
                self._scale[i] = scale if self._scale[i] is None else self._scale[i] + scale
            for key, value in (getattr(site, "last_multiplier_stats", None) or {}).items():
                self._stats[i][key] = self._stats[i].get(key, 0.0) + float(value) * rows
        self._rows += rows

    def scales(self) -> dict[str, np.ndarray]:
        """Per-site per-channel scale averaged over the rows seen (sites that never reported are left out)."""
        if self._rows == 0:
            return {}
        return {n: (s / self._rows).numpy() for n, s in zip(self.names, self._scale) if s is not None}

    def multiplier_stats(self) -> dict[str, dict[str, float]]:
        """Per-site averages of the noise-multiplier statistics."""
        if self._rows == 0:
            return {}
        return {n: {k: v / self._rows for k, v in st.items()} for n, st in zip(self.names, self._stats) if st}


# ---------------------------------------------------------------------------------------------------------------
# evaluation of a whole split


@dataclasses.dataclass
class EvalResult:
    """Predictions on a split and their metrics. ``probs`` are the MC-averaged softmax (CPU, float32)."""

    probs: torch.Tensor
    labels: torch.Tensor
    samples: int
    metrics: dict[str, float]
    bins: dict[str, np.ndarray]
    site_scales: dict[str, np.ndarray]
    multiplier_stats: dict[str, dict[str, float]]

    @property
    def confidence(self) -> torch.Tensor:
        return self.probs.max(dim=1).values

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(dim=1)

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.labels

    def prediction_arrays(self) -> dict[str, np.ndarray]:
        """Per-example arrays that are enough to redraw the reliability diagram."""
        return {
            "confidence": self.confidence.numpy().astype(np.float32),
            "predicted": self.predicted.numpy().astype(np.int64),
            "label": self.labels.numpy().astype(np.int64),
            "correct": self.correct.numpy().astype(np.bool_),
        }


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    samples: int = 1,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    sites: Sequence[nn.Module] | None = None,
    site_names: Sequence[str] | None = None,
    tile_at: nn.Module | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    n_bins: int = DEFAULT_BINS,
    seed: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """MC-evaluate ``model`` on images ``x`` (uint8 or float, NCHW) with labels ``y``.

    ``transform`` maps a batch of ``x`` (already on ``device``) to the network input (e.g. normalisation).
    ``seed`` makes the noise reproducible without touching the caller's random stream (the global RNG is forked).
    ``sites`` (e.g. ``handle.sites``) are read after every forward to average their scales and multiplier
    statistics over the split.
    """
    check_samples(samples)
    if len(x) != len(y):
        raise WorkbenchError(f"{len(x)} images for {len(y)} labels; pass one label per image")
    if len(x) == 0:
        raise WorkbenchError("cannot evaluate on an empty split; check the dataset and per_class settings")
    device = torch.device(device)
    stats = SiteStatistics(sites, site_names) if sites else None
    fork_devices = [device] if device.type == "cuda" else []
    chunks = []
    with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(x), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"eval x{samples}", leave=False, total=math.ceil(len(x) / batch_size))
        for start in starts:
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            if transform is not None:
                xb = transform(xb)
            probs = mc_predict(
                model, xb, samples, max_rows=max_rows, tile_at=tile_at,
                on_forward=stats.update if stats else None,
            )
            chunks.append(probs.cpu())
    probs = torch.cat(chunks)
    labels = torch.as_tensor(y).cpu().long()
    conf, pred = confidence_and_prediction(probs)
    bins = reliability_bins(conf, pred == labels, n_bins)
    metrics = {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece_from_bins(bins),
        "mc_samples": samples,
        "n": int(len(labels)),
    }
    return EvalResult(
        probs=probs,
        labels=labels,
        samples=samples,
        metrics=metrics,
        bins=bins,
        site_scales=stats.scales() if stats else {},
        multiplier_stats=stats.multiplier_stats() if stats else {},
    )
