"""Target views: the small, resized, channel-matched slice of a dataset that a target network trains on.

``target_view(ds, per_class=50)`` is the paper's s-CIFAR100 recipe applied to any :class:`ImageDataset`: a fixed
number of training images per class (seeded, or the first ones as the released code did), the whole test split,
every image resized once to the working resolution, gray images repeated to three channels when the model needs
them, and the per-channel normalisation statistics of the resulting training split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WorkbenchError
from .sources import ImageDataset

_CHUNK = 2048  # images per resize/statistics chunk: bounds the float copy to a few tens of MiB


@dataclasses.dataclass
class TensorSplit:
    """Images ``x`` (uint8, ``(N, C, H, W)``) and their labels ``y`` (int64, ``(N,)``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise WorkbenchError(f"TensorSplit.x must be a uint8 tensor (N, C, H, W), got {self.x.dtype} "
                                 f"{tuple(self.x.shape)}; convert images with (x * 255).round().to(torch.uint8)")
        if self.y.dtype != torch.int64 or self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise WorkbenchError(f"TensorSplit.y must be int64 with one label per image ({self.x.shape[0]}), got "
                                 f"{self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device))

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "TensorSplit":
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        return TensorSplit(self.x[index], self.y[index])

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        return torch.bincount(self.y.cpu(), minlength=num_classes or 0)

    def __repr__(self) -> str:
        return f"TensorSplit(n={len(self)}, image={'x'.join(map(str, self.image_shape))})"


def resize_images(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize uint8 images ``(N, C, H, W)`` to ``image_size`` square, once (bilinear, antialiased when shrinking)."""
    if image_size is None or (x.shape[-2] == image_size and x.shape[-1] == image_size):
        return x
    if not isinstance(image_size, int) or image_size < 1:
        raise WorkbenchError(f"image_size must be a positive integer, got {image_size!r}")
    out = torch.empty((x.shape[0], x.shape[1], image_size, image_size), dtype=torch.uint8, device=x.device)
    shrink = image_size < min(x.shape[-2], x.shape[-1])
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].float()
        resized = F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                antialias=shrink)
        out[start:start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Gray -> RGB by repeating the channel; RGB -> gray by ITU-R 601 luma. ``None`` keeps the images as they are."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.uint8, device=x.device)
        for start in range(0, x.shape[0], _CHUNK):
            luma = (x[start:start + _CHUNK].float() * weights).sum(1, keepdim=True)
            out[start:start + _CHUNK] = luma.round_().clamp_(0, 255).to(torch.uint8)
        return out
    raise WorkbenchError(f"cannot convert {x.shape[1]}-channel images to {channels} channels; use channels=1 or 3")


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images on the [0, 1] scale (float64 accumulation)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        total_sq += chunk.square_().sum(dim=(0, 2, 3)).cpu()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # a blank channel stays finite
    return [float(m) for m in mean], [float(s) for s in std]


def prepare_images(x: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """Resize, then convert channels (cheaper in this order for gray -> RGB)."""
    if channels is not None and channels not in (1, 3):
        raise WorkbenchError(f"channels must be 1 or 3 (or None to keep the dataset's), got {channels!r}")
    return convert_channels(resize_images(x, image_size), channels)


@dataclasses.dataclass
class TargetView:
    """A target task ready for training: resized splits, class count, normalisation statistics, augmentation flags.

    ``mean``/``std`` are per-channel statistics of ``train`` on the [0, 1] scale. ``valid`` is an optional held-out
    part of the source training split, disjoint from ``train`` (e.g. to select a regularizer, as the paper selected
    phi on CIFAR-100 images disjoint from s-CIFAR100); it is ``None`` unless ``valid_per_class`` was asked for.
    """

    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    channels: int
    flip: bool
    per_class: int | None = None
    seed: int = 0
    pick: str = "random"
    valid: TensorSplit | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, saved next to every transfer run."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "channels": self.channels,
            "flip": self.flip,
            "per_class": self.per_class,
            "pick": self.pick,
            "seed": self.seed,
            "train": len(self.train),
            "test": len(self.test),
            "valid": len(self.valid) if self.valid is not None else 0,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return (f"TargetView({self.name!r}, train={len(self.train)}, test={len(self.test)}, classes={self.num_classes}, "
                f"image={self.channels}x{self.image_size}x{self.image_size}, flip={self.flip})")


def pick_per_class(y: torch.Tensor, num_classes: int, count: int, seed: int, pick: str,
                   exclude: torch.Tensor | None = None, what: str = "per_class", name: str = "the dataset",
                   split: str = "training") -> torch.Tensor:
    """Indices of ``count`` images per class (seeded random or the first ones), sorted, skipping ``exclude``;
    ``split`` names the split ``y`` labels in the error message."""
    y_np = y.cpu().numpy()
    available = np.ones(len(y_np), dtype=bool)
    if exclude is not None:
        available[exclude.cpu().numpy()] = False
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        members = np.flatnonzero((y_np == cls) & available)
        if len(members) < count:
            left = " left after the valid_per_class images" if exclude is not None else ""
            raise WorkbenchError(f"{what}={count} but class {cls} of {name} has only {len(members)} {split} "
                                 f"images{left}; use {what} <= {len(members)}")
        chosen.append(members[:count] if pick == "first" else np.sort(rng.choice(members, count, replace=False)))
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


def target_view(ds: ImageDataset, per_class: int | None = None, image_size: int | None = None,
                channels: int | None = None, seed: int = 0, pick: Literal["random", "first"] = "random",
                valid_per_class: int = 0) -> TargetView:
    """The training view of a target dataset.

    per_class: keep this many training images per class (``None`` keeps all); ``pick="random"`` draws them with
        ``seed``, ``pick="first"`` takes the first ones in dataset order (the released code's s-CIFAR100 rule).
    image_size: resize every image once to this square size (``None`` keeps the dataset's, which must be square).
    channels: 3 repeats gray images to RGB, 1 converts RGB to gray, ``None`` keeps the dataset's.
    valid_per_class: also hold out this many other training images per class as ``.valid``.
    """
    if pick not in ("random", "first"):
        raise WorkbenchError(f"pick must be 'random' or 'first', got {pick!r}")
    if per_class is not None and (not isinstance(per_class, int) or per_class < 1):
        raise WorkbenchError(f"per_class must be a positive integer or None, got {per_class!r}")
    if not isinstance(valid_per_class, int) or valid_per_class < 0:
        raise WorkbenchError(f"valid_per_class must be a non-negative integer, got {valid_per_class!r}")
    h, w = ds.x_train.shape[-2:]
    if image_size is None and h != w:
        raise WorkbenchError(f"{ds.name} images are {h}x{w}, not square; pass image_size=N to resize them")
    size = int(image_size if image_size is not None else h)

    valid_index = None
    if valid_per_class:
        valid_index = pick_per_class(ds.y_train, ds.num_classes, valid_per_class, seed + 1, "random",
                                     what="valid_per_class", name=ds.name)
    if per_class is not None:
        train_index = pick_per_class(ds.y_train, ds.num_classes, per_class, seed, pick, exclude=valid_index,
                                     name=ds.name)
    elif valid_index is not None:
        keep = torch.ones(len(ds.y_train), dtype=torch.bool)
        keep[valid_index] = False
        train_index = torch.nonzero(keep).squeeze(1)
    else:
        train_index = None

    x_train = ds.x_train if train_index is None else ds.x_train[train_index]
    y_train = ds.y_train if train_index is None else ds.y_train[train_index]
    train = TensorSplit(prepare_images(x_train, size, channels), y_train.clone())
    test = TensorSplit(prepare_images(ds.x_test, size, channels), ds.y_test.clone())
    valid = None
    if valid_index is not None:
        valid = TensorSplit(prepare_images(ds.x_train[valid_index], size, channels), ds.y_train[valid_index].clone())
    mean, std = channel_stats(train.x)
    return TargetView(name=ds.name, train=train, test=test, num_classes=ds.num_classes, classes=list(ds.classes),
                      mean=mean, std=std, image_size=size, channels=int(train.x.shape[1]), flip=ds.flip,
                      per_class=per_class, seed=seed, pick=pick, valid=valid)
