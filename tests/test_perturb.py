import numpy as np
import pytest
import torch

from workbench import MetaPerturb, PerturbSite, WorkbenchError
from workbench.perturb import reference_perturb


def _site(phi, channels=16, **kw):
    return PerturbSite(phi, channels, channel_norm=kw.pop("channel_norm", 64), spatial_norm=kw.pop("spatial_norm", 32), **kw)


def test_phi_has_82_parameters_initialised_small():
    phi = MetaPerturb()
    assert phi.num_parameters == 82
    values = torch.cat([p.detach().flatten() for p in phi.parameters()])
    assert 0.003 < values.std().item() < 0.03


def test_official_release_loads_and_reproduces_reference_output(official_phi_path, official_output_path):
    ref = np.load(official_output_path)
    phi = MetaPerturb.from_official(official_phi_path)
    assert phi.scale_fc.weight.shape == (1, 10)
    assert abs(phi.scale_fc.weight[0, 0].item() - 0.316) < 0.01  # the digest's sanity value
    site = _site(phi, channel_norm=float(ref["channel_norm"]), spatial_norm=float(ref["spatial_norm"]))
    site.clip = float(ref["clip"])
    site.noise_coeff = float(ref["noise_coeff"])
    site.train()
    out = site(torch.from_numpy(ref["h"]), eps=torch.from_numpy(ref["eps"]))
    assert (out - torch.from_numpy(ref["out"])).abs().max().item() < 1e-5
    # running statistics, original convention: the running variance gets a second B/(B-1) factor
    assert torch.allclose(site.running_mean, torch.from_numpy(ref["running_mean"]), atol=1e-6)
    assert torch.allclose(site.running_var, torch.from_numpy(ref["running_var"]), atol=1e-6)


def test_single_bessel_option_differs_by_exactly_the_extra_factor(official_phi_path, official_output_path):
    ref = np.load(official_output_path)
    phi = MetaPerturb.from_official(official_phi_path)
    double, single = _site(phi), _site(phi, double_bessel=False)
    h, eps = torch.from_numpy(ref["h"]), torch.from_numpy(ref["eps"])
    double(h, eps=eps)
    single(h, eps=eps)
    b = h.shape[0]
    assert torch.allclose((double.running_var - 0.9) * (b - 1) / b, single.running_var - 0.9, atol=1e-7)


def test_fast_path_matches_reference_transcription_in_both_modes_and_gradients():
    torch.manual_seed(1)
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(6, 5, 9, 7, dtype=torch.float64, requires_grad=True)
    eps = torch.randn_like(h)
    phi = phi.double()
    for training in (True, False):
        site = _site(phi.double(), 5, channel_norm=16, spatial_norm=9).double()
        site.train(training)
        site.running_mean.uniform_(0, 1)
        rm, rv = site.running_mean.clone(), site.running_var.clone()
        site.clip = 1.5
        site.noise_coeff = 0.7
        out = site(h, eps=eps)
        ref = reference_perturb(h, phi, rm, rv, channel_norm=16, spatial_norm=9, eps=eps, clip=1.5,
                                noise_coeff=0.7, training=training)
        assert torch.allclose(out, ref, atol=1e-10)
        assert torch.allclose(site.running_var, rv, atol=1e-12)
        # in eval mode the scale kernels are unused (running statistics replace the batch features)
        g_fast = torch.autograd.grad(out.square().sum(), [h, *phi.parameters()], allow_unused=True)
        g_ref = torch.autograd.grad(ref.square().sum(), [h, *phi.parameters()], allow_unused=True)
        assert [g is None for g in g_fast] == [g is None for g in g_ref]
        assert sum(g is None for g in g_ref) == (0 if training else 1)
        for a, b in zip(g_fast, g_ref):
            assert a is None or torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("shape", [(4, 1, 5, 5), (3, 7, 11, 4), (2, 64, 8, 8), (5, 3, 1, 1)])
def test_any_channel_count_and_spatial_size(shape):
    phi = MetaPerturb(init_std=0.2)
    site = _site(phi, shape[1])
    h = torch.randn(shape)
    out = site(h)
    assert out.shape == h.shape and torch.isfinite(out).all()
    assert site.last_scale.shape == (shape[1],)
    site.eval()
    assert site(h[:1]).shape == (1,) + shape[1:]


