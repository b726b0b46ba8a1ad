"""Batch iterator: epochs, drop_last, label pairing through augmentation, exact resume from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from workbench.data import Augment, BatchIterator, TensorSplit, eval_batches
from workbench.errors import WorkbenchError


def _labelled_split(n=50, k=10, hw=32):
    """Each image is constant with a value that encodes its label and its position."""
    y = torch.arange(n) % k
    x = (y * 20 + 5).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, hw, hw).contiguous()
    return TensorSplit(x, y)


def _ids_split(n=37):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorSplit(x, torch.arange(n))


def test_epochs_cover_every_image_and_reshuffle():
    split = _ids_split(37)
    it = BatchIterator(split, 10, seed=0, drop_last=False)
    assert it.batches_per_epoch == 4
    epochs = [torch.cat([next(it)[1] for _ in range(4)]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(37))
    assert epochs[0].tolist() != epochs[1].tolist() and it.epoch == 1


def test_drop_last_gives_full_batches_only():
    it = BatchIterator(_ids_split(37), 10, seed=0)
    sizes, seen = [], []
    for _ in range(6):
        x, y = next(it)
        sizes.append(len(y))
        seen.append(y)
        assert torch.equal(x[:, 0, 0, 0], y.float() / 255)  # no augment: x / 255, paired with its label
    assert sizes == [10] * 6 and it.batches_per_epoch == 3 and it.epoch == 1
    assert len(set(torch.cat(seen[:3]).tolist())) == 30  # no image twice within an epoch


def test_labels_stay_paired_through_augmentation():
    split = _labelled_split()
    aug = Augment(32, padding=4, mean=(0.0,), std=(1.0,))
    it = BatchIterator(split, 16, aug, seed=2)
    for _ in range(8):
        x, y = next(it)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and tuple(x.shape) == (16, 3, 32, 32)
        centre = (x[:, 0, 16, 16] * 255).round().long()  # the centre is never padding with pad 4
        assert torch.equal(centre, y * 20 + 5)


def test_resume_gives_the_same_next_batches(tmp_path):
    split = _labelled_split(n=45)
    aug = Augment(32, padding=4, mean=(0.5,), std=(0.5,))
    reference = BatchIterator(split, 8, aug, seed=11)
    for _ in range(7):  # 5 batches per epoch: the saved position is inside the second epoch
        next(reference)
    torch.save({"batches": reference.state_dict()}, tmp_path / "ckpt.pt")
    expected = [next(reference) for _ in range(9)]  # crosses into the third epoch

    state = torch.load(tmp_path / "ckpt.pt", weights_only=True, map_location="cpu")["batches"]
    resumed = BatchIterator(split, 8, aug, seed=999)  # the seed is replaced by the saved generator states
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.index) == (1, 16)
    for (xa, ya), (xb, yb) in zip(expected, (next(resumed) for _ in range(9))):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_seed_changes_order():
    a = BatchIterator(_ids_split(), 8, seed=0)
    b = BatchIterator(_ids_split(), 8, seed=0)
    c = BatchIterator(_ids_split(), 8, seed=1)
    ya, yb, yc = next(a)[1], next(b)[1], next(c)[1]
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)


def test_bad_settings():
    with pytest.raises(WorkbenchError, match=r"batch_size 128 is larger than the split \(37 images\)"):
        BatchIterator(_ids_split(), 128)
    with pytest.raises(WorkbenchError, match="batch_size must be a positive integer"):
        BatchIterator(_ids_split(), 0)
    state = BatchIterator(_ids_split(), 8).state_dict()
    with pytest.raises(WorkbenchError, match=r"saved for \(images, batch_size, drop_last\) = \(37, 8, True\)"):
        BatchIterator(_ids_split(), 4).load_state_dict(state)
    with pytest.raises(WorkbenchError, match="lacks epoch_generator"):
        BatchIterator(_ids_split(), 8).load_state_dict({k: v for k, v in state.items() if k != "epoch_generator"})


def test_eval_batches_cover_the_split_in_order():
    split = _ids_split(37)
    batches = list(eval_batches(split, 10))
    assert [len(y) for _, y in batches] == [10, 10, 10, 7]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(37))
    aug = Augment(4, padding=0, mean=(0.0,), std=(1.0,))
    x, _ = next(eval_batches(split, 5, aug.eval))
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(5) / 255)


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    it = BatchIterator(_labelled_split(), 8, Augment(32))
    next(it)
    assert torch.get_num_threads() == before
