"""The fused C++ perturbation kernel (workbench._native) against the eager path and the authors' reference output."""
import contextlib
import inspect
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench import MetaPerturb, PerturbSite, WorkbenchError, _native
from workbench import perturb as perturb_module
from workbench.perturb import reference_perturb


def _missing_build_tools() -> list:
    """What building the kernel needs and this machine lacks: a C++ compiler, and ninja (the pip package's counts)."""
    _native._put_ninja_on_path()
    missing = [] if shutil.which("c++") or shutil.which("g++") else ["a C++ compiler (c++ or g++)"]
    return missing + ([] if shutil.which("ninja") else ["ninja"])


BUILT = _native.load() is not None
if not BUILT and _missing_build_tools():  # only a machine without the tools may skip the kernel's tests
    pytest.skip(f"no native kernel: this machine lacks {' and '.join(_missing_build_tools())}",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _needs_the_kernel(request):
    """A kernel that fails to build where the tools are fails test_kernel_builds_where_the_tools_are, with the build
    error; the tests that need the kernel are skipped then, not failed one by one."""
    if not BUILT and request.node.name != "test_kernel_builds_where_the_tools_are":
        pytest.skip("the native kernel did not build: see test_kernel_builds_where_the_tools_are")


def test_kernel_builds_where_the_tools_are():
    assert BUILT, ("the native perturbation kernel did not build although a C++ compiler and ninja are present:\n"
                   f"{_native.build_error()}")


def _native_must_not_run(*args, **kwargs):
    raise AssertionError("the eager case reached the native kernel")


@contextlib.contextmanager
def _eager_only():
    """The eager path for real: WORKBENCH_NATIVE=0 (read on every call) turns the kernel off for perturb.perturb, and
    _native.perturb, replaced by a failure meanwhile, proves that nothing inside reaches the kernel."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_NATIVE", "0")
        patch.setattr(_native, "perturb", _native_must_not_run)
        yield


def eager_perturb(*args, **kwargs):
    """perturb.perturb on its eager path (see _eager_only); its backward is plain autograd, no kernel either."""
    with _eager_only():
        return perturb_module.perturb(*args, **kwargs)


SHAPES = [(3, 5, 9, 7), (2, 3, 1, 6), (2, 1, 1, 1), (4, 7, 6, 10), (2, 16, 5, 5)]


def _call(fn, h, phi, rm, rv, training, eps, clip=1.5, k=0.7, **kw):
    return fn(h, phi, rm, rv, channel_norm=16, spatial_norm=9, training=training, noise_coeff=k, clip=clip, eps=eps,
              **kw)


def _stats(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, 4, generator=g), torch.rand(c, 4, generator=g) + 0.5


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_official_reference_output_and_running_stats(official_phi_path, official_output_path):
    ref = np.load(official_output_path)
    phi = MetaPerturb.from_official(official_phi_path)
    h, eps = torch.from_numpy(ref["h"]), torch.from_numpy(ref["eps"])
    rm, rv = torch.zeros(16, 4), torch.ones(16, 4)
    out, scale, _ = _native.perturb(h, phi, rm, rv, channel_norm=float(ref["channel_norm"]),
                                    spatial_norm=float(ref["spatial_norm"]), training=True,
                                    noise_coeff=float(ref["noise_coeff"]), clip=float(ref["clip"]), eps=eps)
    assert out.shape == h.shape and out.is_contiguous()
    assert (out - torch.from_numpy(ref["out"])).abs().max().item() < 1e-5
    assert torch.allclose(rm, torch.from_numpy(ref["running_mean"]), atol=1e-6)
    assert torch.allclose(rv, torch.from_numpy(ref["running_var"]), atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_transcription(shape, training):
    torch.manual_seed(1)
    phi = MetaPerturb(init_std=0.3)
    h, eps = 3 * torch.randn(shape), torch.randn(shape)
    rm, rv = _stats(shape[1])
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out, scale, mult = _call(_native.perturb, h, phi, rm, rv, training, eps)
    with torch.no_grad():
        ref = reference_perturb(h, phi, rm_ref, rv_ref, channel_norm=16, spatial_norm=9, eps=eps, clip=1.5,
                                noise_coeff=0.7, training=training)
    assert (out - ref).abs().max().item() < 1e-5
    if h.numel() > 50:
        assert (ref < 1.5).any() and (ref == 1.5).any()  # the clip is exercised
    assert torch.allclose(rm, rm_ref, atol=1e-6) and torch.allclose(rv, rv_ref, atol=1e-6)
    assert mult.shape == h.shape and torch.allclose(torch.minimum(h * mult, torch.tensor(1.5)), out, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_eager_autograd(shape, training):
    torch.manual_seed(2)
    phi = MetaPerturb(init_std=0.3)
    h = (3 * torch.randn(shape)).requires_grad_(True)  # large enough that clip=1.5 cuts some outputs
    eps, weight = torch.randn(shape), torch.randn(shape)
    params = list(phi.parameters())
    grads = []
    for fn in (eager_perturb, _native.perturb):
        rm, rv = _stats(shape[1])
        out, _, _ = _call(fn, h, phi, rm, rv, training, eps)
        grads.append(torch.autograd.grad((out * weight).sum(), [h, *params], allow_unused=True))
    for name, eager, native in zip(["h"] + [n for n, _ in phi.named_parameters()], *grads):
        assert (eager is None) == (native is None), name
        if eager is not None:
            assert _rel(native, eager) < 1e-4, name
    assert (grads[1][params.index(phi.scale_kernels) + 1] is None) == (not training)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_frozen_phi_layouts_and_site_dispatch(monkeypatch, layout):
    torch.manual_seed(3)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = torch.randn(4, 6, 8, 5).contiguous(memory_format=layout).requires_grad_(True)
    eps = torch.randn(h.shape)
    sites = []
    outs, grads = [], []
    for native in (False, True):
        if native:
            # the site's call straight into the kernel, with the options the kernel takes (not the dispatch's own)
            takes = set(inspect.signature(_native.perturb).parameters)
            monkeypatch.setattr(perturb_module, "perturb", lambda *args, **kwargs: _native.perturb(
                *args, **{k: v for k, v in kwargs.items() if k in takes}))
        site = PerturbSite(phi, 6, channel_norm=64, spatial_norm=8)
        site.noise_coeff, site.clip = 0.5, 2.0
        with contextlib.nullcontext() if native else _eager_only():
            out = site(h, eps=eps)
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), h)[0])
        sites.append(site)
    assert outs[1].is_contiguous(memory_format=layout)
    assert torch.allclose(outs[1], outs[0], atol=1e-5)
    assert _rel(grads[1], grads[0]) < 1e-4
    assert torch.allclose(sites[1].running_var, sites[0].running_var, atol=1e-6)
    assert sites[1].last_multiplier_stats is not None


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(4)
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(3, 5, 12, 9, requires_grad=True)

    def run():
        torch.manual_seed(9)
        out, _, _ = _call(_native.perturb, h, phi, *_stats(5), True, None)
        return (out.detach(), *torch.autograd.grad(out.sum(), [h, *phi.parameters()]))

    _same_at_every_thread_count(run, counts=(1, 2))


def test_drawn_noise_is_standard_normal_and_reproducible():
    torch.manual_seed(5)
    like = torch.empty(64, 16, 32, 32)
    noise = _native.standard_normal(like)
    assert noise.shape == like.shape
    values = noise.flatten().double()
    assert abs(values.mean().item()) < 0.005 and abs(values.std().item() - 1) < 0.005
    inside_one_sigma = (values.abs() < 1).double().mean().item()
    assert abs(inside_one_sigma - 0.6827) < 0.003
    assert abs((values.abs() > 3).double().mean().item() - 0.0027) < 0.0005
    assert abs((values ** 4).mean().item() - 3) < 0.05  # kurtosis of a normal
    # neighbours are uncorrelated, and so are the two normals of one Box-Muller pair (elements l and l + 16 of each
    # block of 32), which are independent: E[a^2 b^2] = 1 (a pair drawn from one number would give 3)
    blocks = values.view(-1, 2, 16)
    first, second = blocks[:, 0], blocks[:, 1]
    assert abs((first[:, :-1] * first[:, 1:]).mean().item()) < 0.01
    assert abs((first * second).mean().item()) < 0.01
    assert abs((first ** 2 * second ** 2).mean().item() - 1) < 0.05
    torch.manual_seed(5)
    assert torch.equal(_native.standard_normal(like), noise)
    assert not torch.equal(_native.standard_normal(like), noise)


def test_in_kernel_noise_is_the_seeded_draw_and_follows_manual_seed():
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(3, 4, 7, 6)
    torch.manual_seed(6)
    first, _, _ = _call(_native.perturb, h, phi, *_stats(4), True, None)
    torch.manual_seed(6)
    again, _, _ = _call(_native.perturb, h, phi, *_stats(4), True, None)
    different, _, _ = _call(_native.perturb, h, phi, *_stats(4), True, None)
    assert torch.equal(first, again) and not torch.equal(first, different)
    torch.manual_seed(6)
    eps = _native.standard_normal(h)  # the perturbation draws exactly one seed from the global RNG
    given, _, _ = _call(_native.perturb, h, phi, *_stats(4), True, eps)
    assert torch.equal(first, given)


def test_switch_off_and_unsupported_inputs(monkeypatch):
    phi = MetaPerturb()
    h = torch.randn(2, 3, 4, 4)
    assert _native.available(h, phi)
    assert not _native.available(h.double(), phi)
    monkeypatch.setenv("WORKBENCH_NATIVE", "0")
    assert not _native.available(h, phi)


def test_unfused_request_goes_to_the_twice_differentiable_eager_path(monkeypatch):
    """perturb.perturb keeps fused=False on its eager path, the kernel built or not (dispatch goes one way: _native
    never calls back into perturb), and _native.perturb refuses it with the way out."""
    monkeypatch.setattr(_native, "perturb", _native_must_not_run)
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(3, 4, 5, 5, requires_grad=True)
    assert _native.available(h, phi)  # float32 on the CPU: a fused call would take the kernel
    out, _, _ = _call(perturb_module.perturb, h, phi, *_stats(4), True, torch.randn(h.shape), fused=False)
    (grad,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)
    assert grad.requires_grad  # a second derivative exists
    monkeypatch.undo()
    with pytest.raises(WorkbenchError, match="differentiable once.*workbench.perturb.perturb"):
        _call(_native.perturb, h, phi, *_stats(4), True, None, fused=False)


def test_the_eager_case_runs_the_eager_path(monkeypatch):
    """With the kernel built perturb.perturb dispatches to it; the tests' eager case (eager_perturb) never does."""
    calls = []
    native = _native.perturb
    monkeypatch.setattr(_native, "perturb", lambda *a, **kw: calls.append(1) or native(*a, **kw))
    phi = MetaPerturb(init_std=0.3)
    h, eps = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    _call(perturb_module.perturb, h, phi, *_stats(4), True, eps)
    assert calls == [1]
    out, _, multiplier = _call(eager_perturb, h, phi, *_stats(4), True, eps)
    assert calls == [1] and multiplier.shape == h.shape and torch.isfinite(out).all()


def test_training_needs_a_batch_of_two():
    phi = MetaPerturb()
    with pytest.raises(WorkbenchError, match="batch of at least 2"):
        _call(_native.perturb, torch.randn(1, 3, 4, 4), phi, *_stats(3), True, None)
    out, _, _ = _call(_native.perturb, torch.randn(1, 3, 4, 4), phi, *_stats(3), False, None)
    assert out.shape == (1, 3, 4, 4) and torch.isfinite(out).all()


def test_failed_build_warns_once_and_reports_unavailable(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_build_failed", False)
    monkeypatch.setattr(cpp_extension, "load", broken)
    phi, h = MetaPerturb(), torch.randn(2, 3, 4, 4)
    with caplog.at_level("WARNING", logger="workbench._native"):
        assert not _native.available(h, phi)
        assert not _native.available(h, phi)
    warnings = [r for r in caplog.records if "native perturbation kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0].getMessage()
    with pytest.raises(WorkbenchError, match="not built"):
        _call(_native.perturb, h, phi, *_stats(3), True, None)


def test_output_takes_an_inplace_relu_like_the_next_layer_does():
    torch.manual_seed(7)
    phi = MetaPerturb(init_std=0.3)
    h = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    eps = torch.randn(h.shape)
    out, _, _ = _call(eager_perturb, h, phi, *_stats(4), True, eps)
    expected = torch.autograd.grad(torch.relu(out).sum(), h)[0]
    out, _, multiplier = _call(_native.perturb, h, phi, *_stats(4), True, eps)
    assert out._base is None and multiplier._base is None  # real tensors, not views of the kernel's buffers
    torch.relu_(out)
    assert _rel(torch.autograd.grad(out.sum(), h)[0], expected) < 1e-4


def test_large_maps_are_recycled_and_stay_correct():
    torch.manual_seed(3)
    phi = MetaPerturb(init_std=0.3)
    shape = (4, 64, 16, 16)  # 256 KiB maps: the smallest size the kernel takes from its pool
    h = torch.randn(shape).requires_grad_(True)
    eps = torch.randn(shape)

    def run(fn):
        rm, rv = _stats(shape[1])
        out, _, _ = _call(fn, h, phi, rm, rv, True, eps)
        (grad,) = torch.autograd.grad(out.square().sum(), [h])
        return out.detach().clone(), grad

    _native.release_pool()
    first = run(_native.perturb)
    held = _native.pooled_bytes()
    assert held >= 4 * 256 * 1024  # the freed maps went back to the pool
    second = run(_native.perturb)  # served from the pool
    assert _native.pooled_bytes() == held
    reference = run(eager_perturb)
    assert _rel(first[0], reference[0]) < 1e-5 and _rel(first[1], reference[1]) < 1e-4
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert _native.release_pool() == held and _native.pooled_bytes() == 0


needs_avx512 = pytest.mark.skipif(not BUILT or not _native.load().cpu_has_avx512(), reason="this CPU has no AVX-512")


@pytest.fixture
def isa_restored():
    before = _native.isa()
    yield
    _native.set_isa(before)


ISA_SHAPES = [(3, 5, 9, 7), (2, 16, 6, 6), (2, 17, 5, 4), (3, 33, 4, 1), (2, 64, 1, 3), (2, 1, 1, 1), (4, 40, 8, 8)]


def _multiplier_stats(mult):
    return mult if mult.dim() == 1 else torch.stack([mult.mean(), mult.std()])


@pytest.fixture
def fusing_restored():
    before = _native.fuse_frozen_sites, _native.fuse_batch_norm
    yield
    _native.fuse_frozen_sites, _native.fuse_batch_norm = before


@needs_avx512
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("drawn", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", ISA_SHAPES)
def test_avx512_rows_agree_with_the_generic_rows(isa_restored, fusing_restored, shape, training, drawn, fused):
    """Channel tails (C not a multiple of 16), one-pixel rows and columns, eval and training, clip, given and drawn
    noise: outputs, multipliers, running statistics and the input gradient of the generic two sweeps agree with the
    AVX-512 two sweeps and with the fused site."""
    torch.manual_seed(6)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)  # frozen, as in transfer: the AVX-512 backward serves it
    h = (3 * torch.randn(shape)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    eps = None if drawn else torch.randn(shape)
    weight = torch.randn(shape)
    results, map_written = {}, {}
    for isa in ("generic", "avx512"):
        _native.set_isa(isa)
        _native.fuse_frozen_sites = fused
        rm, rv = _stats(shape[1])
        torch.manual_seed(7)  # the same in-kernel noise for both
        out, scale, mult = _call(_native.perturb, h, phi, rm, rv, training, eps)
        (grad,) = torch.autograd.grad((out * weight).sum(), [h])
        results[isa] = (out.detach(), _multiplier_stats(mult), scale.detach(), rm, rv, grad)
        map_written[isa] = mult.shape == h.shape
    assert map_written == {"generic": True, "avx512": not fused}  # the fused site never writes the multiplier map
    for name, generic, avx512 in zip(["out", "mult", "scale", "rm", "rv", "grad"], results["generic"],
                                     results["avx512"]):
        assert _rel(avx512, generic) < 1e-5, name
    if h.numel() > 200:
        assert (results["avx512"][0] == 1.5).any()  # the clip is exercised


@needs_avx512
def test_fused_site_in_a_network_trains_like_the_two_sweeps(isa_restored, fusing_restored):
    """A frozen phi attached to a small ResNet: one training step's loss, parameter gradients and site statistics
    are the same with the fused site as with the two sweeps (the same noise: a seeded draw)."""
    from workbench import attach
    from workbench.models import build

    _native.set_isa("avx512")
    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 1])
    results = []
    for fused in (False, True):
        _native.fuse_frozen_sites = fused
        torch.manual_seed(10)
        model = build("resnet20", 3, image_size=12).to(memory_format=torch.channels_last)
        handle = attach(model, MetaPerturb(init_std=0.3).requires_grad_(False), image_size=12)
        handle.set_clip(100.0)
        torch.manual_seed(11)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        stats = [site.last_multiplier_stats for site in handle.sites]
        results.append((loss.detach(), grads, [s.running_var.clone() for s in handle.sites], stats))
    (loss0, grads0, rv0, stats0), (loss1, grads1, rv1, stats1) = results
    assert abs(loss1.item() - loss0.item()) < 1e-5
    assert max(_rel(b, a) for a, b in zip(grads0, grads1)) < 1e-4
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rv0, rv1))
    for a, b in zip(stats0, stats1):
        assert abs(a["mean"] - b["mean"]) < 1e-5 and abs(a["std"] - b["std"]) < 1e-4


