"""Meta-training speed: one meta step for T tasks against 2T plain ResNet-20 training steps, measured side by side.

    python benchmarks/meta_train_speed.py [--tasks 2] [--batch 128] [--rounds 7] [--threads 2] [--device cpu]

A meta step does, per task, a perturbed train step (forward, backward, Adam) and a perturbed held-out pass
(forward, backward to phi only), then phi's step; so 2T plain steps (unperturbed ResNet-20: forward, backward, Adam
on a ready batch) is the budget it is compared with. The meta step includes everything the trainer does per step:
drawing and augmenting both batches of every task, RNG swaps, the reduction, phi's Adam. The two are timed in
alternating rounds and the medians compared; the target is a ratio of at most 1.5 on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data import ImageDataset  # noqa: E402
from workbench.meta_train import MetaTrainConfig, MetaTrainer, prepare_source  # noqa: E402
from workbench.models import build  # noqa: E402


def synthetic_source(num_classes: int, per_class: int, size: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.randint(0, 256, (len(y), 3, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset("synthetic", x, y, x[:num_classes], y[:num_classes], [f"c{i}" for i in range(num_classes)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    classes = 10 * (args.tasks // 2 if args.tasks % 2 == 0 else args.tasks)
    per_class = max(2 * args.batch * 2 // 10 + 1, 60)
    config = MetaTrainConfig(arch=args.arch, num_tasks=args.tasks, batch_size=args.batch, device=str(device),
                             threads=args.threads, split_scheme="original" if args.tasks % 2 == 0 else "paper")
    data = prepare_source(config, synthetic_source(classes, per_class))
    trainer = MetaTrainer(config, data.tasks, device=device, mean=data.mean, std=data.std, flip=data.flip)

    plain = build(args.arch, data.tasks[0].num_classes).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, data.tasks[0].num_classes, (args.batch,), device=device)

    def plain_step() -> None:
        plain.train()
        loss = F.cross_entropy(plain(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    slot = trainer.slots[0]
    train_batch, valid_batch = next(slot.train_iter), next(slot.valid_iter)

    def task_pass() -> None:
        with slot.rng.active():
            trainer.task_step(slot, train_batch)

    def heldout_pass() -> None:
        with slot.rng.active():
            trainer.task_meta_grad(slot, valid_batch)

    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: allocator, kernels, first Adam steps
        plain_step()
        trainer.train_step()
    plain_times, meta_times, task_times, heldout_times = [], [], [], []
    for _ in range(args.rounds):
        plain_times += [timed(plain_step) for _ in range(2 * args.tasks)]
        meta_times.append(timed(trainer.train_step))
        task_times.append(timed(task_pass))
        heldout_times.append(timed(heldout_pass))
    med = statistics.median
    plain_median, meta_median = med(plain_times), med(meta_times)
    ratio = meta_median / (2 * args.tasks * plain_median)
    best_ratio = min(meta_times) / (2 * args.tasks * min(plain_times))
    parts = args.tasks * (med(task_times) + med(heldout_times))
    print(f"device {device}, threads {args.threads}, {args.arch}, batch {args.batch}, T={args.tasks} tasks, "
          f"{args.rounds} rounds")
    print(f"plain {args.arch} training step (median):  {plain_median * 1e3:8.1f} ms")
    print(f"meta step for {args.tasks} tasks (median):    {meta_median * 1e3:8.1f} ms")
    print(f"  perturbed train step (task_step):    {med(task_times) * 1e3:8.1f} ms = "
          f"{med(task_times) / plain_median:.2f} x plain")
    print(f"  held-out pass to phi (task_meta_grad): {med(heldout_times) * 1e3:6.1f} ms = "
          f"{med(heldout_times) / plain_median:.2f} x plain")
    print(f"  orchestration (batches, RNG swaps, reduction, phi step): {(meta_median - parts) * 1e3:.1f} ms "
          f"({(meta_median - parts) / meta_median:+.1%} of the meta step)")
    print(f"ratio meta_step / (2T x plain_step) = {ratio:.3f} (medians; with minima: {best_ratio:.3f}); target <= 1.5")


if __name__ == "__main__":
    main()
