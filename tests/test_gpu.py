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