@needs_avx512
def test_avx512_rows_match_the_reference_and_eager_gradients(isa_restored):
    _native.set_isa("avx512")
    torch.manual_seed(8)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    shape = (3, 20, 7, 6)
    h, eps, weight = (3 * torch.randn(shape)).requires_grad_(True), torch.randn(shape), torch.randn(shape)
    outs, grads = [], []
    for fn in (eager_perturb, _native.perturb):
        out, _, _ = _call(fn, h, phi, *_stats(20), True, eps)
        outs.append(out)
        grads.append(torch.autograd.grad((out * weight).sum(), [h])[0])
    with torch.no_grad():
        ref = reference_perturb(h, phi, *_stats(20), channel_norm=16, spatial_norm=9, eps=eps, clip=1.5,
                                noise_coeff=0.7, training=True)
    assert (outs[1] - ref).abs().max().item() < 1e-5
    assert _rel(grads[1], grads[0]) < 1e-4


def test_isa_switch_and_its_errors(isa_restored):
    assert _native.isa() in ("avx512", "generic")
    _native.set_isa("generic")
    assert _native.isa() == "generic"
    with pytest.raises(WorkbenchError, match="unknown kernel ISA 'sse9'; choose 'avx512' or 'generic'"):
        _native.set_isa("sse9")
    if not _native.load().cpu_has_avx512():
        with pytest.raises(WorkbenchError, match="lacks AVX-512"):
            _native.set_isa("avx512")


