"""The CUDA path (skipped without a GPU; run with ``pytest -m gpu`` where one is): the site against the reference
release and against the CPU, models with phi attached training on the device, meta-training, transfer and
Monte-Carlo evaluation end to end with device=cuda."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import OFFICIAL_OUTPUT
from test_meta_train import synthetic_dataset
from test_transfer import random_phi, synthetic, tiny_config  # noqa: F401 (random_phi: a fixture)
from workbench import MetaPerturb, PerturbSite, attach
from workbench.artifacts import RunStore
from workbench.evaluate import evaluate
from workbench.meta_train import meta_train
from workbench.models import build
from workbench.transfer import transfer

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _site(phi, channels, **kw):
    return PerturbSite(phi, channels, channel_norm=kw.pop("channel_norm", 64), spatial_norm=kw.pop("spatial_norm", 32))


def test_site_on_cuda_reproduces_the_reference_release(official_phi_path):
    ref = np.load(OFFICIAL_OUTPUT)
    phi = MetaPerturb.from_official(official_phi_path).to(CUDA)
    site = _site(phi, 16, channel_norm=float(ref["channel_norm"]), spatial_norm=float(ref["spatial_norm"])).to(CUDA)
    site.clip, site.noise_coeff = float(ref["clip"]), float(ref["noise_coeff"])
    site.train()
    out = site(torch.from_numpy(ref["h"]).to(CUDA), eps=torch.from_numpy(ref["eps"]).to(CUDA))
    assert out.device.type == "cuda"
    assert (out.cpu() - torch.from_numpy(ref["out"])).abs().max().item() < 1e-5
    assert torch.allclose(site.running_mean.cpu(), torch.from_numpy(ref["running_mean"]), atol=1e-6)
    assert torch.allclose(site.running_var.cpu(), torch.from_numpy(ref["running_var"]), atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_site_agrees_with_cpu_in_value_and_every_gradient(training, channels_last):
    torch.manual_seed(3)
    phi_cpu = MetaPerturb(init_std=0.3)
    phi_gpu = MetaPerturb(init_std=0.3)
    phi_gpu.load_state_dict(phi_cpu.state_dict())
    phi_gpu.to(CUDA)
    h = torch.randn(6, 24, 9, 11)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    eps = torch.randn_like(h)
    outs, grads = [], []
    for phi, device in ((phi_cpu, "cpu"), (phi_gpu, "cuda")):
        site = _site(phi, 24).to(device).train(training)
        site.running_mean.fill_(0.2)
        site.clip, site.noise_coeff = 2.0, 0.8
        x = h.to(device).requires_grad_(True)
        out = site(x, eps=eps.to(device))
        loss = (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum()
        params = [x] + [p for p in phi.parameters() if training or p is not phi.scale_kernels]
        grads.append([g.cpu() for g in torch.autograd.grad(loss, params)])
        outs.append((out.detach().cpu(), site.running_mean.cpu(), site.running_var.cpu()))
    for a, b in zip(outs[0], outs[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a - b).abs().max()


def test_noise_is_drawn_on_the_device_and_follows_the_cuda_seed():
    phi = MetaPerturb(init_std=0.3).to(CUDA)
    site = _site(phi, 8).to(CUDA).train()
    h = torch.randn(4, 8, 6, 6, device=CUDA)
    torch.cuda.manual_seed(7)
    first = site(h)
    second = site(h)
    torch.cuda.manual_seed(7)
    again = site(h)
    assert first.device.type == "cuda" and not torch.equal(first, second)
    assert torch.equal(first, again)


@pytest.mark.parametrize("name,size,channels", [("resnet20", 32, 3), ("conv4", 28, 1), ("tv:resnet18", 32, 3)])
def test_attached_models_train_on_cuda_and_detach_exactly(name, size, channels):
    torch.manual_seed(0)
    model = build(name, 10, in_channels=channels, image_size=size).to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(8, channels, size, size, device=CUDA)
    y = torch.randint(0, 10, (8,), device=CUDA)
    model.eval()
    with torch.no_grad():
        before = model(x)
    phi = MetaPerturb(init_std=0.1).to(CUDA)
    handle = attach(model, phi, image_size=size)
    assert not {id(p) for p in phi.parameters()} & {id(p) for p in model.parameters()}
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in phi.parameters())
    assert all(site.running_mean.device.type == "cuda" for site in handle.sites)
    handle.remove()
    assert not any(isinstance(m, PerturbSite) for m in model.modules())
    plain = build(name, 10, in_channels=channels, image_size=size).to(CUDA).to(memory_format=torch.channels_last)
    plain.load_state_dict(model.state_dict())  # strict: no site buffers left behind
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        assert model(x).shape == before.shape


def test_meta_training_on_cuda_changes_phi_and_writes_its_run(tmp_path):
    config = dict(arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=3, checkpoint_every=2, log_every=1,
                  device="cuda", artifacts_root=str(tmp_path / "artifacts"))
    store = RunStore(tmp_path / "artifacts")
    result = meta_train(config, store=store, progress=False, dataset=synthetic_dataset())
    run = store.open_run(result.run_id)
    assert run.status == "finished"
    assert [(r["step"], r["task"]) for r in run.read_metrics("meta_train")] == [(s, t) for s in (1, 2, 3) for t in (0, 1)]
    trajectory = torch.from_numpy(run.load_arrays("phi_trajectory")["phi"])
    assert trajectory.shape == (3, 82) and torch.isfinite(trajectory).all()
    assert not torch.equal(trajectory[0], trajectory[-1])  # phi moved
    assert torch.equal(MetaPerturb.load(result.phi_path).scale_fc.weight, result.phi.scale_fc.weight)


def test_transfer_and_mc_evaluation_on_cuda(tmp_path, random_phi):
    cfg = tiny_config(tmp_path, device="cuda", phi=random_phi, final_mc_samples=3)
    result = transfer(cfg, progress=False, dataset=synthetic())
    s = result.summary
    assert s["steps"] == 3 and s["mc_samples"] == 3 and 0 <= s["test_accuracy"] <= 1 and s["test_nll"] > 0
    model = result.model
    assert next(model.parameters()).device.type == "cuda"
    data = synthetic()
    first = evaluate(model, data.x_test, data.y_test, transform=lambda b: b.float() / 255, samples=4, batch_size=5,
                     device="cuda", seed=3)
    again = evaluate(model, data.x_test, data.y_test, transform=lambda b: b.float() / 255, samples=4, batch_size=5,
                     device="cuda", seed=3)
    assert first.probs.device.type == "cpu" and torch.allclose(first.probs.sum(1), torch.ones(len(data.y_test)))
    assert torch.allclose(first.probs, again.probs)


# ============================================================================================ compiled sites, graphs, bf16
@pytest.mark.parametrize("training", [True, False])
def test_compiled_site_on_cuda_matches_the_reference(training):
    """Inductor's Triton site against the reference transcription: value, running statistics and every gradient
    (phi trained in training mode, as meta-training's held-out pass; frozen in evaluation)."""
    from workbench import compiled
    from workbench.perturb import perturb, reference_perturb

    torch.manual_seed(3)
    phi = MetaPerturb(init_std=0.3).to(CUDA).requires_grad_(training)
    h = torch.randn(6, 24, 9, 11, device=CUDA)
    eps = torch.randn_like(h)
    results = []
    for use_compiled in (True, False):
        x = h.clone().requires_grad_(True)
        rm, rv = torch.full((24, 4), 0.2, device=CUDA), torch.ones(24, 4, device=CUDA)
        if use_compiled:
            out, _, _ = perturb(x, phi, rm, rv, channel_norm=64, spatial_norm=32, training=training, clip=2.0,
                                noise_coeff=0.8, eps=eps, compiled=True)
        else:
            out = reference_perturb(x, phi, rm, rv, channel_norm=64, spatial_norm=32, eps=eps, clip=2.0,
                                    noise_coeff=0.8, training=training)
        loss = (out * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum()
        params = [x] + (list(phi.parameters()) if training else [])
        results.append(([out.detach(), rm, rv], torch.autograd.grad(loss, params)))
    assert compiled.failures() == {}
    for a, b in zip(*(r[0] for r in results)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    for a, b in zip(*(r[1] for r in results)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (a - b).abs().max()


def test_compiled_site_in_bf16_stays_close_to_float32():
    from workbench.perturb import perturb

    torch.manual_seed(4)
    phi = MetaPerturb(init_std=0.3).to(CUDA).requires_grad_(False)
    h = torch.randn(8, 16, 16, 16, device=CUDA)
    eps = torch.randn_like(h)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        rm, rv = torch.zeros(16, 4, device=CUDA), torch.ones(16, 4, device=CUDA)
        out, _, _ = perturb(h.to(dtype), phi, rm, rv, channel_norm=64, spatial_norm=32, training=True, clip=100.0,
                            eps=eps.to(dtype), compiled=True)
        assert out.dtype == dtype
        outs.append(out.float())
    assert torch.isfinite(outs[1]).all()
    assert (outs[0] - outs[1]).abs().max() <= 0.05 * outs[0].abs().max()


def _graph_twin(use_graph: bool, steps: int = 9):
    """A Conv-4 with compiled sites trained ``steps`` steps through ``graphs.TrainStep`` with the noise ramp and a
    learning-rate drop: eagerly or captured. Same seeds either way."""
    from workbench import compiled, graphs
    from workbench.regularizers import build_regularizer

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    torch.cuda.manual_seed(0)
    model = build("conv4", 5, in_channels=1, image_size=28).to(CUDA).to(memory_format=torch.channels_last).train()
    phi = MetaPerturb(init_std=0.2).to(CUDA).requires_grad_(False)
    handle = attach(model, phi, image_size=28)
    handle.set_clip(100.0)
    compiled.set_compiled([model], True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[6], gamma=0.1)
    step = graphs.TrainStep(model, build_regularizer("base"), optimizer, CUDA,
                            graphs=compiled.Decision(use_graph, "test"))
    g = torch.Generator(device=CUDA).manual_seed(1)
    losses = []
    for index in range(steps):
        handle.set_noise_coeff(min(1.0, index / 5))
        x = torch.randn(16, 1, 28, 28, device=CUDA, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (16,), device=CUDA, generator=g)
        loss, _ = step(x, y, index)
        losses.append(float(loss))
        scheduler.step()
    return step, losses, {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_a_graphed_transfer_step_matches_the_eager_step_through_the_noise_ramp_and_the_lr_drop():
    """The captured step replays with the current noise coefficient (a device tensor), the learning rate the
    scheduler wrote in place, and fresh noise from the CUDA generator at the eager stream's offsets."""
    eager_step, eager_losses, eager_state = _graph_twin(False)
    graph_step, graph_losses, graph_state = _graph_twin(True)
    assert eager_step.mode == "eager" and graph_step.mode == "graph"
    assert graph_step.captured.replays == 9 - graph_step.captured.warmup
    assert len(set(graph_losses)) == len(graph_losses)  # every replay its own batch and noise
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for name, value in eager_state.items():
        if value.is_floating_point():
            assert torch.allclose(graph_state[name], value, rtol=1e-4, atol=1e-5), name


def test_transfer_with_compiled_sites_graphs_and_bf16_on_cuda(tmp_path, random_phi, caplog):
    import logging

    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path, device="cuda", phi=random_phi, steps=8, compile_sites="on", cuda_graphs="on",
                          precision=precision, final_mc_samples=3, run_name=f"graphs-{precision}")
        with caplog.at_level(logging.INFO, logger="workbench.graphs"):
            result = transfer(cfg, progress=False, dataset=synthetic())
        assert any("captured the transfer training step" in r.getMessage() for r in caplog.records)
        s = result.summary
        assert s["steps"] == 8 and 0 <= s["test_accuracy"] <= 1 and np.isfinite(s["test_nll"])
        caplog.clear()


def test_meta_training_with_captured_task_steps_matches_the_eager_steps(tmp_path):
    phis = {}
    for graph in ("off", "on"):
        config = dict(arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=10, checkpoint_every=10,
                      log_every=5, device="cuda", compile_sites="on", cuda_graphs=graph,
                      artifacts_root=str(tmp_path / f"artifacts-{graph}"))
        store = RunStore(tmp_path / f"artifacts-{graph}")
        result = meta_train(config, store=store, progress=False, dataset=synthetic_dataset())
        assert store.open_run(result.run_id).status == "finished"
        phis[graph] = torch.cat([p.detach().reshape(-1) for p in result.phi.parameters()])
    assert torch.isfinite(phis["on"]).all()
    # the same noise (the graphs read each task's generator state) and the same batches: only capturable Adam's
    # rounding differs
    assert torch.allclose(phis["on"], phis["off"], rtol=1e-3, atol=1e-5)
