"""The compiled perturbation site against the other forms, side by side in one process (interleaved, medians).

    python benchmarks/compiled_site.py [--shape 64 16 16 16] [--repeats 30] [--threads 1 2]
    python benchmarks/compiled_site.py --steps-on cuda [--batch 128] [--steps 30] [--tasks 10] [--rounds 5]
                                       [--conv-form]

Default (any machine, meant for the CPU): one site, forward + backward with phi frozen as in transfer (training
mode, clip 100, channels_last map), in four forms: ``compiled`` (``workbench.compiled`` as ``compile_sites=on``
runs it: every stencil as shifted multiply-adds, the form a GPU compiles, here as Inductor's generated C++),
``compiled convs`` (the stencils as oneDNN depthwise convolutions with Inductor's code around them, the comparison
form of ``compiled.STENCIL``), ``native`` (the fused C++ kernel of ``workbench._native``, what a CPU run uses) and
``eager`` (PyTorch ops, ``WORKBENCH_NATIVE=0``). The first call of each compiled form compiles (tens of seconds
on a small CPU; cached by Inductor afterwards) and is not timed. Inductor's C++ runs its loops under OpenMP: on a CPU shared with other work, 2 threads can wait at its
barriers for a descheduled thread, so compare the 1-thread rows there.

``--steps-on cuda`` (what ``gpu_check.sh`` runs): whole training steps at batch ``--batch`` (forward, backward,
Adam; phi frozen, clip 100) for ResNet-20, Conv-4 and WRN-16-4: the plain network eager and as a CUDA graph, the
perturbed network with eager sites, compiled sites, and compiled sites in a CUDA graph, each as a ratio over the
plain eager step (and the graphed perturbed step over the graphed plain one); ``--conv-form`` adds the sites
compiled with convolution calls instead of stencils. Then one meta step for ``--tasks`` tasks (ResNet-20, synthetic
source) with the same three settings of ``compile_sites`` / ``cuda_graphs``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import MetaPerturb, _native, attach, compiled, graphs  # noqa: E402
from workbench._runtime import keep_freed_memory  # noqa: E402
from workbench.models import build  # noqa: E402
from workbench.perturb import perturb  # noqa: E402
from workbench.regularizers import build_regularizer  # noqa: E402
from _sites import site_inputs  # noqa: E402

SITE_FORMS = ("compiled", "compiled convs", "native", "eager")
MODELS = (("resnet20", 32, 3), ("conv4", 28, 1), ("wrn16_4", 32, 3))
STEP_FORMS = ("plain", "plain graph", "eager sites", "compiled sites", "compiled + graph")
CONV_FORM = "compiled convs"  # --conv-form: the sites compiled with convolution calls (compiled.STENCIL off)


# ============================================================================================ one site
def site_times(shape, repeats: int) -> dict[str, float]:
    phi, h, grad, stats = site_inputs(shape, SITE_FORMS)

    def step(form: str) -> None:
        saved, stencil = os.environ.get("WORKBENCH_NATIVE"), compiled.STENCIL["cpu"]
        if form == "eager":
            os.environ["WORKBENCH_NATIVE"] = "0"
        compiled.STENCIL["cpu"] = form != "compiled convs"
        try:
            rm, rv = stats[form]
            out, _, _ = perturb(h, phi, rm, rv, channel_norm=64, spatial_norm=32, training=True, clip=100.0,
                                compiled=form.startswith("compiled"), multiplier_stats=False)
            out.backward(grad)
            h.grad = None
        finally:
            compiled.STENCIL["cpu"] = stencil
            if saved is None:
                os.environ.pop("WORKBENCH_NATIVE", None)
            else:
                os.environ["WORKBENCH_NATIVE"] = saved

    started = time.perf_counter()
    step("compiled")
    step("compiled convs")
    compile_s = time.perf_counter() - started
    for _ in range(3):
        for form in SITE_FORMS:
            step(form)
    times: dict[str, list[float]] = {form: [] for form in SITE_FORMS}
    for _ in range(repeats):
        for form in SITE_FORMS:
            start = time.perf_counter()
            step(form)
            times[form].append(time.perf_counter() - start)
    if compiled.failures():
        raise SystemExit(f"the compiled site fell back to eager: {compiled.failures()}")
    result = {form: 1e3 * statistics.median(times[form]) for form in SITE_FORMS}
    result["compile_s"] = compile_s
    return result


def run_site(args) -> None:
    allocator = keep_freed_memory()
    kernel = _native.isa() if _native.load() is not None else "not built (native = eager)"
    print(f"torch {torch.__version__}, {allocator}; native kernel rows: {kernel}")
    print(f"one site {tuple(args.shape)}, forward + backward, phi frozen, training mode, clip 100, "
          f"{args.repeats} interleaved repeats (medians, ms)")
    print(f"{'threads':>7} " + " ".join(f"{form:>17}" for form in SITE_FORMS)
          + "   compiled/native  convs/native  eager/native  compiled/eager")
    for threads in args.threads:
        torch.set_num_threads(threads)
        ms = site_times(tuple(args.shape), args.repeats)
        print(f"{threads:>7} " + " ".join(f"{ms[form]:>17.2f}" for form in SITE_FORMS)
              + f"   {ms['compiled'] / ms['native']:>14.2f}x {ms['compiled convs'] / ms['native']:>12.2f}x "
                f"{ms['eager'] / ms['native']:>12.2f}x {ms['compiled'] / ms['eager']:>14.2f}x"
              + (f"   (first compiles: {ms['compile_s']:.0f} s, not timed)" if ms["compile_s"] > 5 else ""))


# ============================================================================================ whole steps (GPU)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_forms(device: torch.device, conv_form: bool) -> tuple[str, ...]:
    """The forms timed on ``device`` (the graphed ones need CUDA; on another device the rest is a smoke test)."""
    forms = STEP_FORMS if device.type == "cuda" else tuple(f for f in STEP_FORMS if "graph" not in f)
    return forms + ((CONV_FORM,) if conv_form else ())


def _with_conv_form(run, device: torch.device):
    """``run`` with the sites' stencils compiled as convolution calls."""
    def step():
        before = compiled.STENCIL.get(device.type, True)
        compiled.STENCIL[device.type] = False
        try:
            return run()
        finally:
            compiled.STENCIL[device.type] = before

    return step