def test_input_gradient_is_a_tensor_of_its_own_not_a_view():
    """autograd sums a view's gradient with another out of place (an extra pass over the map wherever a block's
    input also feeds a shortcut); the kernel's gradient for h is a channels_last tensor of its own."""
    torch.manual_seed(9)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, _, _ = _call(_native.perturb, h, phi, *_stats(8), True, None)
    (grad,) = torch.autograd.grad(out.sum(), [h])
    assert grad._base is None and grad.is_contiguous(memory_format=torch.channels_last)


@needs_avx512
def test_fused_site_refuses_a_second_derivative(isa_restored, fusing_restored):
    """The fused site's backward is hand-written: asking it to build a graph (create_graph) is a clear error that
    names the way out, not a silently wrong second derivative."""
    _native.set_isa("avx512")
    _native.fuse_frozen_sites = True
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, _, _ = _call(_native.perturb, h, phi, *_stats(16), True, None)
    with pytest.raises(RuntimeError, match="differentiable once.*fused = False"):
        torch.autograd.grad(out.square().sum(), h, create_graph=True)
    (grad,) = torch.autograd.grad(out.square().sum(), h)  # a first derivative is fine
    assert grad.shape == h.shape


@needs_avx512
@pytest.mark.parametrize("fused", [True, False])
def test_avx512_softplus_over_the_whole_range(isa_restored, fusing_restored, fused):
    """With phi's noise kernels zero, mu = 0 and the multiplier is 1 + k (s softplus(eps) - 1): the table-driven
    softplus of the AVX-512 rows against torch's, from -40 to 40 (across every table interval and the clamp at 16)."""
    _native.set_isa("avx512")
    _native.fuse_frozen_sites = fused
    phi = MetaPerturb(init_std=0.3)
    with torch.no_grad():
        for t in (phi.noise1.w_identity, phi.noise1.w_all, phi.noise2.w_identity, phi.noise2.w_all):
            t.zero_()
    phi.requires_grad_(not fused)  # a frozen phi takes the fused site, a trained one the two sweeps
    eps = torch.linspace(-40, 40, 2 * 64 * 25 * 25).view(2, 25, 25, 64).permute(0, 3, 1, 2)
    h = torch.ones_like(eps)
    out, scale, _ = _call(_native.perturb, h, phi, *_stats(64), True, eps, clip=None, k=1.0)
    expected = scale.view(1, 64, 1, 1) * F.softplus(eps)
    assert (out - expected).abs().max().item() < 2e-7 * max(1.0, expected.abs().max().item())
    small = eps < -8  # softplus is tiny there: its absolute error, not only relative to the largest value
    assert (out - expected)[small].abs().max().item() < 2e-7


