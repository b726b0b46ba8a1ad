"""Target views: per-class subsets, resizing, channel conversion, normalisation statistics."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.data import ImageDataset, TensorSplit, load_dataset, target_view
from workbench.data.views import channel_stats, convert_channels, resize_images
from workbench.errors import WorkbenchError

from helpers import CIFAR10, MNIST, require_shared


@pytest.fixture(scope="module")
def cifar():
    require_shared(CIFAR10)
    return load_dataset("cifar10")


def _toy(n_per_class=6, k=3, c=3, hw=8, flip=True) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = torch.randint(0, 256, (len(y), c, hw, hw), dtype=torch.uint8, generator=g)
    return ImageDataset("toy", x, y, x[:k].clone(), y[:k].clone(), [f"c{i}" for i in range(k)], flip=flip)


def test_per_class_subset_is_exact_reproducible_and_drawn_from_train(cifar):
    view = target_view(cifar, per_class=50, seed=3)
    assert len(view.train) == 500 and view.train.class_counts(10).tolist() == [50] * 10
    assert len(view.test) == 5000 and view.num_classes == 10 and view.flip and view.image_size == 32
    again = target_view(cifar, per_class=50, seed=3)
    assert torch.equal(view.train.x, again.train.x) and torch.equal(view.train.y, again.train.y)
    other = target_view(cifar, per_class=50, seed=4)
    assert not torch.equal(view.train.x, other.train.x)
    # each picked image is a training image of the same class (no resize here, so bytes match exactly)
    flat = cifar.x_train.view(len(cifar.x_train), -1)
    for x, y in zip(view.train.x[:20], view.train.y[:20]):
        match = (flat == x.view(-1)).all(dim=1).nonzero().squeeze(1)
        assert len(match) >= 1 and int(cifar.y_train[match[0]]) == int(y)


def test_pick_first_takes_the_first_images_of_each_class(cifar):
    view = target_view(cifar, per_class=5, pick="first")
    expected = torch.cat([torch.nonzero(cifar.y_train == c).squeeze(1)[:5] for c in range(10)]).sort().values
    assert torch.equal(view.train.x, cifar.x_train[expected])


def test_per_class_larger_than_available(cifar):
    with pytest.raises(WorkbenchError, match=r"per_class=201 but class 0 of cifar10 has only 200 training images; use per_class <= 200"):
        target_view(cifar, per_class=201)


def test_valid_split_is_disjoint_from_train():
    ds = _toy(n_per_class=6)
    view = target_view(ds, per_class=3, valid_per_class=2, seed=1)
    assert len(view.train) == 9 and len(view.valid) == 6
    rows = {tuple(x.flatten().tolist()) for x in view.train.x}
    assert not rows & {tuple(x.flatten().tolist()) for x in view.valid.x}
    with pytest.raises(WorkbenchError, match="has only 4 training images left after the valid_per_class images"):
        target_view(ds, per_class=5, valid_per_class=2)


def test_resize_and_gray_to_rgb():
    require_shared(MNIST)
    mnist = load_dataset("mnist_test10k")
    view = target_view(mnist, per_class=10, image_size=32, channels=3)
    assert tuple(view.train.x.shape) == (100, 3, 32, 32) and tuple(view.test.x.shape) == (4000, 3, 32, 32)
    assert view.channels == 3 and not view.flip and len(view.mean) == 3
    assert torch.equal(view.train.x[:, 0], view.train.x[:, 1]) and torch.equal(view.train.x[:, 1], view.train.x[:, 2])
    # a constant image stays constant through resizing, in both directions
    const = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(const, 32), torch.full((2, 1, 32, 32), 77, dtype=torch.uint8))
    assert torch.equal(resize_images(const, 14), torch.full((2, 1, 14, 14), 77, dtype=torch.uint8))


def test_rgb_to_gray_uses_luma():
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[0, 0], x[0, 1], x[0, 2] = 100, 200, 50
    assert int(convert_channels(x, 1)[0, 0, 0, 0]) == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)


def test_stats_are_those_of_the_train_split(cifar):
    view = target_view(cifar, per_class=20, image_size=24, seed=0)
    xf = view.train.x.double() / 255
    assert view.mean == pytest.approx(xf.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert view.std == pytest.approx(xf.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-9)
    assert channel_stats(view.train.x) == (view.mean, view.std)
    desc = json.loads(json.dumps(view.to_dict()))
    assert desc["image_size"] == 24 and desc["train"] == 200 and desc["per_class"] == 20 and desc["mean"] == view.mean


def test_bad_arguments():
    ds = _toy()
    for kwargs, pattern in (({"per_class": 0}, "per_class must be a positive integer"),
                            ({"channels": 2}, "channels must be 1 or 3"),
                            ({"pick": "last"}, "pick must be 'random' or 'first'")):
        with pytest.raises(WorkbenchError, match=pattern):
            target_view(ds, **kwargs)
    with pytest.raises(WorkbenchError, match="TensorSplit.x must be a uint8 tensor"):
        TensorSplit(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
