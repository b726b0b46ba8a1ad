"""Training-step time with phi attached over the plain step, measured side by side (interleaved, medians).

    python benchmarks/perturb_overhead.py [--steps 15] [--threads 2] [--batch 128] [--device cpu|cuda]
                                          [--batch-norm-apart]

Both networks train in channels_last, the faster layout for the plain network too, so the ratio is the honest cost
of the perturbation. phi is frozen as during transfer (no gradient for phi; gradients flow through the sites).
Target: ratio <= 1.3 for ResNet-20 at 32x32 and Conv-4 at 28x28 (CPU, 2 threads). On the CPU kernel, Conv-4's
sites also take the BatchNorm in front of them (``workbench.attach``); ``--batch-norm-apart`` adds a Conv-4 row with
that BatchNorm left to ATen, as in the plain step, to show what the fusion saves (not counted in the worst ratio). ``--device cuda`` times the same
steps on a GPU (synchronised; the sites then run the eager path, cuDNN depthwise convolutions).
glibc is told to keep freed memory first, as the training stages do (``workbench._runtime.keep_freed_memory``;
``--default-malloc`` leaves it as it is): with the default, page faults of re-allocated maps made the same step swing
by up to 50% between runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from workbench._runtime import keep_freed_memory
from workbench import MetaPerturb, _native, attach
from workbench.models import build


def make_step(model, x, y):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sync()

    return step


def measure(arch: str, image_size: int, in_channels: int, batch: int, steps: int, memory_format,
            device: torch.device) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, in_channels, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)

    def network():
        model = build(arch, 10, in_channels=in_channels, image_size=image_size)
        return model.to(device).to(memory_format=memory_format).train()

    plain, perturbed = network(), network()
    phi = MetaPerturb().requires_grad_(False).to(device)
    handle = attach(perturbed, phi, image_size=image_size)
    handle.set_clip(100.0)
    steps_by_name = {"plain": make_step(plain, x, y), "perturbed": make_step(perturbed, x, y)}
    times = {name: [] for name in steps_by_name}
    for _ in range(3):
        for step in steps_by_name.values():
            step()
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    plain_s, perturbed_s = statistics.median(times["plain"]), statistics.median(times["perturbed"])
    return {"arch": arch, "size": image_size, "plain_ms": 1e3 * plain_s, "perturbed_ms": 1e3 * perturbed_s,
            "ratio": perturbed_s / plain_s, "sites": len(handle.sites)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--nchw", action="store_true", help="also measure the NCHW layout, for comparison")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator at its defaults")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-norm-apart", action="store_true",
                        help="also time Conv-4 with its BatchNorms outside the fused sites (informational)")
    args = parser.parse_args()
    device = torch.device(args.device)
    allocator = "allocator: default" if args.default_malloc else keep_freed_memory()
    torch.set_num_threads(args.threads)
    layouts = [("channels_last", torch.channels_last)] + ([("nchw", torch.contiguous_format)] if args.nchw else [])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}, {args.steps} interleaved steps")
    probe = torch.empty(1, 1, 1, 1, device=device)
    kernel = _native.isa() if _native.available(probe, MetaPerturb().to(device)) else "eager (no native kernel)"
    print(f"{allocator}; perturbation kernel rows: {kernel}")
    print(f"{'model':<16} {'layout':<14} {'sites':>5} {'plain ms':>9} {'perturbed ms':>13} {'ratio':>6}")
    worst = 0.0
    rows = [("resnet20", 32, 3, True), ("conv4", 28, 1, True)]
    if args.batch_norm_apart:
        rows.append(("conv4", 28, 1, False))
    for arch, size, channels, fuse_batch_norm in rows:
        for layout_name, layout in layouts:
            _native.fuse_batch_norm = fuse_batch_norm
            try:
                r = measure(arch, size, channels, args.batch, args.steps, layout, device)
            finally:
                _native.fuse_batch_norm = True
            if layout is torch.channels_last and fuse_batch_norm:
                worst = max(worst, r["ratio"])
            label = arch if fuse_batch_norm else f"{arch} (BN apart)"
            print(f"{label:<16} {layout_name:<14} {r['sites']:>5} {r['plain_ms']:>9.1f} {r['perturbed_ms']:>13.1f} "
                  f"{r['ratio']:>6.2f}")
    print(f"worst ratio (channels_last): {worst:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