def _model_steps(arch: str, size: int, channels: int, batch: int, device: torch.device, conv_form: bool):
    """form -> a zero-argument training step (the graphed ones warm up and capture on their first calls)."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    phi = MetaPerturb().requires_grad_(False).to(device)
    base = build_regularizer("base")
    steps = {}
    for form in _step_forms(device, conv_form):
        model = build(arch, 10, in_channels=channels, image_size=size).to(device)
        model = model.to(memory_format=torch.channels_last).train()
        if form not in ("plain", "plain graph"):
            handle = attach(model, phi, image_size=size)
            handle.set_clip(100.0)
            compiled.set_compiled([model], form != "eager sites")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
        use_graph = form in ("plain graph", "compiled + graph")
        step = graphs.TrainStep(model, base, optimizer, device,
                                graphs=compiled.Decision(use_graph, "benchmark"))
        steps[form] = (lambda step=step: step(x, y, 0))
        if form == CONV_FORM:
            steps[form] = _with_conv_form(steps[form], device)
    return steps


def step_times(arch: str, size: int, channels: int, batch: int, steps: int, device: torch.device,
               conv_form: bool) -> dict:
    runners = _model_steps(arch, size, channels, batch, device, conv_form)
    started = time.perf_counter()
    for _ in range(graphs.WARMUP_CALLS + 2):  # compile, warm up, capture
        for run in runners.values():
            run()
    _sync(device)
    setup_s = time.perf_counter() - started
    times: dict[str, list[float]] = {form: [] for form in runners}
    for _ in range(steps):
        for form, run in runners.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[form].append(time.perf_counter() - start)
    result = {form: 1e3 * statistics.median(values) for form, values in times.items()}
    result["setup_s"] = setup_s
    return result


def _meta_trainer(tasks: int, batch: int, device: torch.device, sites: str, graph: str):
    from workbench.data import ImageDataset
    from workbench.meta_train import MetaTrainConfig, MetaTrainer, prepare_source

    classes = 10 * (tasks // 2 if tasks % 2 == 0 else tasks)
    per_class = max(2 * batch * 2 // 10 + 1, 60)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.randint(0, 256, (len(y), 3, 32, 32), generator=g, dtype=torch.uint8)
    source = ImageDataset("synthetic", x, y, x[:classes], y[:classes], [f"c{i}" for i in range(classes)])
    config = MetaTrainConfig(arch="resnet20", num_tasks=tasks, batch_size=batch, device=str(device),
                             split_scheme="original" if tasks % 2 == 0 else "paper", compile_sites=sites,
                             cuda_graphs=graph)
    data = prepare_source(config, source)
    return MetaTrainer(config, data.tasks, device=device, mean=data.mean, std=data.std, flip=data.flip)


def run_steps(args) -> None:
    device = torch.device(args.steps_on)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"torch {torch.__version__}, {name}, batch {args.batch}, {args.steps} interleaved steps (medians)")
    forms = _step_forms(device, args.conv_form)
    print(f"{'model':<10} " + " ".join(f"{form:>16}" for form in forms) + "   (ms; then / plain eager)")
    for arch, size, channels in MODELS:
        ms = step_times(arch, size, channels, args.batch, args.steps, device, args.conv_form)
        print(f"{arch:<10} " + " ".join(f"{ms[form]:>16.2f}" for form in forms) + f"   (setup {ms['setup_s']:.0f} s)")
        graphed = (f"   graphed perturbed / graphed plain {ms['compiled + graph'] / ms['plain graph']:.2f}x"
                   if "plain graph" in ms else "")
        print(f"{'':<10} " + " ".join(f"{ms[form] / ms['plain']:>15.2f}x" for form in forms) + graphed)
    print(f"meta step, {args.tasks} tasks of ResNet-20, batch {args.batch}, {args.rounds} rounds after warm-up:")
    base = None
    for sites, graph in (("off", "off"), ("on", "off"), ("on", "on"))[: 3 if device.type == "cuda" else 2]:
        trainer = _meta_trainer(args.tasks, args.batch, device, sites, graph)
        started = time.perf_counter()
        for _ in range(graphs.WARMUP_CALLS + 2):
            trainer.train_step()
        _sync(device)
        setup_s = time.perf_counter() - started
        times = []
        for _ in range(args.rounds):
            _sync(device)
            start = time.perf_counter()
            trainer.train_step()
            _sync(device)
            times.append(time.perf_counter() - start)
        median = 1e3 * statistics.median(times)
        base = base or median
        print(f"  compile_sites={sites:<3} cuda_graphs={graph:<3} {median:8.1f} ms  ({median / base:.2f}x the eager "
              f"meta step; setup {setup_s:.0f} s; graphs: {trainer.graphs_decision.reason})")
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 16, 16, 16])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps-on", default=None, help="time whole training steps on this device (e.g. cuda)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conv-form", action="store_true",
                        help="with --steps-on: also time sites compiled with convolution calls (a compilation per "
                             "site width: minutes more)")
    args = parser.parse_args()
    if args.steps_on:
        run_steps(args)
    else:
        run_site(args)


if __name__ == "__main__":
    main()
