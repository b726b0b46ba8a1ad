"""Batched augmentation on the training device: random crop with zero padding, horizontal flip, normalisation.

The whole batch is augmented with one ``gather``: every image's crop offset and flip are folded into a single index
map over the padded batch, so there is no per-image Python loop and no PIL. Randomness comes from a
``torch.Generator`` argument (CPU or the batch's device), which makes a run's augmentation reproducible and its
position part of a checkpoint.

The released code used ``RandomCrop(size, padding=4 if size == 32 else 8)``, ``RandomHorizontalFlip`` and
``Normalize(0.5, 0.5)``; :meth:`Augment.for_view` defaults to the target's own statistics and offers
``stats="half"`` for the original 0.5/0.5.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from ..errors import WorkbenchError


@contextlib.contextmanager
def input_path_threads(device: torch.device | str) -> Iterator[None]:
    """Run the input path's CPU ops on one intra-op thread, restoring the caller's setting afterwards.

    A batch is a handful of ops on about a megabyte each: splitting them across threads saves microseconds but
    costs a thread synchronisation per op, which stalls for a whole scheduler slice when the cores are busy (e.g.
    shared with other jobs). Measured on a loaded 2-core machine: ~1 ms per batch on one thread against 4 ms mean,
    with 8 ms spikes, on two. Only the calling thread is affected (OpenMP thread counts are per thread).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_padding(image_size: int) -> int:
    """The released code's crop padding: 4 pixels at 32x32, 8 at any other size."""
    return 4 if image_size == 32 else 8


class Augment:
    """``Augment(image_size)(x_uint8, generator)`` -> normalised float batch, randomly cropped and flipped.

    image_size: output side length; the input may be larger (random crop) or equal (crop of the padded image).
    padding: zero padding on each side before cropping (in pixel units: padded pixels are black, value 0).
    flip: randomly mirror half of the images horizontally (False for digits and characters).
    mean/std: per-channel normalisation on the [0, 1] scale; one value broadcasts to every channel.
    """

    def __init__(self, image_size: int, padding: int = 4, flip: bool = True,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        if not isinstance(image_size, int) or image_size < 1:
            raise WorkbenchError(f"Augment image_size must be a positive integer, got {image_size!r}")
        if not isinstance(padding, int) or padding < 0:
            raise WorkbenchError(f"Augment padding must be a non-negative integer, got {padding!r}")
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or not mean:
            raise WorkbenchError(f"Augment mean and std need one value per channel each, got {mean} and {std}")
        if min(std) <= 0:
            raise WorkbenchError(f"Augment std must be positive, got {std}")
        self.image_size = image_size
        self.padding = padding
        self.flip = bool(flip)
        self.mean = mean
        self.std = std
        # x / 255 then (x - mean) / std, folded into one multiply-add per element
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std])
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)])
        self._cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_view(cls, view: Any, stats: Literal["dataset", "half"] = "dataset", padding: int | None = None,
                 flip: bool | None = None) -> "Augment":
        """The augmentation for a :class:`TargetView` (or anything with image_size, channels, flip, mean, std).

        stats="dataset" normalises with the view's own per-channel statistics (default); "half" uses the released
        code's Normalize(0.5, 0.5). padding defaults to :func:`default_padding`, flip to the dataset's.
        """
        if stats not in ("dataset", "half"):
            raise WorkbenchError(f"stats must be 'dataset' or 'half', got {stats!r}")
        channels = int(view.channels)
        mean = list(view.mean) if stats == "dataset" else [0.5] * channels
        std = list(view.std) if stats == "dataset" else [0.5] * channels
        return cls(int(view.image_size), padding=default_padding(int(view.image_size)) if padding is None else padding,
                   flip=bool(view.flip) if flip is None else flip, mean=mean, std=std)

    # ------------------------------------------------------------------------------------------------------------
    def _affine(self, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (channels, str(device))
        if key not in self._cache:
            if len(self.mean) not in (1, channels):
                raise WorkbenchError(f"Augment has statistics for {len(self.mean)} channels but the batch has "
                                     f"{channels}; build it for this data (Augment.for_view(view))")
            scale = self._scale.expand(channels) if len(self.mean) == 1 else self._scale
            shift = self._shift.expand(channels) if len(self.mean) == 1 else self._shift
            self._cache[key] = (scale.to(device).view(1, channels, 1, 1), shift.to(device).view(1, channels, 1, 1))
        return self._cache[key]

    def _check(self, x: torch.Tensor, crop: bool = True) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise WorkbenchError(f"Augment expects a uint8 batch (B, C, H, W), got {got}; pass TensorSplit images")
        if crop and min(x.shape[-2:]) + 2 * self.padding < self.image_size:
            raise WorkbenchError(f"Augment cannot crop {self.image_size}x{self.image_size} from {x.shape[-2]}x"
                                 f"{x.shape[-1]} images padded by {self.padding}; resize the data to image_size first")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, scaled to [0, 1] and normalised per channel (no cropping, no flipping)."""
        self._check(x, crop=False)
        scale, shift = self._affine(x.shape[1], x.device)
        return torch.addcmul(shift, x.to(torch.float32), scale)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation path: centre crop to ``image_size`` if the images are larger, then normalise."""
        self._check(x, crop=False)
        h, w = x.shape[-2:]
        s = self.image_size
        if h < s or w < s:
            raise WorkbenchError(f"Augment.eval got {h}x{w} images, smaller than image_size {s}; resize the data first")
        if h != s or w != s:
            top, left = (h - s) // 2, (w - s) // 2
            x = x[..., top:top + s, left:left + s]
        return self.normalize(x)

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random crop offsets (top, left) in the padded image and flip flags, drawn on the generator's device."""
        device = generator.device if generator is not None else torch.device("cpu")
        top = torch.randint(0, height + 2 * self.padding - self.image_size + 1, (batch,), generator=generator,
                            device=device)
        left = torch.randint(0, width + 2 * self.padding - self.image_size + 1, (batch,), generator=generator,
                             device=device)
        if self.flip:
            flips = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
        else:
            flips = torch.zeros(batch, dtype=torch.bool, device=device)
        return top, left, flips

    def apply(self, x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop each padded image at (top, left), mirror where ``flips``, normalise: one gather for the batch."""
        self._check(x)
        b, c, h, w = x.shape
        s, p = self.image_size, self.padding
        device = x.device
        top, left, flips = top.to(device), left.to(device), flips.to(device)
        padded = F.pad(x, (p, p, p, p)) if p else x
        wp = w + 2 * p
        ar = torch.arange(s, device=device)
        rows = top[:, None] + ar  # (B, S)
        cols = torch.where(flips[:, None], left[:, None] + (s - 1 - ar), left[:, None] + ar)  # (B, S)
        flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, s * s).expand(b, c, s * s)
        out = torch.gather(padded.reshape(b, c, -1), 2, flat).view(b, c, s, s)
        return self.normalize(out)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a uint8 batch on its own device; ``generator`` seeds the crops and flips."""
        self._check(x)
        with input_path_threads(x.device):
            top, left, flips = self.sample(x.shape[0], x.shape[-2], x.shape[-1], generator)
            return self.apply(x, top, left, flips)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "padding": self.padding, "flip": self.flip, "mean": list(self.mean),
                "std": list(self.std)}

    def __repr__(self) -> str:
        return (f"Augment(image_size={self.image_size}, padding={self.padding}, flip={self.flip}, "
                f"mean={[round(m, 4) for m in self.mean]}, std={[round(s, 4) for s in self.std]})")