@needs_avx512
def test_avx512_noise_is_the_generic_draw(isa_restored):
    like = torch.empty(3, 24, 7, 5)  # 2520 normals: many noise blocks and a partial one
    draws = {}
    for isa in ("generic", "avx512"):
        _native.set_isa(isa)
        draws[isa] = _native.standard_normal(like, seed=2**40 + 11)
    assert (draws["avx512"] - draws["generic"]).abs().max().item() < 1e-5
    assert draws["avx512"].std().item() > 0.9


def _same_at_every_thread_count(run, counts=(1, 2, 3)) -> None:
    """Asserts that run() (a tuple of tensors) gives bit-identical results at each torch thread count."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_avx512
@pytest.mark.parametrize("pool", [False, True])
def test_fused_site_does_not_depend_on_the_thread_count(isa_restored, fusing_restored, pool):
    """Rows at a thread's chunk edges are recomputed into its rings; each row's mask bit, direct gradient term and
    statistics are still written once, by the chunk that owns the row (with pool, chunks start at window rows)."""
    _native.set_isa("avx512")
    _native.fuse_frozen_sites = True
    torch.manual_seed(12)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = torch.randn(3, 21, 11, 9).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn((3, 21, 5, 4) if pool else h.shape)

    def run():
        torch.manual_seed(13)
        out, _, stats = _call(_native.perturb, h, phi, *_stats(21), True, None, relu=pool, pool=pool)
        return out.detach(), stats, torch.autograd.grad((out * weight).sum(), [h])[0]

    _same_at_every_thread_count(run)


@needs_avx512
@pytest.mark.parametrize("pool", [False, True])
def test_fused_site_scale_path_alone_still_reaches_h(isa_restored, fusing_restored, pool):
    """A loss on the scale only (no gradient through the noise path): the scale path's gradient still reaches h."""
    _native.set_isa("avx512")
    torch.manual_seed(14)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = (3 * torch.randn(3, 6, 5, 5)).requires_grad_(True)
    grads = []
    for fused in (False, True):
        _native.fuse_frozen_sites = fused
        _, scale, _ = _call(_native.perturb, h, phi, *_stats(6), True, torch.randn(h.shape), relu=pool, pool=pool)
        grads.append(torch.autograd.grad(scale.sum(), [h])[0])
    assert grads[0].abs().sum() > 0 and _rel(grads[1], grads[0]) < 1e-4


