"""Source tasks for meta-training: a source dataset cut into T tasks, each with a train and a held-out part.

Two schemes, both seeded and both described as JSON so a run can save its split and rebuild it exactly:

- ``"original"`` (the released code, ``split_dataset.py``): the classes form ``G = T // 2`` groups of consecutive
  labels; each group's images are randomly halved into A and B (not stratified by class, as in the code); task
  ``2g`` trains on A and holds out B, task ``2g + 1`` swaps them. Pairs of tasks share classes, so the tasks are
  class-disjoint only across groups. T must be even. Tiny ImageNet, 200 classes, T = 10: 5 groups of 40 classes.
- ``"paper"`` ("we class-wisely split the dataset into 10 splits"): the classes form T disjoint groups; within
  each class the images are split (seeded) into train and valid (``valid_fraction``, half by default), so every
  task is class-disjoint from every other one.

The offline ``tinyimagenet32`` has only 60 training images per class (12,000 in all) where the code had 500;
``use_test=True`` pools the source's test split (20 per class) into the images being split, giving 80 per class.
Pooled indices count the train images first, then the test images.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Literal

import numpy as np
import torch

from ..errors import WorkbenchError
from .sources import ImageDataset
from .views import TensorSplit, prepare_images

SPLIT_SCHEMA = 1


@dataclasses.dataclass
class SourceTask:
    """One meta-training task: original class ids, and train/valid images with labels remapped to 0..k-1.

    ``train_index``/``valid_index`` are positions in the pooled source images (train split first, then the test
    split when ``use_test``), so :func:`describe_tasks` can record exactly which images went where.
    """

    name: str
    classes: list[int]
    train: TensorSplit
    valid: TensorSplit
    train_index: list[int]
    valid_index: list[int]
    class_names: list[str] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # how the whole split was made

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """This task's part of the split description: its classes and the pooled indices of each part."""
        return {"name": self.name, "classes": list(self.classes), "class_names": list(self.class_names),
                "train_index": list(self.train_index), "valid_index": list(self.valid_index)}

    def __repr__(self) -> str:
        return (f"SourceTask({self.name!r}, classes={self.num_classes}, train={len(self.train)}, "
                f"valid={len(self.valid)})")


def dataset_fingerprint(ds: ImageDataset) -> str:
    """sha256 of the dataset's arrays (images and labels): a saved split is only rebuilt on the same data."""
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _pool(ds: ImageDataset, use_test: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_test:
        return ds.x_train, ds.y_train
    return torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])