def test_channel_permutation_equivariance():
    torch.manual_seed(3)
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(4, 6, 8, 8)
    eps = torch.randn_like(h)
    perm = torch.randperm(6)
    mu = phi.noise_mean(h)
    assert torch.allclose(phi.noise_mean(h[:, perm]), mu[:, perm], atol=1e-6)
    a, b = _site(phi, 6), _site(phi, 6)
    out = a(h, eps=eps)
    out_perm = b(h[:, perm], eps=eps[:, perm])
    assert torch.allclose(out_perm, out[:, perm], atol=1e-6)
    assert torch.allclose(b.last_scale, a.last_scale[perm], atol=1e-7)
    assert torch.allclose(b.running_mean, a.running_mean[perm])
    # and the scale is not trivially constant over channels
    assert a.last_scale.std() > 0


def test_eval_mode_uses_running_statistics_and_still_draws_noise():
    phi = MetaPerturb(init_std=0.3)
    site = _site(phi, 4)
    h = torch.randn(8, 4, 6, 6)
    site(h)
    stats = site.running_mean.clone()
    site.eval()
    eps = torch.randn_like(h)
    one = site(h[:2], eps=eps[:2])
    batch = site(h, eps=eps)
    assert torch.allclose(one, batch[:2], atol=1e-6)  # no dependence on the rest of the batch
    assert torch.equal(site.running_mean, stats)  # not updated in eval mode
    assert not torch.equal(site(h), site(h))  # noise is drawn in eval mode too


def test_noise_coeff_zero_is_identity_and_clip_bounds_output():
    phi = MetaPerturb(init_std=0.3)
    site = _site(phi, 3)
    h = torch.randn(4, 3, 5, 5) * 50
    site.noise_coeff = 0.0
    assert torch.allclose(site(h), h)
    site.noise_coeff = 1.0
    site.clip = 2.0
    assert site(h).max() <= 2.0
    site.active = False
    assert site(h) is h


def test_phi_gets_gradients_through_a_site_but_is_not_a_site_parameter():
    phi = MetaPerturb()
    site = _site(phi, 4)
    assert list(site.parameters()) == []
    site(torch.randn(3, 4, 6, 6)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())


def test_site_buffers_round_trip_through_state_dict():
    phi = MetaPerturb()
    site = _site(phi, 4)
    site(torch.randn(3, 4, 6, 6))
    state = site.state_dict()
    assert set(state) == {"running_mean", "running_var"}
    other = _site(phi, 4)
    other.load_state_dict(state)
    assert torch.equal(other.running_var, site.running_var)


def test_save_and_load_round_trip(tmp_path):
    phi = MetaPerturb(init_std=0.5)
    path = phi.save(tmp_path / "phi.pt", source="test")
    again = MetaPerturb.load(path)
    for a, b in zip(phi.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp*"))


def test_load_detects_official_format(official_phi_path):
    a = MetaPerturb.load(official_phi_path)
    b = MetaPerturb.from_official(official_phi_path)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"weight": torch.zeros(3)}, "not a phi file"),
        ({"kernel": torch.zeros(4, 1, 3, 3)}, "not a MetaPerturb release"),
        ({"format": "workbench.metaperturb", "version": 99, "state_dict": {}}, "format version 99"),
    ],
)
def test_bad_phi_files_give_one_line_errors(tmp_path, payload, message):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(WorkbenchError, match=message) as info:
        MetaPerturb.load(path)
    assert "\n" not in str(info.value)


def test_wrong_shapes_and_garbage_files(tmp_path, official_phi_path):
    state = torch.load(official_phi_path, map_location="cpu", weights_only=True)
    state["fc.weight"] = torch.zeros(1, 12)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(WorkbenchError, match="shape"):
        MetaPerturb.load(tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WorkbenchError, match="cannot read phi file"):
        MetaPerturb.load(tmp_path / "junk.pt")
    with pytest.raises(WorkbenchError, match="does not exist"):
        MetaPerturb.load(tmp_path / "missing.pt")