@needs_avx512
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_site_without_a_backward_skips_its_saved_maps_only(isa_restored, fusing_restored, training, pool):
    """Under no_grad the fused site writes neither a nor the mask nor the pool's winners (nothing will read them);
    the output, scale, running statistics and multiplier statistics are those of a pass that keeps them."""
    _native.set_isa("avx512")
    _native.fuse_frozen_sites = True
    torch.manual_seed(15)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = (3 * torch.randn(4, 19, 6, 7)).requires_grad_(True)
    results = []
    for grad in (True, False):
        rm, rv = _stats(19)
        torch.manual_seed(16)
        with torch.set_grad_enabled(grad):
            out, scale, stats = _call(_native.perturb, h, phi, rm, rv, training, None, relu=pool, pool=pool)
        results.append((out.detach(), scale.detach(), stats, rm, rv))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _site_function(path: str):
    """The site function of one CPU path: "fused" (AVX-512 fused site), "two_sweeps" (generic rows) or "eager"."""
    if path == "fused" and not _native.load().cpu_has_avx512():
        pytest.skip("the fused site needs AVX-512")
    _native.set_isa("avx512" if path == "fused" else "generic")
    _native.fuse_frozen_sites = path == "fused"
    return eager_perturb if path == "eager" else _native.perturb