def _valid_task_counts(num_classes: int, original: bool) -> list[int]:
    """Task counts that split ``num_classes`` evenly with at least two classes per task."""
    groups = [g for g in range(1, num_classes // 2 + 1) if num_classes % g == 0]
    return [2 * g for g in groups] if original else groups


def _class_groups(num_classes: int, num_groups: int, rng: np.random.Generator, shuffle: bool) -> list[np.ndarray]:
    order = rng.permutation(num_classes) if shuffle else np.arange(num_classes)
    size = num_classes // num_groups
    return [np.sort(order[g * size:(g + 1) * size]) for g in range(num_groups)]


def _build_task(name: str, classes: np.ndarray, train_idx: np.ndarray, valid_idx: np.ndarray, x: torch.Tensor,
                y: torch.Tensor, ds: ImageDataset) -> SourceTask:
    classes = np.sort(np.asarray(classes, dtype=np.int64))
    lookup = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    lookup[torch.from_numpy(classes)] = torch.arange(len(classes))
    parts = []
    for idx in (np.sort(train_idx), np.sort(valid_idx)):
        index = torch.from_numpy(idx.astype(np.int64))
        labels = lookup[y[index]]
        if (labels < 0).any():
            raise WorkbenchError(f"task {name} holds images whose class is not among its classes; the split "
                                 f"description does not match this dataset")
        parts.append((TensorSplit(x[index], labels), [int(i) for i in idx]))
    (train, train_list), (valid, valid_list) = parts
    return SourceTask(name=name, classes=[int(c) for c in classes], train=train, valid=valid, train_index=train_list,
                      valid_index=valid_list, class_names=[ds.classes[c] for c in classes])


def source_tasks(ds: ImageDataset, num_tasks: int = 10, scheme: Literal["original", "paper"] = "original",
                 seed: int = 0, image_size: int | None = 32, channels: int | None = None, use_test: bool = False,
                 valid_fraction: float = 0.5, shuffle_classes: bool = False) -> list[SourceTask]:
    """Cut ``ds`` into ``num_tasks`` tasks (see the module docstring for the two schemes).

    image_size/channels: resize/convert the source images once (the released code works at 32x32).
    use_test: pool the source's test split with its train split before splitting (more images per class).
    valid_fraction: the held-out share of each class in the ``"paper"`` scheme (the ``"original"`` one halves).
    shuffle_classes: group a seeded permutation of the classes instead of consecutive labels.
    """
    if scheme not in ("original", "paper"):
        raise WorkbenchError(f"scheme must be 'original' or 'paper', got {scheme!r}")
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise WorkbenchError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    k = ds.num_classes
    original = scheme == "original"
    num_groups = num_tasks // 2 if original else num_tasks
    if (original and num_tasks % 2) or num_groups < 1 or k % num_groups or k // num_groups < 2:
        valid = _valid_task_counts(k, original)
        shown = ", ".join(map(str, valid[:12])) + (", ..." if len(valid) > 12 else "")
        why = ("must be even (tasks come in swapped pairs) and num_tasks/2 must divide" if original
               else "must divide")
        raise WorkbenchError(f"{ds.name} has {k} classes, which cannot be split into {num_tasks} tasks with scheme "
                             f"'{scheme}' (num_tasks {why} the class count, leaving at least two classes per task); "
                             f"use num_tasks in {{{shown}}}")
    if not original and not 0.0 < valid_fraction < 1.0:
        raise WorkbenchError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction!r}")

    x, y = _pool(ds, use_test)
    x = prepare_images(x, image_size, channels)
    y_np = y.numpy()
    rng = np.random.default_rng(seed)
    groups = _class_groups(k, num_groups, rng, shuffle_classes)
    tasks: list[SourceTask] = []
    for g, classes in enumerate(groups):
        if original:
            members = np.flatnonzero(np.isin(y_np, classes))
            if len(members) < 2:
                raise WorkbenchError(f"class group {g} of {ds.name} has {len(members)} images; need at least 2 to halve")
            perm = rng.permutation(members)
            half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]
            tasks.append(_build_task(f"task{2 * g}", classes, half_a, half_b, x, y, ds))
            tasks.append(_build_task(f"task{2 * g + 1}", classes, half_b, half_a, x, y, ds))
        else:
            train_parts, valid_parts = [], []
            for cls in classes:
                members = rng.permutation(np.flatnonzero(y_np == cls))
                n_valid = int(round(len(members) * valid_fraction))
                if len(members) < 2 or n_valid < 1 or n_valid >= len(members):
                    raise WorkbenchError(f"class {cls} of {ds.name} has {len(members)} images, too few to split with "
                                         f"valid_fraction={valid_fraction}; use use_test=True or another fraction")
                valid_parts.append(members[:n_valid])
                train_parts.append(members[n_valid:])
            tasks.append(_build_task(f"task{g}", classes, np.concatenate(train_parts), np.concatenate(valid_parts),
                                     x, y, ds))
    for task in tasks:
        task.settings = {"scheme": scheme, "seed": seed, "image_size": image_size, "channels": channels,
                         "use_test": use_test, "valid_fraction": valid_fraction, "shuffle_classes": shuffle_classes}
    return tasks


def describe_tasks(tasks: list[SourceTask], ds: ImageDataset) -> dict[str, Any]:
    """A JSON-able record of a split: settings, the dataset's fingerprint, and each task's classes and indices.

    Save it with the run; :func:`tasks_from_description` rebuilds the identical tasks from it.
    """
    if not tasks:
        raise WorkbenchError("describe_tasks needs at least one task")
    settings = dict(tasks[0].settings)
    return {
        "schema": SPLIT_SCHEMA,
        "dataset": ds.name,
        "fingerprint": dataset_fingerprint(ds),
        "num_tasks": len(tasks),
        **settings,
        "tasks": [t.to_dict() for t in tasks],
    }


def tasks_from_description(ds: ImageDataset, description: dict[str, Any]) -> list[SourceTask]:
    """Rebuild the tasks recorded by :func:`describe_tasks` from their indices (not by re-running the seed)."""
    if not isinstance(description, dict) or "tasks" not in description:
        raise WorkbenchError("task split description lacks 'tasks'; pass the dict written by describe_tasks")
    if description.get("schema") != SPLIT_SCHEMA:
        raise WorkbenchError(f"task split description has schema {description.get('schema')!r}, this version reads "
                             f"{SPLIT_SCHEMA}; rebuild the split with source_tasks")
    if description.get("fingerprint") != dataset_fingerprint(ds):
        raise WorkbenchError(f"the saved task split was made from different data than {ds.name} ({ds.source}); load "
                             f"the dataset the run used ({description.get('dataset')!r}) or rebuild the split")
    x, y = _pool(ds, bool(description.get("use_test", False)))
    x = prepare_images(x, description.get("image_size"), description.get("channels"))
    tasks = []
    for entry in description["tasks"]:
        tasks.append(_build_task(entry["name"], np.asarray(entry["classes"], dtype=np.int64),
                                 np.asarray(entry["train_index"], dtype=np.int64),
                                 np.asarray(entry["valid_index"], dtype=np.int64), x, y, ds))
    settings = {k: description.get(k) for k in ("scheme", "seed", "image_size", "channels", "use_test",
                                                 "valid_fraction", "shuffle_classes")}
    for task in tasks:
        task.settings = dict(settings)
    return tasks
