"""Transfer speed, measured side by side in one run (torch threads 2 by default).

1. Training step: the MetaPerturb target step (phi frozen and attached, noise coefficient and clip set, Adam step)
   over the Base step, ResNet-20, batch 128, 32x32 images. Target: at most 1.3.
2. Evaluation: K=100 Monte-Carlo evaluation of a test set (1,000 images) over 100 times one evaluation pass of
   the same set (K=1), the perturbed network in both. Target: at most 1.0 (batching must not be slower than a
   loop of single passes). The single pass is the median of passes timed before and after the MC run.

Steps are interleaved (base, perturbed, base, ...) so that both see the same machine load; the ratio of medians
is reported. glibc is told to keep freed memory first, as ``workbench transfer`` does
(``workbench._runtime.keep_freed_memory``; ``--default-malloc`` leaves it): with the default, re-faulted feature
maps made the same step swing by up to 50% between runs. Usage::

    .venv/bin/python benchmarks/transfer_speed.py [--images 1000] [--samples 100] [--steps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench._runtime import keep_freed_memory  # noqa: E402
from workbench.evaluate import DEFAULT_MAX_ROWS, evaluate  # noqa: E402
from workbench.models import build  # noqa: E402
from workbench.perturb import MetaPerturb  # noqa: E402
from workbench.regularizers import NOISE_WARMUP, TRAIN_CLIP, TrainContext, build_regularizer  # noqa: E402
from workbench.transfer import official_phi_path  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(method: str, device: torch.device, phi: MetaPerturb, steps: int):
    torch.manual_seed(0)
    model = build("resnet20", 10, in_channels=3, image_size=32)
    reg = build_regularizer(method)
    ctx = TrainContext(arch="resnet20", num_classes=10, in_channels=3, image_size=32, total_steps=steps,
                       train_size=50000, noise_warmup=NOISE_WARMUP, clip=TRAIN_CLIP, device=device, phi=phi)
    model = reg.prepare(model, ctx).to(device, memory_format=torch.channels_last)  # as workbench.transfer does
    opt = torch.optim.Adam(reg.param_groups(model, 5e-4), lr=1e-3)
    return model, reg, opt


def train_step(model, reg, opt, x, y, step, total):
    model.train()
    reg.on_train_step(model, step, total)
    loss, _ = reg.loss(model, x, y, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_steps(args, device, phi) -> tuple[float, float]:
    total = args.warmup + args.steps
    runs = {m: setup(m, device, phi, total) for m in ("base", "metaperturb")}
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(10, (args.batch,), device=device)
    times = {m: [] for m in runs}
    for step in range(total):
        for method, (model, reg, opt) in runs.items():
            sync(device)
            start = time.perf_counter()
            train_step(model, reg, opt, x, y, args.warmup + step, 2 * total)  # past the ramp: coefficient 1
            sync(device)
            if step >= args.warmup:
                times[method].append(time.perf_counter() - start)
    return statistics.median(times["base"]), statistics.median(times["metaperturb"])


def bench_eval(args, device, phi) -> tuple[float, float]:
    model, reg, _ = setup("metaperturb", device, phi, 1)
    model.train()
    with torch.no_grad():  # running statistics of BN and the sites from a few batches
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32, device=device))
    reg.on_eval(model)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(10, (args.images,))
    transform = lambda b: b.float().div(255).sub(0.5).div(0.5)  # noqa: E731
    common = dict(transform=transform, batch_size=args.eval_batch, device=device, tile_at=reg.tile_at(),
                  max_rows=args.max_rows)
    evaluate(model, x[: args.eval_batch], y[: args.eval_batch], samples=2, **common)  # warm-up

    def timed(samples: int) -> float:
        sync(device)
        start = time.perf_counter()
        evaluate(model, x, y, samples=samples, **common)
        sync(device)
        return time.perf_counter() - start

    # single passes before and after the long MC run, so that both sides of the ratio see the same machine
    singles = [timed(1) for _ in range(args.repeats)]
    mc = timed(args.samples)
    singles += [timed(1) for _ in range(args.repeats)]
    return statistics.median(singles), mc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="test images for the evaluation benchmark")
    parser.add_argument("--samples", type=int, default=100, help="Monte-Carlo samples K")
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per tiled MC forward")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed single evaluation passes before and after the MC run (median of all)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator at its defaults")
    args = parser.parse_args(argv)
    print("allocator: default" if args.default_malloc else keep_freed_memory())
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    path = official_phi_path()
    phi = MetaPerturb.load(path) if path.is_file() else MetaPerturb(init_std=0.1)
    print(f"device {device}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"phi {'official' if path.is_file() else 'random'}")

    base, perturbed = bench_steps(args, device, phi)
    ratio = perturbed / base
    print(f"train step  ResNet-20 batch {args.batch} 32x32: base {base * 1e3:.1f} ms, metaperturb "
          f"{perturbed * 1e3:.1f} ms, ratio {ratio:.3f} (target <= 1.3) {'OK' if ratio <= 1.3 else 'FAIL'}")
    if args.skip_eval:
        return 0
    single, mc = bench_eval(args, device, phi)
    ratio_eval = mc / (args.samples * single)
    print(f"evaluation  {args.images} images: one pass {single:.3f} s, K={args.samples} MC {mc:.2f} s, "
          f"ratio to {args.samples} passes {ratio_eval:.3f} (target <= 1.0) {'OK' if ratio_eval <= 1.0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
