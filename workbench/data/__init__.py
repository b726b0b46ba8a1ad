"""Data: sources (offline npz, Debian Fashion-MNIST, torchvision, image folders), target views, class-disjoint
source tasks, batched augmentation on the training device, and a seeded, resumable batch iterator.

Typical use::

    ds = load_dataset("cifar10")                       # offline copy, found through the data root
    view = target_view(ds, per_class=50, image_size=32)
    aug = Augment.for_view(view)                        # dataset statistics; stats="half" for Normalize(0.5, 0.5)
    batches = BatchIterator(view.train, 128, aug, seed=0, device="cpu")
    x, y = next(batches)

    tasks = source_tasks(load_dataset("tinyimagenet32"), num_tasks=10, scheme="original", seed=0)
    record = describe_tasks(tasks, ds)                  # JSON; tasks_from_description(ds, record) rebuilds them
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from .augment import Augment, default_padding
from .loader import BatchIterator, eval_batches
from .sources import (SOURCES, TORCHVISION, ImageDataset, SourceInfo, available_datasets, check_spec, data_roots,
                      load_dataset, load_fashion_mnist, load_image_folder, load_npz, load_torchvision,
                      register_source, resolve_data_root)
from .tasks import SourceTask, dataset_fingerprint, describe_tasks, source_tasks, tasks_from_description
from .views import TargetView, TensorSplit, channel_stats, convert_channels, resize_images, target_view

__all__ = [
    "Augment", "BatchIterator", "ImageDataset", "SourceInfo", "SourceTask", "TargetView", "TensorSplit", "SOURCES",
    "TORCHVISION", "available_datasets", "channel_stats", "check_spec", "convert_channels", "data_roots",
    "dataset_fingerprint", "default_padding", "describe_tasks", "eval_batches", "load_dataset", "load_fashion_mnist", "load_image_folder",
    "load_npz", "load_torchvision", "register_source", "resize_images", "resolve_data_root", "source_tasks",
    "target_view", "tasks_from_description", "register_cli",
]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = available_datasets(args.data_root)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"data roots searched: {', '.join(str(p) for p in data_roots(args.data_root))}")
    header = f"{'name':<18} {'offline':<8} {'train':>7} {'test':>7} {'classes':>7} {'image':<10} {'flip':<5} where / how"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(map(str, r["image_shape"])) if r["image_shape"] else "-"
        where = r["location"] if r["available"] else r["how_to_get"]
        print(f"{r['name']:<18} {'yes' if r['available'] else 'no':<8} {_fmt(r['train']):>7} {_fmt(r['test']):>7} "
              f"{_fmt(r['num_classes']):>7} {shape:<10} {'yes' if r['flip'] else 'no':<5} {where}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    ds = load_dataset(args.name, root=args.data_root, download=args.download, image_size=args.image_size)
    info = ds.summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, h, w = ds.image_shape
    print(f"{ds.name}: ok ({info['source']})")
    print(f"  train {info['train']:,} images, test {info['test']:,} images, {ds.num_classes} classes")
    print(f"  images {c}x{h}x{w} uint8 ({'gray' if ds.grayscale else 'RGB'}), horizontal flip "
          f"{'valid' if ds.flip else 'off'}")
    print(f"  train images per class: {info['train_per_class_min']}..{info['train_per_class_max']}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench data list`` and ``workbench data check NAME``."""
    from ..cli import add_command

    parser = add_command(subparsers, "data", None, help="list and check datasets",
                         description="List the datasets the workbench knows and check that one loads.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", default=None, metavar="DIR",
                        help="data root (default: $WORKBENCH_DATA, else ../shared/data next to the repo, else "
                             "~/.cache/workbench/data)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_command(sub, "list", _cmd_list, parents=[common], help="datasets, whether each is available offline, counts")
    check = add_command(sub, "check", _cmd_check, parents=[common],
                        help="load and validate one dataset, print its counts")
    check.add_argument("name", help="dataset spec: a name from 'workbench data list', npz:PATH, folder:PATH, tv:NAME")
    check.add_argument("--download", action="store_true", help="let torchvision download a missing tv: dataset")
    check.add_argument("--image-size", type=int, default=None, metavar="N",
                       help="resize variable-size sources (folders, Flowers102, ...) to NxN")
