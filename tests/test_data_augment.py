"""Augmentation: shapes, dtypes, the plain per-image reference, flip rate, seeds, padding value, eval path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workbench.data import Augment, TargetView, TensorSplit, default_padding
from workbench.errors import WorkbenchError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _batch(n=64, c=3, hw=32, seed=0):
    return torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(x, mean=MEAN, std=STD):
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5)


def _reference(x, top, left, flips, size, padding):
    """The plain loop the batched gather must agree with: pad, crop, mirror, one image at a time."""
    out = []
    for img, t, l, f in zip(x, top.tolist(), left.tolist(), flips.tolist()):
        crop = F.pad(img, (padding,) * 4)[:, t:t + size, l:l + size]
        out.append(crop.flip(-1) if f else crop)
    return _normalise(torch.stack(out))


@pytest.mark.parametrize("hw, size, padding", [(32, 32, 4), (40, 32, 0), (64, 64, 8), (28, 24, 2)])
def test_matches_per_image_reference(hw, size, padding):
    aug = Augment(size, padding=padding, mean=MEAN, std=STD)
    x = _batch(hw=hw)
    top, left, flips = aug.sample(len(x), hw, hw, torch.Generator().manual_seed(1))
    out = aug.apply(x, top, left, flips)
    assert out.dtype == torch.float32 and tuple(out.shape) == (64, 3, size, size)
    torch.testing.assert_close(out, _reference(x, top, left, flips, size, padding), rtol=0, atol=1e-6)
    assert int(top.max()) <= hw + 2 * padding - size and int(left.min()) >= 0


def test_call_is_seeded_and_keeps_shapes():
    aug = Augment(32, padding=4, mean=MEAN, std=STD)
    x = _batch()
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    c = aug(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape and a.dtype == torch.float32


def test_flips_half_on_average_and_never_when_off():
    """Asymmetric images, no padding: each output is either the image or its mirror, about half of each."""
    x = _batch(n=4000, hw=8)
    aug = Augment(8, padding=0, mean=MEAN, std=STD)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    same = (out == aug.normalize(x)).flatten(1).all(1)
    mirrored = (out == aug.normalize(x.flip(-1))).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # exactly one of the two (random images are never symmetric)
    assert abs(mirrored.float().mean().item() - 0.5) < 0.03
    plain = Augment(8, padding=0, flip=False, mean=MEAN, std=STD)(x, generator=torch.Generator().manual_seed(0))
    assert _close(plain, _normalise(x))


def test_crop_offsets_are_uniform():
    aug = Augment(32, padding=4, flip=False)
    top, left, _ = aug.sample(90000, 32, 32, torch.Generator().manual_seed(0))
    counts = torch.bincount(top, minlength=9).float() / 90000
    assert torch.allclose(counts, torch.full((9,), 1 / 9), atol=0.01) and set(left.unique().tolist()) == set(range(9))


def test_padding_is_black_pixels():
    aug = Augment(32, padding=4, flip=False, mean=MEAN, std=STD)
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = aug.apply(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool))
    black = _normalise(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert torch.allclose(out[:, :, :4, :], black.expand(2, 3, 4, 32)) and torch.allclose(out[:, :, :, :4], black.expand(2, 3, 32, 4))
    assert torch.allclose(out[:, :, 4:, 4:], _normalise(x)[:, :, 4:, 4:])


def test_eval_normalises_and_centre_crops():
    aug = Augment(32, padding=4, mean=MEAN, std=STD)
    x = _batch(n=4)
    assert _close(aug.eval(x), _normalise(x))
    big = _batch(n=4, hw=36)
    assert _close(aug.eval(big), _normalise(big[..., 2:34, 2:34]))
    with pytest.raises(WorkbenchError, match="smaller than image_size"):
        Augment(40, padding=0).eval(x)


def test_gray_and_broadcast_statistics():
    aug = Augment(28, padding=2, flip=False, mean=(0.5,), std=(0.5,))
    x = _batch(n=8, c=1, hw=28)
    assert tuple(aug(x).shape) == (8, 1, 28, 28)
    assert _close(Augment(28, mean=(0.5,), std=(0.5,)).normalize(_batch(n=2)), _normalise(_batch(n=2), (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(WorkbenchError, match="statistics for 3 channels but the batch has 1"):
        Augment(28, padding=2).normalize(x)


def test_for_view_defaults_and_half_stats():
    split = TensorSplit(_batch(n=4), torch.zeros(4, dtype=torch.int64))
    view = TargetView("v", split, split, 10, [str(i) for i in range(10)], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], 32, 3, False)
    aug = Augment.for_view(view)
    assert (aug.image_size, aug.padding, aug.flip, aug.mean, aug.std) == (32, 4, False, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    half = Augment.for_view(view, stats="half")
    assert half.mean == [0.5] * 3 and half.std == [0.5] * 3
    assert default_padding(32) == 4 and default_padding(84) == 8 and default_padding(64) == 8


def test_bad_input():
    aug = Augment(32)
    with pytest.raises(WorkbenchError, match="expects a uint8 batch"):
        aug(torch.rand(2, 3, 32, 32))
    with pytest.raises(WorkbenchError, match="cannot crop 32x32 from 16x16"):
        aug(_batch(n=2, hw=16))
    with pytest.raises(WorkbenchError, match="std must be positive"):
        Augment(32, std=(0.0, 1.0, 1.0))


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    Augment(32)(_batch(n=4))
    assert torch.get_num_threads() == before
