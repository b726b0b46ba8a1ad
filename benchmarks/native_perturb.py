"""One perturbation site, fused native kernel vs the eager path: forward+backward time, side by side (medians).

    python benchmarks/native_perturb.py [--repeats 30] [--threads 1 2] [--shape 128 16 32 32] [--meta]

phi is frozen as during transfer (gradients flow to h only); ``--meta`` also times phi requiring grad.
Then the full training-step ratio of ``perturb_overhead.py`` is measured with ``perturb.perturb`` routed to the
native kernel (``--overhead``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from workbench import MetaPerturb, _native
from workbench import perturb as perturb_module


def site_times(shape, threads: int, repeats: int, meta: bool) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    phi = MetaPerturb().requires_grad_(meta)
    b, c, height, width = shape
    h = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    stats = {name: (torch.zeros(c, 4), torch.ones(c, 4)) for name in ("eager", "native")}
    fns = {"eager": perturb_module.perturb, "native": _native.perturb}

    def step(name):
        rm, rv = stats[name]
        out, _, _ = fns[name](h, phi, rm, rv, channel_norm=64, spatial_norm=32, training=True, clip=100.0)
        out.backward(grad)
        h.grad = None
        for p in phi.parameters():
            p.grad = None

    times = {name: [] for name in fns}
    for _ in range(2):
        for name in fns:
            step(name)
    for _ in range(repeats):
        for name in fns:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    eager_ms, native_ms = (1e3 * statistics.median(times[n]) for n in ("eager", "native"))
    return {"eager_ms": eager_ms, "native_ms": native_ms, "speedup": eager_ms / native_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 16, 32, 32])
    parser.add_argument("--meta", action="store_true", help="also time with phi requiring grad")
    parser.add_argument("--overhead", action="store_true", help="also run perturb_overhead with the native path")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--step-threads", type=int, default=2, help="threads for the --overhead training steps")
    parser.add_argument("--eager-too", action="store_true", help="--overhead: also measure the eager sites, same run")
    args = parser.parse_args()
    if _native.load() is None:
        raise SystemExit("native kernel could not be built")
    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    for meta in (False, True) if args.meta else (False,):
        for threads in args.threads:
            r = site_times(tuple(args.shape), threads, args.repeats, meta)
            print(f"site {tuple(args.shape)} fwd+bwd, {threads} thread(s), phi grad={meta}: eager {r['eager_ms']:.1f} ms"
                  f", native {r['native_ms']:.1f} ms, speedup {r['speedup']:.2f}x")
    if args.overhead:
        import perturb_overhead as overhead  # sibling script (this directory is on sys.path when run as a script)

        eager_perturb = perturb_module.perturb

        def dispatch(h, phi, *a, **kw):
            if _native.available(h, phi):
                return _native.perturb(h, phi, *a, **kw)
            return eager_perturb(h, phi, *a, **kw)

        torch.set_num_threads(args.step_threads)
        for arch, size, channels in [("resnet20", 32, 3), ("conv4", 28, 1)]:
            for name, fn in [("eager", eager_perturb)] * args.eager_too + [("native", dispatch)]:
                perturb_module.perturb = fn
                r = overhead.measure(arch, size, channels, 128, args.steps, torch.channels_last)
                print(f"{arch} step, {args.step_threads} thread(s), {name} sites: plain {r['plain_ms']:.1f} ms, "
                      f"perturbed {r['perturbed_ms']:.1f} ms, ratio {r['ratio']:.2f} ({r['sites']} sites)")
        perturb_module.perturb = eager_perturb
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