def _with_the_same_noise(fn, path, h, phi, training, seed, **kw):
    """One site call with fresh running statistics and the noise of `seed` (drawn in-kernel, or given to the eager
    path): calls with the same seed perturb alike. Returns (out, running_var)."""
    rm, rv = _stats(h.shape[1])
    torch.manual_seed(seed)
    eps = torch.randn(h.shape) if path == "eager" else None
    out, _, _ = _call(fn, h, phi, rm, rv, training, eps, **kw, **({"fused": True} if path == "eager" else {}))
    return out, rv


@pytest.mark.parametrize("path", ["fused", "two_sweeps", "eager"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 9, 7), (2, 17, 5, 4), (4, 40, 8, 8)])
def test_relu_fused_into_the_site_is_the_relu_of_its_output(isa_restored, fusing_restored, shape, training, path):
    """site(h, relu=True) = relu(site(h)) in value and input gradient, the clip included, on every CPU path (the
    fused site applies it in-kernel and masks its own backward)."""
    fn = _site_function(path)
    torch.manual_seed(12)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = (3 * torch.randn(shape)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(shape)
    results = []
    for relu in (False, True):
        out, rv = _with_the_same_noise(fn, path, h, phi, training, 13, relu=relu)
        if not relu:
            (unmasked,) = torch.autograd.grad((out * weight).sum(), [h], retain_graph=True)
            out = torch.relu(out)
        (grad,) = torch.autograd.grad((out * weight).sum(), [h])
        results.append((out.detach(), grad, rv))
    (out0, grad0, rv0), (out1, grad1, rv1) = results
    assert (out1 == 0).any() and (out1 > 0).any() and (out1 == 1.5).any()  # both bounds are exercised
    assert torch.allclose(out1, out0, atol=1e-6) and torch.allclose(rv1, rv0)
    assert torch.allclose(grad1, grad0, atol=1e-5)
    assert not torch.allclose(grad1, unmasked, atol=1e-3)  # the ReLU's mask does change the gradient


@pytest.mark.parametrize("path", ["fused", "two_sweeps", "eager"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 9, 7), (2, 17, 6, 5), (2, 40, 8, 8)])
def test_pool_fused_into_the_site_is_the_max_pool_of_its_output(isa_restored, fusing_restored, shape, training, relu,
                                                                path):
    """site(h, relu, pool=True) = max_pool2d(site(h, relu), 2) in value and input gradient on every CPU path: odd
    sizes drop the last row and column, clipped and ReLU-zeroed winners pass no gradient, and a window of equal
    values gives it to its first element, as torch's max-pool does (the fused site pools in-kernel and keeps each
    window's winner for its backward)."""
    fn = _site_function(path)
    torch.manual_seed(17)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    h = 3 * torch.randn(shape)
    h[:, :, 2:4, 0:2] = 0.0  # windows of equal values (h m = 0)
    h = h.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    pooled_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    weight = torch.randn(pooled_shape)
    results = []
    for pool in (False, True):
        out, rv = _with_the_same_noise(fn, path, h, phi, training, 18, relu=relu, pool=pool)
        if not pool:
            out = F.max_pool2d(out, 2)
        (grad,) = torch.autograd.grad((out * weight).sum(), [h])
        results.append((out.detach(), grad, rv))
    (out0, grad0, rv0), (out1, grad1, rv1) = results
    assert out1.shape == pooled_shape and (out1 == 1.5).any()
    assert torch.allclose(out1, out0, atol=1e-6) and torch.allclose(rv1, rv0)
    assert torch.allclose(grad1, grad0, atol=1e-5)  # without the ReLU, the zero windows test the first-wins rule


