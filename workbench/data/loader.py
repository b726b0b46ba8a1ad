"""Batches from an in-memory split: an infinite, seeded, resumable training iterator and a one-pass eval iterator.

The split lives on the training device as one uint8 tensor; each batch is an index into it followed by the batched
augmentation, so no worker processes, no PIL and no host-to-device copy per step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import WorkbenchError
from .augment import Augment, input_path_threads
from .views import TensorSplit

STATE_VERSION = 1


def _seeds(seed: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (epoch order, augmentation) from one user seed."""
    order, aug = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint64)
    return int(order) & (2**63 - 1), int(aug) & (2**63 - 1)


class BatchIterator:
    """Endless ``(x, y)`` batches from ``split``: reshuffled every epoch, augmented, on ``device``.

    split: the images (uint8) and labels; moved to ``device`` once.
    batch_size: images per batch; must not exceed the split.
    augment: an :class:`Augment` (called with this iterator's generator), any callable ``uint8 batch -> float``,
        or ``None`` for plain ``x / 255``.
    seed: seeds the epoch permutations and the augmentation (two independent streams).
    drop_last: skip an epoch's final partial batch (the released code did) so every batch has ``batch_size``.

    ``state_dict()`` records the epoch, the position in it and both generator states; ``load_state_dict()`` on an
    iterator built with the same split and settings continues with exactly the batches the original would have
    produced next.
    """

    def __init__(self, split: TensorSplit, batch_size: int, augment: Callable[..., torch.Tensor] | None = None,
                 seed: int = 0, device: str | torch.device = "cpu", drop_last: bool = True):
        if not isinstance(split, TensorSplit):
            raise WorkbenchError(f"BatchIterator needs a TensorSplit, got {type(split).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise WorkbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(split)
        if batch_size > n:
            raise WorkbenchError(f"batch_size {batch_size} is larger than the split ({n} images); use batch_size <= "
                                 f"{n} or more data (e.g. a larger per_class)")
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.batch_size = batch_size
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        order_seed, aug_seed = _seeds(self.seed)
        self._order_gen = torch.Generator().manual_seed(order_seed)
        self._aug_gen = torch.Generator().manual_seed(aug_seed)
        self.epoch = 0
        self.index = 0
        self._new_epoch(first=True)

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def batches_per_epoch(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _new_epoch(self, first: bool = False) -> None:
        if not first:
            self.epoch += 1
        self._epoch_gen_state = self._order_gen.get_state()
        self._perm = torch.randperm(self.num_examples, generator=self._order_gen).to(self.device)
        self.index = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        remaining = self.num_examples - self.index
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self._new_epoch()
        idx = self._perm[self.index:self.index + self.batch_size]
        self.index += int(idx.shape[0])
        with input_path_threads(self.device):
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.augment is None:
                return x.float().div_(255.0), y
            if isinstance(self.augment, Augment):
                return self.augment(x, generator=self._aug_gen), y
            return self.augment(x), y

    def state_dict(self) -> dict[str, Any]:
        """The exact position: epoch, index in the epoch, generator states (tensors and ints; torch.save-able)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "drop_last": self.drop_last,
            "epoch_generator": self._epoch_gen_state.clone(),
            "augment_generator": self._aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the split size, batch size and drop_last must match."""
        keys = ("version", "epoch", "index", "batch_size", "num_examples", "drop_last", "epoch_generator",
                "augment_generator")
        missing = [k for k in keys if k not in state]
        if missing:
            raise WorkbenchError(f"batch iterator state lacks {', '.join(missing)}; pass a dict from "
                                 f"BatchIterator.state_dict()")
        if state["version"] != STATE_VERSION:
            raise WorkbenchError(f"batch iterator state has version {state['version']}, this code reads {STATE_VERSION}")
        mine = (self.num_examples, self.batch_size, self.drop_last)
        theirs = (int(state["num_examples"]), int(state["batch_size"]), bool(state["drop_last"]))
        if mine != theirs:
            raise WorkbenchError(f"batch iterator state was saved for (images, batch_size, drop_last) = {theirs} but "
                                 f"this iterator has {mine}; rebuild it with the same split and settings")
        index = int(state["index"])
        if not 0 <= index <= self.num_examples:
            raise WorkbenchError(f"batch iterator state has index {index} outside 0..{self.num_examples}")
        self._order_gen.set_state(state["epoch_generator"].cpu())
        self._new_epoch(first=True)  # regenerates the saved epoch's permutation from its starting generator state
        self.epoch = int(state["epoch"])
        self.index = index
        self._aug_gen.set_state(state["augment_generator"].cpu())

    def __repr__(self) -> str:
        return (f"BatchIterator(n={self.num_examples}, batch_size={self.batch_size}, epoch={self.epoch}, "
                f"index={self.index}, device={self.device}, drop_last={self.drop_last})")


def eval_batches(split: TensorSplit, batch_size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass over ``split`` (the last batch may be smaller: every test image counts).

    transform: e.g. ``augment.eval`` (normalise only); ``None`` gives ``x / 255``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    for start in range(0, len(split), batch_size):
        x = split.x[start:start + batch_size].to(device, non_blocking=True)
        y = split.y[start:start + batch_size].to(device, non_blocking=True)
        yield (transform(x) if transform is not None else x.float().div_(255.0)), y
