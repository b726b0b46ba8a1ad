"""What several test modules share: the read-only reference material beside the checkout (:func:`require_shared`,
the one rule for a missing file), the synthetic datasets, and the smoke study.

Importable as ``helpers`` because ``tests/`` is on pytest's ``pythonpath`` (pyproject.toml); conftest.py wraps the
parts that are fixtures. A subprocess that needs it gets ``tests/`` through its ``PYTHONPATH`` (:data:`TESTS`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from workbench.data import ImageDataset

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = REPO.parent / "shared"

# files under shared/, by their path relative to it
OFFICIAL_PHI = "reference/official_perturb_750.pth"  # the authors' released phi
OFFICIAL_OUTPUT = "reference/official_reference_shared.npz"  # the authors' code's output for that phi
CIFAR10, MNIST, TINYIMAGENET = "data/cifar10.npz", "data/mnist_test10k.npz", "data/tinyimagenet32.npz"
SMOKE_FILES = (OFFICIAL_PHI, TINYIMAGENET, MNIST, CIFAR10)  # what the smoke profile reads

# meta-training settings small enough for a test (a Conv-4 of width 8 on 16x16 images, 3 steps, one thread)
TINY = dict(arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=3, checkpoint_every=2, log_every=1,
            threads=1, device="cpu")


# ------------------------------------------------------------------------------------------ reference files
def require_shared(*names: str) -> Path | tuple[Path, ...]:
    """The path of each file ``names`` (relative to ``shared/``, e.g. ``"data/cifar10.npz"``); a missing one
    fails the calling test (never skips it) with one line naming it and the fix. One name gives one path."""
    paths = tuple(SHARED / name for name in names)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"reference file missing: {', '.join(missing)}; the shared/ folder must sit beside the checkout "
                    f"({SHARED})", pytrace=False)
    return paths[0] if len(paths) == 1 else paths


# ------------------------------------------------------------------------------------------ synthetic data
def synthetic_dataset(num_classes: int = 4, per_class: int = 24, size: int = 16, seed: int = 0) -> ImageDataset:
    """Random RGB images whose class shifts the mean brightness, so a few steps can learn something (the
    meta-training source of the tests)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    base = (y.float() * 40 + 40).view(-1, 1, 1, 1)
    x = (base + torch.randn(len(y), 3, size, size, generator=g) * 30).clamp(0, 255).to(torch.uint8)
    yt = torch.arange(num_classes).repeat_interleave(4)
    xt = (yt.float().view(-1, 1, 1, 1) * 40 + 40).expand(-1, 3, size, size).to(torch.uint8).contiguous()
    return ImageDataset("synthetic", x, y, xt, yt, [f"class{i}" for i in range(num_classes)])


def band_dataset(classes: int = 3, train_per_class: int = 12, test_per_class: int = 4, size: int = 16,
                 seed: int = 0) -> ImageDataset:
    """Gray images whose class brightens one horizontal band: learnable in a few steps (the transfer target of the
    tests)."""
    g = torch.Generator().manual_seed(seed)

    def make(per_class):
        y = torch.arange(classes).repeat_interleave(per_class)
        x = torch.randint(0, 120, (len(y), 1, size, size), generator=g).to(torch.uint8)
        band = size // classes
        for c in range(classes):
            x[y == c, :, c * band:(c + 1) * band] += 120
        return x, y

    xtr, ytr = make(train_per_class)
    xte, yte = make(test_per_class)
    return ImageDataset("synthetic", xtr, ytr, xte, yte, [f"c{i}" for i in range(classes)], flip=False)


def save_npz(ds: ImageDataset, path: Path) -> str:
    """``ds`` as an npz file in the layout of ``shared/data/MANIFEST.md``; returns its dataset spec ``npz:<path>``."""
    np.savez(path, x_train=ds.x_train.permute(0, 2, 3, 1).numpy(), y_train=ds.y_train.numpy(),
             x_test=ds.x_test.permute(0, 2, 3, 1).numpy(), y_test=ds.y_test.numpy(),
             classes=np.asarray(ds.classes, dtype=str))
    return f"npz:{path}"


# ------------------------------------------------------------------------------------------ the smoke study
SMOKE_NOTEBOOKS = ["01_meta_train", "02_transfer_study", "03_calibration_robustness", "04_scales", "05_explore_phi"]


def run_smoke_study(root: str | os.PathLike, notebooks: Sequence[str] = SMOKE_NOTEBOOKS) -> Path:
    """Artifacts of the real smoke study in ``root``: ``workbench study run <notebooks> --profile smoke`` in a
    subprocess (meta-training, then a transfer grid of Base, DropBlock, MetaPerturb with that phi and with the
    authors' phi and its untrained control, two targets, two seeds, robustness on one target; the reading
    notebooks and the explorer), executed notebooks included."""
    require_shared(*SMOKE_FILES)
    command = [sys.executable, "-m", "workbench", "study", "run", *notebooks, "--profile", "smoke",
               "--artifacts", str(root), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the smoke study failed ({done.returncode}); see the executed notebooks under "
                           f"{Path(root) / 'studies'}: {done.stderr[-2000:]}")
    return Path(root)