def _batch_norm(c, momentum, affine, track, seed):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if track:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(3)
    return bn


@pytest.mark.parametrize("path", ["fused", "two_sweeps", "eager"])
@pytest.mark.parametrize("momentum, affine, track", [(0.1, True, True), (None, True, True), (0.3, False, True),
                                                     (0.1, True, False)])
@pytest.mark.parametrize("shape, layout", [((3, 5, 9, 7), torch.channels_last), ((4, 40, 8, 8), torch.channels_last),
                                           ((2, 17, 6, 4), torch.contiguous_format)])
@pytest.mark.parametrize("pool", [True, False])
def test_batch_norm_fused_into_the_site_is_the_batch_norm_then_the_site(isa_restored, fusing_restored, monkeypatch,
                                                                        shape, layout, pool, momentum, affine, track,
                                                                        path):
    """site(x, relu, pool, batch_norm=bn) = site(bn(x), relu, pool) for a training BatchNorm2d: output, the gradients
    of x and of bn's weight and bias, bn's running statistics and batch count, and the site's own statistics, on
    every CPU path. The fused site computes the BatchNorm itself (bn's own forward is never called there), from
    statistics of a map whose mean is far from zero against its spread, in either memory layout."""
    fn = _site_function(path)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    torch.manual_seed(21)
    x = (40 + 3 * torch.randn(shape)).contiguous(memory_format=layout).requires_grad_(True)
    out_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2) if pool else shape
    weight = torch.randn(out_shape)
    results = []
    for fused_bn in (False, True):
        bn = _batch_norm(shape[1], momentum, affine, track, seed=22)
        if fused_bn and path == "fused":
            monkeypatch.setattr(_native, "apply_batch_norm", lambda *a: pytest.fail("the fused site called bn"))
        inputs = x if fused_bn else _native.apply_batch_norm(bn, x)
        out, rv = _with_the_same_noise(fn, path, inputs, phi, True, 23, relu=True, pool=pool,
                                       batch_norm=bn if fused_bn else None)
        wrt = [x] + ([bn.weight, bn.bias] if affine else [])
        grads = torch.autograd.grad((out * weight).sum(), wrt)
        buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked] if track else []
        results.append((out.detach(), grads, rv, buffers))
        monkeypatch.undo()
    (out0, grads0, rv0, buffers0), (out1, grads1, rv1, buffers1) = results
    assert out1.shape == out_shape and torch.allclose(out1, out0, atol=1e-5)
    assert torch.allclose(rv1, rv0, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads1, grads0))
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5) for a, b in zip(buffers1, buffers0))
    if track:
        assert int(buffers1[2]) == 4 and not torch.allclose(buffers1[0], torch.zeros(shape[1]))


