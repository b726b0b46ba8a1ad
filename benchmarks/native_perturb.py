"""One perturbation site, forward+backward, in its three CPU forms side by side (interleaved, medians):

* ``eager``: PyTorch ops only (``WORKBENCH_NATIVE=0``: depthwise convolutions and the fused noise tail);
* ``two sweeps``: the native kernel's general form (any phi, kernel gradients included);
* ``native``: what ``perturb`` dispatches to, the fused site when phi is frozen on an AVX-512 CPU.

    python benchmarks/native_perturb.py [--repeats 30] [--threads 1 2] [--shape 128 16 32 32] [--meta]

phi is frozen as during transfer (gradients flow to h only); ``--meta`` also times phi requiring grad (then
``two sweeps`` and ``native`` are the same form). The training-step ratio is ``perturb_overhead.py``'s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _sites import site_inputs  # noqa: E402
from workbench._runtime import keep_freed_memory
from workbench import _native
from workbench import perturb as perturb_module

FORMS = ("eager", "two sweeps", "native")


def call_in_form(form: str, *args, **kwargs):
    """perturb_module.perturb with the native kernel off (eager), without fusing (two sweeps), or as dispatched."""
    saved_env, saved_fuse = os.environ.get("WORKBENCH_NATIVE"), _native.fuse_frozen_sites
    try:
        if form == "eager":
            os.environ["WORKBENCH_NATIVE"] = "0"
        _native.fuse_frozen_sites = form == "native"
        return perturb_module.perturb(*args, **kwargs)
    finally:
        _native.fuse_frozen_sites = saved_fuse
        if saved_env is None:
            os.environ.pop("WORKBENCH_NATIVE", None)
        else:
            os.environ["WORKBENCH_NATIVE"] = saved_env


def site_times(shape, threads: int, repeats: int, meta: bool) -> dict:
    torch.set_num_threads(threads)
    phi, h, grad, stats = site_inputs(shape, FORMS, phi_grad=meta)

    def step(form):
        rm, rv = stats[form]
        out, _, _ = call_in_form(form, h, phi, rm, rv, channel_norm=64, spatial_norm=32, training=True, clip=100.0)
        out.backward(grad)
        h.grad = None
        for p in phi.parameters():
            p.grad = None

    times = {form: [] for form in FORMS}
    for _ in range(2):
        for form in FORMS:
            step(form)
    for _ in range(repeats):
        for form in FORMS:
            start = time.perf_counter()
            step(form)
            times[form].append(time.perf_counter() - start)
    return {form: 1e3 * statistics.median(times[form]) for form in FORMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 16, 32, 32])
    parser.add_argument("--meta", action="store_true", help="also time with phi requiring grad")
    args = parser.parse_args()
    allocator = keep_freed_memory()
    if _native.load() is None:
        raise SystemExit("native kernel could not be built")
    print(f"torch {torch.__version__}; {allocator}; kernel rows: {_native.isa()}")
    for meta in (False, True) if args.meta else (False,):
        for threads in args.threads:
            ms = site_times(tuple(args.shape), threads, args.repeats, meta)
            print(f"site {tuple(args.shape)} fwd+bwd, {threads} thread(s), phi grad={meta}: "
                  + ", ".join(f"{form} {ms[form]:.1f} ms" for form in FORMS)
                  + f"; eager / native {ms['eager'] / ms['native']:.2f}x, "
                    f"two sweeps / native {ms['two sweeps'] / ms['native']:.2f}x")


if __name__ == "__main__":
    main()