def test_bad_feature_maps_and_eps():
    site = _site(MetaPerturb(), 4)
    with pytest.raises(WorkbenchError, match=r"\(B, C, H, W\)"):
        site(torch.randn(2, 4, 5))
    with pytest.raises(WorkbenchError, match="built for 4 channels"):
        site(torch.randn(2, 3, 5, 5))
    with pytest.raises(WorkbenchError, match="eps has shape"):
        site(torch.randn(2, 4, 5, 5), eps=torch.randn(2, 4, 5, 4))
    with pytest.raises(WorkbenchError, match="batch of at least 2"):
        site(torch.randn(1, 4, 5, 5))


def test_plain_autograd_form_equals_fused_form_and_is_twice_differentiable():
    torch.manual_seed(4)
    phi = MetaPerturb(init_std=0.3).double()
    h = torch.randn(4, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    eps = torch.randn_like(h)
    fused, plain = _site(phi, 3).double(), _site(phi, 3).double()
    plain.fused = False
    for site in (fused, plain):
        site.clip, site.noise_coeff = 2.0, 0.6
    a, b = fused(h, eps=eps), plain(h, eps=eps)
    assert torch.allclose(a, b, atol=1e-12)
    (grad,) = torch.autograd.grad(b.square().sum(), h, create_graph=True)
    assert grad.requires_grad  # a second derivative exists
    assert torch.allclose(grad, torch.autograd.grad(a.square().sum(), h)[0], atol=1e-10)


def test_noise_draw_is_reproducible_and_independent_of_thread_count():
    from workbench._fused import standard_normal

    like = torch.empty(16, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    draws = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(7)
        draws.append(standard_normal(like))
    assert torch.equal(draws[0], draws[1])
    assert draws[0].is_contiguous(memory_format=torch.channels_last)
    assert abs(draws[0].mean().item()) < 0.01 and abs(draws[0].std().item() - 1) < 0.01


@pytest.mark.parametrize("native", ["0", "1"])
def test_clipped_site_followed_by_inplace_relu_trains(native, monkeypatch):
    monkeypatch.setenv("WORKBENCH_NATIVE", native)
    phi = MetaPerturb(init_std=0.3)
    h = (torch.randn(3, 4, 6, 6) * 3).requires_grad_(True)
    eps = torch.randn_like(h)
    grads = []
    for relu in (torch.relu_, torch.relu):  # the in-place ReLU must not corrupt what the backward saved
        site = _site(phi, 4)
        site.clip = 0.5
        (grad,) = torch.autograd.grad(relu(site(h, eps=eps)).sum(), h)
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_channel_scale_is_the_linear_map_of_the_ten_inputs_in_value_and_gradient():
    torch.manual_seed(2)
    phi = MetaPerturb(init_std=0.5).double()
    mean = torch.rand(7, 4, dtype=torch.float64, requires_grad=True)
    var = torch.rand(7, 4, dtype=torch.float64, requires_grad=True)
    inputs = torch.cat([mean, var, torch.tensor([[0.25, 0.875]], dtype=torch.float64).expand(7, 2)], dim=1)
    expected = torch.sigmoid(inputs @ phi.scale_fc.weight[0])
    got = phi.channel_scale(mean, var, 0.25, 0.875)
    assert got.shape == (7,) and torch.allclose(got, expected, atol=1e-12)
    weights = torch.linspace(-1, 1, 7, dtype=torch.float64)
    g_got = torch.autograd.grad((got * weights).sum(), [mean, var, phi.scale_fc.weight])
    g_expected = torch.autograd.grad((expected * weights).sum(), [mean, var, phi.scale_fc.weight])
    for a, b in zip(g_got, g_expected):
        assert torch.allclose(a, b, atol=1e-12)


def test_multiplier_statistics_as_a_tensor_equal_the_dict():
    site = _site(MetaPerturb(init_std=0.3), 16)
    assert site.last_multiplier_stats is None and site.last_multiplier_stats_tensor() is None
    site.train()
    site(torch.randn(4, 16, 6, 6))
    t, d = site.last_multiplier_stats_tensor(), site.last_multiplier_stats
    assert t.shape == (2,) and d == {"mean": t[0].item(), "std": t[1].item()} and d["std"] > 0
