"""Source tasks: class-disjointness, coverage, label remapping, seeds, the JSON record and its rebuild."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.data import ImageDataset, describe_tasks, load_dataset, source_tasks, tasks_from_description
from workbench.errors import WorkbenchError

from helpers import CIFAR10, TINYIMAGENET, require_shared


@pytest.fixture(scope="module")
def tin():
    require_shared(TINYIMAGENET)
    return load_dataset("tinyimagenet32")


def _pooled(ds, use_test=False):
    if use_test:
        return torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])
    return ds.x_train, ds.y_train


def _check_task_contents(task, ds, use_test=False):
    """Images and remapped labels are exactly the pooled images at the recorded indices."""
    x, y = _pooled(ds, use_test)
    classes = torch.tensor(task.classes)
    for split, index in ((task.train, task.train_index), (task.valid, task.valid_index)):
        index = torch.tensor(index)
        assert torch.equal(split.x, x[index])
        assert split.y.min() >= 0 and split.y.max() < task.num_classes
        assert torch.equal(classes[split.y], y[index])  # remapping is consistent with the original labels


def test_original_scheme(tin):
    tasks = source_tasks(tin, num_tasks=10, scheme="original", seed=0)
    assert [t.name for t in tasks] == [f"task{i}" for i in range(10)]
    group_classes = []
    for g in range(5):
        a, b = tasks[2 * g], tasks[2 * g + 1]
        assert a.classes == b.classes == list(range(40 * g, 40 * (g + 1)))  # consecutive labels, as in the code
        assert a.train_index == b.valid_index and a.valid_index == b.train_index  # the halves swap
        assert not set(a.train_index) & set(a.valid_index)
        members = torch.nonzero((tin.y_train >= 40 * g) & (tin.y_train < 40 * (g + 1))).squeeze(1).tolist()
        assert sorted(a.train_index + a.valid_index) == members  # the halves cover the group's images
        assert len(a.train) == len(a.valid) == 1200 and a.num_classes == 40
        group_classes.append(set(a.classes))
        _check_task_contents(a, tin)
        _check_task_contents(b, tin)
    assert all(not group_classes[i] & group_classes[j] for i in range(5) for j in range(i + 1, 5))


def test_paper_scheme_is_class_disjoint_and_covers_everything(tin):
    tasks = source_tasks(tin, num_tasks=10, scheme="paper", seed=0, use_test=True)
    assert len(tasks) == 10 and all(t.num_classes == 20 for t in tasks)
    seen_classes, seen_images = set(), []
    for t in tasks:
        assert not seen_classes & set(t.classes)
        seen_classes |= set(t.classes)
        assert not set(t.train_index) & set(t.valid_index)
        seen_images += t.train_index + t.valid_index
        # stratified halves: 80 pooled images per class -> 40 train, 40 valid
        assert t.train.class_counts(20).tolist() == [40] * 20 and t.valid.class_counts(20).tolist() == [40] * 20
        _check_task_contents(t, tin, use_test=True)
    assert seen_classes == set(range(200))
    assert sorted(seen_images) == list(range(16000))  # every pooled image (12,000 train + 4,000 test) once


def test_seed_reproduces_and_changes_the_split(tin):
    first = source_tasks(tin, num_tasks=4, scheme="paper", seed=7, valid_fraction=0.25)
    again = source_tasks(tin, num_tasks=4, scheme="paper", seed=7, valid_fraction=0.25)
    other = source_tasks(tin, num_tasks=4, scheme="paper", seed=8, valid_fraction=0.25)
    assert [t.train_index for t in first] == [t.train_index for t in again]
    assert [t.train_index for t in first] != [t.train_index for t in other]
    assert all(len(t.valid) == 50 * 15 for t in first)  # 25% of 60 per class, 50 classes per task
    orig = [source_tasks(tin, num_tasks=2, scheme="original", seed=s)[0].train_index for s in (0, 0, 1)]
    assert orig[0] == orig[1] != orig[2]


def test_shuffled_classes_still_partition(tin):
    tasks = source_tasks(tin, num_tasks=8, scheme="paper", seed=1, shuffle_classes=True)
    classes = [c for t in tasks for c in t.classes]
    assert sorted(classes) == list(range(200)) and tasks[0].classes != list(range(25))


def test_description_round_trip(tin):
    tasks = source_tasks(tin, num_tasks=10, scheme="original", seed=5, image_size=16)
    record = json.loads(json.dumps(describe_tasks(tasks, tin)))
    assert record["scheme"] == "original" and record["seed"] == 5 and record["num_tasks"] == 10
    assert record["image_size"] == 16 and record["tasks"][3]["classes"] == list(range(40, 80))
    rebuilt = tasks_from_description(tin, record)
    assert tasks[0].train.x.shape[-1] == 16
    for a, b in zip(tasks, rebuilt):
        assert a.classes == b.classes and torch.equal(a.train.x, b.train.x) and torch.equal(a.valid.y, b.valid.y)


def test_description_refuses_other_data(tin):
    require_shared(CIFAR10)
    record = describe_tasks(source_tasks(tin, num_tasks=2, scheme="original"), tin)
    with pytest.raises(WorkbenchError, match="made from different data"):
        tasks_from_description(load_dataset("cifar10"), record)


def test_class_count_that_cannot_be_split(tin):
    with pytest.raises(WorkbenchError, match=r"200 classes, which cannot be split into 7 tasks .*use num_tasks in \{1, 2, 4, 5"):
        source_tasks(tin, num_tasks=7, scheme="paper")
    with pytest.raises(WorkbenchError, match=r"must be even .* use num_tasks in \{2, 4, 8, 10"):
        source_tasks(tin, num_tasks=9, scheme="original")
    with pytest.raises(WorkbenchError, match="scheme must be 'original' or 'paper'"):
        source_tasks(tin, scheme="random")


def test_too_few_images_per_class():
    x = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    ds = ImageDataset("tiny", x, y, x, y, ["a", "b", "c", "d"])
    with pytest.raises(WorkbenchError, match="too few to split"):
        source_tasks(ds, num_tasks=2, scheme="paper", image_size=None)
