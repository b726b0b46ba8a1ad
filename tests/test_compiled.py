"""The compiled site, the CUDA-graph step machinery and mixed precision, as far as a CPU can check them.

The compiled site (``workbench.compiled``) runs here through Inductor's CPU backend (``compile_sites="on"``) and is
compared with ``reference_perturb`` and the eager path: outputs, scales, running statistics, gradients to the input
and to phi. Each distinct site form is one Inductor compilation (tens of seconds on a small CPU the first time;
Inductor's cache makes later runs take seconds), so the tests share three forms. CUDA graphs cannot run here: what
is checked is the decision (which path, and the logged reason), the optimizer conversion they need and that the
defaults leave the loops unchanged; ``tests/test_gpu.py`` captures on a device.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from test_meta_train import synthetic_dataset
from test_transfer import random_phi, synthetic, tiny_config  # noqa: F401 (random_phi: a fixture)
from workbench import MetaPerturb, PerturbSite, attach, compiled, graphs
from workbench.errors import WorkbenchError
from workbench.lookahead import twice_differentiable
from workbench.meta_train import MetaTrainConfig, meta_train
from workbench.models import build
from workbench.perturb import perturb, reference_perturb
from workbench.transfer import TransferConfig, transfer

TOL = dict(rtol=1e-5, atol=1e-5)


def _phi(trained: bool) -> MetaPerturb:
    torch.manual_seed(3)
    return MetaPerturb(init_std=0.3).requires_grad_(trained)


def _stats(c: int):
    return torch.full((c, 4), 0.2), torch.full((c, 4), 1.5)


def _assert_close(a, b, what):
    assert torch.allclose(a, b, **TOL), f"{what}: max difference {(a - b).abs().max().item():.3g}"


# ============================================================================================ the site
@pytest.mark.parametrize("training,stencil", [(True, True), (False, True), (True, False)])
def test_compiled_site_matches_the_reference_in_value_scale_statistics_and_gradients(training, stencil, monkeypatch):
    """Training with phi trained (meta-training's held-out pass: gradients to phi) and evaluation with phi frozen
    (transfer's MC prediction: gradients to the input only, as attacks take them), on an NCHW map; the stencil
    form (what every device compiles by default) and, once, the convolution form kept for comparison."""
    monkeypatch.setitem(compiled.STENCIL, "cpu", stencil)
    phi = _phi(trained=training)
    torch.manual_seed(1)
    h = torch.randn(4, 6, 7, 9)
    eps = torch.randn_like(h)
    clip, coeff = (2.0, 0.7) if training else (None, 1.0)
    outs = {}
    for path in ("compiled", "reference"):
        x = h.clone().requires_grad_(True)
        rm, rv = _stats(6)
        if path == "compiled":
            out, scale, summary = perturb(x, phi, rm, rv, channel_norm=64, spatial_norm=32, training=training,
                                          noise_coeff=coeff, clip=clip, eps=eps, compiled=True)
        else:
            out = reference_perturb(x, phi, rm, rv, channel_norm=64, spatial_norm=32, eps=eps, clip=clip,
                                    noise_coeff=coeff, training=training)
            mean, var = (phi.scale_features(x).mean(0), phi.scale_features(x).var(0)) if training else (rm, rv)
            scale = phi.channel_scale(mean, var, 6 / 64, 7 / 32)
            multiplier = 1 + coeff * (scale.view(1, 6, 1, 1) * F.softplus(phi.noise_mean(x) + eps) - 1)
            summary = torch.stack([multiplier.mean(), multiplier.std()])
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        params = [x] + (list(phi.parameters()) if training else [])
        grads = torch.autograd.grad((out * weights).sum(), params)
        outs[path] = (out.detach(), scale.detach(), summary.detach(), rm, rv, grads)
    compiled_, reference = outs["compiled"], outs["reference"]
    for name, a, b in zip(("out", "scale", "multiplier stats", "running mean", "running var"), compiled_, reference):
        _assert_close(a, b, name)
    for index, (a, b) in enumerate(zip(compiled_[5], reference[5])):
        _assert_close(a, b, f"gradient {index}")
    assert compiled.failures() == {}


def test_compiled_sites_in_a_model_match_the_eager_path_with_the_same_seed(monkeypatch):
    """Conv-4's sites take the BatchNorm, the ReLU and the 2x2 max-pool (attach fuses them); with the native CPU
    kernel off, the eager path draws its noise from the global RNG as the compiled site does, so one seed gives the
    same network function: logits, every weight gradient and the running statistics agree."""
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    phi = _phi(trained=False)
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build("conv4_4", 5, in_channels=1, image_size=16).to(memory_format=torch.channels_last)
        handle = attach(model, phi, image_size=16)
        handle.set_noise_coeff(0.6)
        handle.set_clip(3.0)
        assert compiled.set_compiled([model], on) == len(handle.sites) == 4
        model.train()
        x = torch.randn(6, 1, 16, 16).contiguous(memory_format=torch.channels_last)
        y = torch.arange(6) % 5
        torch.manual_seed(11)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (l0, g0, b0), (l1, g1, b1) = results
    _assert_close(l1, l0, "logits")
    for name in g0:
        _assert_close(g1[name], g0[name], f"grad {name}")
    for name in b0:
        if b0[name].is_floating_point():
            _assert_close(b1[name], b0[name], f"buffer {name}")
    assert compiled.failures() == {}


def test_a_tensor_noise_coefficient_runs_the_site_function_eagerly_and_both_stencil_forms_agree():
    """A 0-d tensor coefficient (the CUDA-graph step's) routes a site through ``site_function`` even uncompiled;
    its depthwise-convolution form and its shifted multiply-add form (what Inductor compiles) are the same
    function."""
    phi = _phi(trained=True)
    torch.manual_seed(2)
    h = torch.randn(3, 5, 6, 6).requires_grad_(True)
    eps = torch.randn_like(h)
    rm, rv = _stats(5)
    out, scale, _ = perturb(h, phi, rm, rv, channel_norm=64, spatial_norm=32, training=True,
                            noise_coeff=torch.tensor(0.4), clip=1.5, eps=eps)
    ref = reference_perturb(h, phi, *_stats(5), channel_norm=64, spatial_norm=32, eps=eps, clip=1.5,
                            noise_coeff=0.4)
    _assert_close(out, ref, "out")
    arguments = (h, eps, torch.tensor(0.4), *_stats(5), *phi.function_tensors(), torch.tensor([5 / 64, 6 / 32]),
                 0.1, 1.5, True, True, True, True, True)
    by_convolution = compiled.site_function(*arguments, stencil=False)
    by_stencil = compiled.site_function(*arguments, stencil=True)
    for a, b in zip(by_convolution, by_stencil):
        _assert_close(a, b, "stencil form")
    g_conv = torch.autograd.grad(by_convolution[0].sum(), [h, *phi.parameters()])
    g_sten = torch.autograd.grad(by_stencil[0].sum(), [h, *phi.parameters()])
    for a, b in zip(g_conv, g_sten):
        _assert_close(a, b, "stencil gradient")


def test_the_second_order_lookahead_keeps_compiled_sites_eager(monkeypatch):
    """``twice_differentiable`` (the look-ahead) turns ``fused`` off: the sites never reach the compiled function
    there, and the double backward works."""
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled site was called inside twice_differentiable")

    monkeypatch.setattr(compiled, "perturb", refuse)
    phi = _phi(trained=True)
    site = PerturbSite(phi, 4, channel_norm=64, spatial_norm=32).train()
    site.compiled = True
    h = torch.randn(3, 4, 5, 5, requires_grad=True)
    with twice_differentiable([site]):
        out = site(h)
        (g,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)
        second = torch.autograd.grad(g.sum(), phi.noise1.w_identity)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_a_failed_compilation_is_logged_and_that_site_form_stays_eager(monkeypatch, caplog):
    """No compiler, no Triton, an unsupported op ...: one warning with the reason, the eager path's numbers (the
    failing call itself from the uncompiled site function), and a tensor coefficient (which the eager path cannot
    take) still served by the uncompiled site function."""
    def broken_compile(function, **kwargs):
        def run(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(compiled, "_functions", {})
    monkeypatch.setattr(compiled, "_failed", {})
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    phi = _phi(trained=False)
    h = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(h)
    phi64 = MetaPerturb(init_std=0.3).double().requires_grad_(False)
    phi64.load_state_dict(phi.state_dict())
    with caplog.at_level(logging.WARNING, logger="workbench.compiled"):
        out, _, _ = perturb(h, phi64, *[t.double() for t in _stats(3)], channel_norm=64, spatial_norm=32,
                            training=True, clip=None, eps=eps, compiled=True)
        again, _, _ = perturb(h, phi64, *[t.double() for t in _stats(3)], channel_norm=64, spatial_norm=32,
                              training=True, clip=None, eps=eps, compiled=True)
    eager, _, _ = perturb(h, phi64, *[t.double() for t in _stats(3)], channel_norm=64, spatial_norm=32,
                          training=True, clip=None, eps=eps)
    _assert_close(out, eager, "the failing call (the uncompiled site function)")
    assert torch.equal(again, eager)  # later calls: the eager path itself
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0] and "runs eagerly" in warnings[0]
    assert list(compiled.failures().values()) == ["RuntimeError: InvalidCxxCompiler: no working C++ compiler found"]
    tensor_coeff, _, _ = perturb(h, phi64, *[t.double() for t in _stats(3)], channel_norm=64, spatial_norm=32,
                                 training=True, clip=None, eps=eps, compiled=True,
                                 noise_coeff=torch.tensor(1.0, dtype=torch.float64))
    _assert_close(tensor_coeff, eager, "uncompiled site function")
    bn = torch.nn.BatchNorm2d(3).double().train()
    for _ in range(2):  # the failing call, then the eager path: the BatchNorm is applied once per call
        perturb(h, phi64, *[t.double() for t in _stats(3)], channel_norm=64, spatial_norm=32, training=True,
                eps=eps, compiled=True, batch_norm=bn, relu=True)
    assert int(bn.num_batches_tracked) == 2


# ============================================================================================ the decisions
def test_compile_sites_decision_per_mode_and_device():
    assert compiled.decide("auto", "cpu").on is False
    assert compiled.decide("auto", "cuda").on is True
    assert compiled.decide("on", "cpu").on is True
    assert compiled.decide("off", "cuda").on is False
    assert "cpu" in compiled.decide("auto", "cpu").reason
    with pytest.raises(WorkbenchError, match="compile_sites must be one of"):
        compiled.decide("sometimes", "cpu")


def test_cuda_graphs_decision_and_its_logged_reasons(monkeypatch, caplog):
    model = build("conv4_4", 5, in_channels=1, image_size=16)
    adam = torch.optim.Adam(model.parameters())
    with caplog.at_level(logging.INFO, logger="workbench.graphs"):
        cpu = graphs.decide("auto", "cpu", models=[model], optimizers=[adam], method="metaperturb")
        forced = graphs.decide("on", "cpu", models=[model], optimizers=[adam], method="metaperturb")
    assert not cpu.on and "a cpu device (CUDA graphs need a CUDA device)" in cpu.reason
    assert not forced.on
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, f"workbench run: steps run eagerly ({cpu.reason})") in records
    assert any(level == logging.WARNING and "cuda_graphs=on, but a cpu device" in text for level, text in records)
    assert graphs.decide("off", "cuda").reason == "cuda_graphs=off"
    with pytest.raises(WorkbenchError, match="cuda_graphs must be one of"):
        graphs.decide("always", "cpu")

    # past the device check (as on a GPU machine): what else keeps a run eager
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert graphs.decide("auto", "cuda", models=[model], optimizers=[adam], method="metaperturb").on

    class Branchy(torch.nn.Module):
        data_dependent_control_flow = True

    model.add_module("router", Branchy())
    flagged = graphs.decide("auto", "cuda", models=[model], optimizers=[adam], method="metaperturb")
    assert not flagged.on and "data-dependent control flow (module router" in flagged.reason
    del model.router
    sgd = graphs.decide("auto", "cuda", models=[model], optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])
    assert not sgd.on and "optimizer SGD is not capturable" in sgd.reason
    mixup = graphs.decide("auto", "cuda", models=[model], optimizers=[adam], method="mixup")
    assert not mixup.on and "method 'mixup' is not known to be capture-safe" in mixup.reason
    blocked = graphs.decide("auto", "cuda", blockers={"the look-ahead needs a double backward": True})
    assert not blocked.on and blocked.reason.endswith("the look-ahead needs a double backward")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in graphs.decide("on", "cuda").reason


def test_a_capturable_optimizer_keeps_eager_checkpoints_and_a_device_learning_rate():
    """``make_capturable``: the learning rate is a tensor the scheduler writes in place (a graph reads it), the
    state dict is the eager form, and loading one converts back."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3))
    eager = torch.optim.Adam([weight], lr=1e-3, weight_decay=5e-4)
    eager.zero_grad()
    weight.sum().backward()
    eager.step()
    saved = eager.state_dict()
    optimizer = graphs.make_capturable(torch.optim.Adam([weight], lr=1e-3, weight_decay=5e-4), "cpu")
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.3)
    for _ in range(2):
        optimizer._opt_called = True  # no step on a CPU (capturable Adam needs a device): keep the order warning off
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(3e-4)
    state = optimizer.state_dict()
    assert state["param_groups"][0]["lr"] == pytest.approx(3e-4) and state["param_groups"][0]["capturable"] is False
    optimizer.load_state_dict(saved)
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(1e-3) and group["capturable"]
    with pytest.raises(WorkbenchError, match="cannot be made capturable"):
        graphs.make_capturable(torch.optim.SGD([weight], lr=0.1), "cpu")


# ============================================================================================ the loops
def test_new_options_are_validated_in_one_line():
    for config_class in (TransferConfig, MetaTrainConfig):
        for name, bad in (("compile_sites", "sometimes"), ("cuda_graphs", True), ("precision", "fp16")):
            with pytest.raises(WorkbenchError) as info:
                config_class.from_dict({name: bad})
            assert name in str(info.value) and "\n" not in str(info.value)
        made = config_class()
        made.precision = "fp8"
        with pytest.raises(WorkbenchError, match=r"precision must be one of \['fp32', 'bf16'\], got 'fp8'"):
            made.validate()
    defaults = TransferConfig()
    assert (defaults.compile_sites, defaults.cuda_graphs, defaults.precision) == ("auto", "auto", "fp32")


def test_transfer_chooses_the_step_from_its_options(tmp_path, random_phi):
    """``compile_sites=on`` marks the sites (on a CPU too); graphs stay off on a CPU; with the defaults the step
    is the eager float32 update the loop always ran."""
    from workbench.artifacts import RunStore
    from workbench.transfer import _build

    store = RunStore(tmp_path / "artifacts")
    setup = _build(tiny_config(tmp_path, phi=random_phi), store, synthetic())
    assert setup.train_step.mode == "eager" and setup.train_step.precision == "fp32"
    assert not any(site.compiled for site in setup.regularizer.handle.sites)
    setup = _build(tiny_config(tmp_path, phi=random_phi, compile_sites="on", cuda_graphs="on"), store, synthetic())
    assert all(site.compiled for site in setup.regularizer.handle.sites)
    assert setup.train_step.mode == "eager"  # a CPU device: no capture


def test_bf16_transfer_trains_and_reports_accuracy(tmp_path, random_phi):
    result = transfer(tiny_config(tmp_path, phi=random_phi, precision="bf16", steps=6), progress=False,
                      dataset=synthetic())
    s = result.summary
    assert 0 <= s["test_accuracy"] <= 1 and s["test_nll"] > 0
    rows = result.run.read_metrics("train")
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


@pytest.mark.parametrize("second_order", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_meta_training_runs(tmp_path, second_order):
    """First order, and (slow: autocast under a double backward, eager bf16 ops on a CPU) the look-ahead."""
    config = dict(arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=2, log_every=1, checkpoint_every=2,
                  device="cpu", precision="bf16", second_order=second_order, artifacts_root=str(tmp_path / "artifacts"))
    result = meta_train(config, progress=False, dataset=synthetic_dataset())
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in result.phi.parameters())


@pytest.mark.parametrize("config_class, mutable", [
    ("workbench.transfer:TransferConfig", "workbench.transfer:RESUME_MUTABLE"),
    ("workbench.meta_train:MetaTrainConfig", "workbench.meta_train:RESUME_MUTABLE"),
])
def test_a_resume_may_change_how_sites_run_but_not_the_precision(config_class, mutable):
    import importlib

    from workbench._runtime import config_difference

    def named(ref):
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)

    cls, allowed = named(config_class), named(mutable)
    stored = json.loads(json.dumps(cls().to_dict()))
    assert config_difference(stored, cls.from_dict({"compile_sites": "on", "cuda_graphs": "off"}), allowed) == []
    assert config_difference(stored, cls.from_dict({"precision": "bf16"}), allowed) == ["precision"]