@pytest.mark.parametrize("training, bn_training, fuse", [(True, False, True), (False, True, True),
                                                         (False, False, True), (True, True, False)])
def test_batch_norm_the_fused_site_cannot_take_is_applied_first(isa_restored, fusing_restored, monkeypatch, training,
                                                                bn_training, fuse):
    """A BatchNorm in evaluation mode (running statistics), in front of an evaluation-mode site, or with
    ``fuse_batch_norm`` off is applied by its own forward before the site: the same numbers as bn then the site, its
    statistics updated only when training."""
    fn = _site_function("fused")
    _native.fuse_batch_norm = fuse
    calls = []
    apply_batch_norm = _native.apply_batch_norm
    monkeypatch.setattr(_native, "apply_batch_norm", lambda *a: calls.append(1) or apply_batch_norm(*a))
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    torch.manual_seed(24)
    x = (2 + torch.randn(4, 16, 6, 6)).contiguous(memory_format=torch.channels_last)
    outs, stats = [], []
    for fused_bn in (False, True):
        bn = _batch_norm(16, 0.1, True, True, seed=25).train(bn_training)
        inputs = x if fused_bn else _native.apply_batch_norm(bn, x)
        out, _ = _with_the_same_noise(fn, "fused", inputs, phi, training, 26, relu=True, pool=True,
                                      batch_norm=bn if fused_bn else None)
        outs.append(out)
        stats.append((bn.running_mean.clone(), int(bn.num_batches_tracked)))
    assert calls == [1, 1]  # once for the reference, once by the site
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.equal(stats[0][0], stats[1][0]) and stats[0][1] == stats[1][1] == 3 + bn_training


def test_fused_batch_norm_trains_in_front_of_an_input_without_gradient(isa_restored, fusing_restored):
    """A fused BatchNorm whose input needs no gradient (the layers before it frozen) still gives its weight and bias
    the gradients of BatchNorm then the site."""
    fn = _site_function("fused")
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    torch.manual_seed(27)
    x = (1 + torch.randn(4, 24, 8, 6)).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 24, 4, 3)
    grads = []
    for fused_bn in (False, True):
        bn = _batch_norm(24, 0.1, True, True, seed=28)
        inputs = x if fused_bn else _native.apply_batch_norm(bn, x)
        out, _ = _with_the_same_noise(fn, "fused", inputs, phi, True, 29, relu=True, pool=True,
                                      batch_norm=bn if fused_bn else None)
        grads.append(torch.autograd.grad((out * weight).sum(), [bn.weight, bn.bias]))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(*grads))
    assert grads[1][0].abs().sum() > 0


@needs_avx512
@pytest.mark.parametrize("pool", [True, False])
def test_fused_batch_norm_does_not_depend_on_the_thread_count(isa_restored, fusing_restored, pool):
    """The fused BatchNorm's sums (forward moments, backward sums) are taken in an order fixed by the map, not by the
    threads: output, gradients and running statistics are bit-identical for 1, 2 and 3 threads."""
    _native.set_isa("avx512")
    _native.fuse_frozen_sites = True
    torch.manual_seed(30)
    phi = MetaPerturb(init_std=0.3).requires_grad_(False)
    x = (5 + torch.randn(3, 21, 11, 9)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn((3, 21, 5, 4) if pool else x.shape)

    def run():
        bn = _batch_norm(21, 0.1, True, True, seed=31)
        torch.manual_seed(32)
        out, _, _ = _call(_native.perturb, x, phi, *_stats(21), True, None, relu=True, pool=pool, batch_norm=bn)
        grads = torch.autograd.grad((out * weight).sum(), [x, bn.weight, bn.bias])
        return (out.detach(), *grads, bn.running_mean, bn.running_var)

    _same_at_every_thread_count(run)
