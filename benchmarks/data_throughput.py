"""Is the input path fast enough that the model sets the pace?

Prints images/s of the training input path (epoch sampling, random crop with padding, horizontal flip,
normalisation; CPU, batch 128, 32x32) next to images/s of a ResNet-20 training step (forward, backward, Adam
step; CPU, batch 128) measured in the same run, interleaved round by round so both see the same machine load, and
their ratio. The issue asks for a ratio of at least 20 (the input path costs under 5% of a step).

    .venv/bin/python benchmarks/data_throughput.py [--dataset tinyimagenet32] [--rounds 5] [--threads 2]

Exit status 0 when the ratio is at least --min-ratio (default 20), 1 otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.data import Augment, BatchIterator, channel_stats, load_dataset, source_tasks, target_view
from workbench.errors import WorkbenchError


def _inline_resnet20(num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 (16/32/64 channels, option-A shortcuts), used only if workbench.models is unavailable."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = cout - cin
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x
            if self.stride != 1 or self.pad:
                short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + short)

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build_resnet20(num_classes: int) -> tuple[nn.Module, str]:
    try:
        from workbench.models import build
    except ImportError:
        return _inline_resnet20(num_classes), "inline ResNet-20 (workbench.models not importable)"
    return build("resnet20", num_classes), "workbench.models.build('resnet20')"


def training_split(dataset: str, batch_size: int):
    """The meta-training input (one source task of Tiny ImageNet) or a target view, at 32x32."""
    ds = load_dataset(dataset)
    if dataset == "tinyimagenet32":
        task = source_tasks(ds, num_tasks=10, scheme="original", seed=0, image_size=32)[0]
        return task.train, task.num_classes, f"{dataset} source task 0 ({len(task.train)} images, 40 classes)"
    view = target_view(ds, image_size=32, channels=3)
    return view.train, view.num_classes, f"{dataset} train ({len(view.train)} images)"


def time_data(batches: BatchIterator, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * batches.batch_size / (time.perf_counter() - start)


def time_model(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return n * x.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="tinyimagenet32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-batches", type=int, default=100, help="input-path batches per round")
    parser.add_argument("--model-steps", type=int, default=4, help="training steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-ratio", type=float, default=20.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        split, num_classes, what = training_split(args.dataset, args.batch_size)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mean, std = channel_stats(split.x)
    augment = Augment(32, padding=4, flip=True, mean=mean, std=std)
    batches = BatchIterator(split, args.batch_size, augment, seed=0, device="cpu", drop_last=True)
    model, model_name = build_resnet20(num_classes)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, y = next(batches)

    # warm-up: allocator, kernels, Adam state
    time_data(batches, 10)
    time_model(model, opt, x, y, 2)

    data_rates, model_rates = [], []
    for _ in range(args.rounds):
        data_rates.append(time_data(batches, args.data_batches))
        model_rates.append(time_model(model, opt, x, y, args.model_steps))
    data_rate, model_rate = statistics.median(data_rates), statistics.median(model_rates)
    ratio = data_rate / model_rate

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 32x32, CPU")
    print(f"input  : {what}; sampling + crop(pad 4) + flip + normalise")
    print(f"model  : {model_name}, {num_classes} classes; forward + backward + Adam step")
    print(f"input path     : {data_rate:12,.0f} images/s   (rounds: {', '.join(f'{r:,.0f}' for r in data_rates)})")
    print(f"ResNet-20 step : {model_rate:12,.0f} images/s   (rounds: {', '.join(f'{r:,.0f}' for r in model_rates)})")
    print(f"ratio          : {ratio:12,.1f}x   (required >= {args.min_ratio:g}: {'PASS' if ratio >= args.min_ratio else 'FAIL'})")
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    raise SystemExit(main())
