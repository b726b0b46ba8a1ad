import copy
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from workbench import MetaPerturb, PerturbSite, WorkbenchError, attach
from workbench.models import available, build

TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, 8),
    "resnet50": (torchvision.models.resnet50, 16),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, 17),
    "vgg11_bn": (torchvision.models.vgg11_bn, 8),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 16),
}
EXPECTED_SITES = {"resnet20": 9, "resnet32": 15, "conv4": 4, "conv6": 6, "vgg9": 8, "wrn16_4": 6}


def _round_trip(model, image_size, in_channels=3):
    phi = MetaPerturb(init_std=0.2)
    model.eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    before = model(x)
    handle = attach(model, phi, image_size=image_size)
    assert [id(p) for p in model.parameters()] == params  # phi never becomes a model parameter
    assert set(map(id, handle.phi_parameters())) == set(map(id, phi.parameters()))
    assert all(site.phi is phi for site in handle.sites)
    perturbed = model(x)
    assert not torch.equal(perturbed, before)
    handle.remove()
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, PerturbSite) for m in model.modules())
    assert torch.equal(model(x), before)
    return handle


@pytest.mark.parametrize("name", sorted(available()))
def test_attach_remove_round_trip_on_every_registered_model(name):
    in_channels = 1 if name.startswith("conv") else 3
    handle = _round_trip(build(name, num_classes=5, in_channels=in_channels), 32, in_channels)
    assert len(handle.sites) >= 1
    if name in EXPECTED_SITES:
        assert len(handle.sites) == EXPECTED_SITES[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_attach_remove_round_trip_on_torchvision_models(name):
    ctor, count = TORCHVISION[name]
    handle = _round_trip(ctor(num_classes=4), 32)
    assert len(handle.sites) == count


def test_resnet20_sites_follow_the_original_placement():
    model = build("resnet20", 10)
    handle = attach(model, MetaPerturb(), image_size=32)
    assert [s.channels for s in handle.sites] == [16] * 3 + [32] * 3 + [64] * 3
    assert {s.channel_norm for s in handle.sites} == {64.0}  # the original's constant for CIFAR ResNets
    assert {s.spatial_norm for s in handle.sites} == {32.0}
    copied = copy.deepcopy(model)
    assert len([m for m in copied.modules() if isinstance(m, PerturbSite)]) == 9


def test_site_sees_the_pre_activation_of_torchvision_basic_block():
    model = torchvision.models.resnet18(num_classes=3).eval()
    handle = attach(model, MetaPerturb(), image_size=32)
    seen = {}
    block = model.layer1[0]
    block.perturb_site.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0].clone()))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    handle.remove()
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem))))) + stem
    assert torch.allclose(seen["in"], out, atol=1e-5)
    assert (seen["in"] < 0).any()  # before the final ReLU


def test_plain_convnet_site_is_after_bn_before_relu():
    model = build("conv4", 5, in_channels=1)
    handle = attach(model, MetaPerturb(), image_size=28)
    model.eval()
    seen = []
    for site in handle.sites:
        site.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    model(torch.randn(2, 1, 28, 28))
    assert len(seen) == 4 and all((t < 0).any() for t in seen)


def test_sites_share_phi_and_state_dict_includes_their_buffers():
    model = build("resnet20", 10)
    phi = MetaPerturb()
    handle = attach(model, phi, image_size=32)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    state = model.state_dict()
    site_keys = [k for k in state if "perturb_site" in k]
    assert len(site_keys) == 2 * 9
    assert not any(k.startswith("phi") or "scale_fc" in k for k in state)
    fresh = build("resnet20", 10)
    fresh_handle = attach(fresh, phi, image_size=32)
    fresh.load_state_dict(state)
    for a, b in zip(handle.sites, fresh_handle.sites):
        assert torch.equal(a.running_mean, b.running_mean) and not torch.equal(b.running_mean, torch.zeros_like(b.running_mean))


def test_phi_receives_gradient_through_the_model_and_handle_controls_sites():
    model = build("conv4", 3)
    phi = MetaPerturb()
    handle = attach(model, phi, image_size=32)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())
    assert not any(p is q for p in model.parameters() for q in phi.parameters())
    handle.set_noise_coeff(0.25)
    handle.set_clip(10)
    assert {(s.noise_coeff, s.clip) for s in handle.sites} == {(0.25, 10.0)}
    assert all(s is not None and s.shape == (64,) for s in handle.scales())
    handle.set_active(False)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_attach_follows_the_model_device_and_deepcopy_keeps_sites_private():
    model = build("resnet20", 10)
    handle = attach(model, MetaPerturb(), image_size=32)
    twin = copy.deepcopy(model)
    twin.train()
    twin(torch.randn(4, 3, 32, 32))
    assert torch.equal(handle.sites[0].running_mean, torch.zeros(16, 4))  # the original's buffers untouched


def test_errors_are_one_line():
    phi = MetaPerturb()
    with pytest.raises(WorkbenchError, match="no perturbation site"):
        attach(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), phi)
    with pytest.raises(WorkbenchError, match="no Conv2d"):
        attach(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), phi)
    model = build("conv4", 2)
    attach(model, phi)
    with pytest.raises(WorkbenchError, match="already has perturbation sites"):
        attach(model, phi)
    with pytest.raises(WorkbenchError, match="MetaPerturb phi"):
        attach(build("conv4", 2), nn.Linear(2, 2))
    with pytest.raises(WorkbenchError, match="probe forward pass") as info:
        attach(build("vgg9", 2), phi, image_size=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["resnet20", "conv4", "vgg9", "tv:resnet18"])
def test_sites_take_over_the_relu_and_pool_they_feed_and_compute_the_same(name):
    """The ReLU after a site (and a 2x2 max-pool right after it, and the BatchNorm right before it) is applied by the
    site itself: model output, every gradient and the BatchNorm statistics equal those of the BatchNorm, the site, the
    ReLU and the pool modules one after the other, and remove() gives them back."""
    channels, size = (1, 28) if name == "conv4" else (3, 32)
    torch.manual_seed(0)
    model = build(name, 5, in_channels=channels, image_size=size).to(memory_format=torch.channels_last)
    forwards = {m: m.forward for m in model.modules() if type(m) in (nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d)}
    handle = attach(model, MetaPerturb(init_std=0.3).requires_grad_(False), image_size=size)
    handle.set_clip(3.0)
    taken = [m for m in forwards if type(m) is nn.ReLU and "forward" in vars(m)]
    pools = [m for m in forwards if type(m) is nn.MaxPool2d and "forward" in vars(m)]
    hosts = [m for m in model.modules() if isinstance(getattr(m, "perturb_site", None), PerturbSite)]
    if name != "tv:resnet18":  # torchvision blocks fuse through their replaced block forward instead
        assert taken and set(taken) == {m for m in hosts if type(m) is nn.ReLU}
    norms = [m for m in forwards if type(m) is nn.BatchNorm2d and "forward" in vars(m)]
    # every pool of Conv-4 follows a site; VGG-9 at 32x32 has five, after its sites 1, 2, 4, 6 and 8; every site of
    # both (conv -> BN -> site -> ReLU) takes the BatchNorm in front of it
    assert len(pools) == {"conv4": 4, "vgg9": 5}.get(name, 0)
    assert len(norms) == {"conv4": 4, "vgg9": 8}.get(name, 0)
    x = torch.randn(4, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])

    def loss_and_grads():
        torch.manual_seed(5)  # the same noise in both passes
        loss = F.cross_entropy(model(x), y)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    def statistics():
        return [b.clone() for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)]

    before = statistics()
    fused = loss_and_grads()
    fused_statistics = statistics()
    for m, value in zip([b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)], before):
        m.copy_(value)
    for host in taken:  # the unfused wiring: BatchNorm, site, then the module's own ReLU and pool
        host.forward = types.MethodType(lambda self, t: F.relu(self.perturb_site(t)), host)
    for module in pools + norms:
        del module.forward
    if name == "tv:resnet18":
        for host in hosts:
            host.forward = types.MethodType(lambda self, t: self.relu(self.perturb_site(_tv_residual(self, t))), host)
    unfused = loss_and_grads()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(fused_statistics, statistics()))
    assert all(not torch.equal(a, b) for a, b in zip(before, fused_statistics))  # they did update
    assert torch.allclose(fused[0], unfused[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused[1], unfused[1]))
    handle.remove()
    assert not [m for m in model.modules() if "forward" in vars(m)]
    assert all(m.forward == bound for m, bound in forwards.items())


def _tv_residual(block, x):
    """A torchvision BasicBlock's pre-activation (out + identity)."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(out)) + identity


class _PoolBlock(nn.Sequential):
    site_activation = "act"

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = pool


@pytest.mark.parametrize("pool, fused", [
    (nn.MaxPool2d(2), True),
    (nn.MaxPool2d((2, 2), stride=2), True),
    (nn.MaxPool2d(3, stride=2), False),
    (nn.MaxPool2d(2, stride=1), False),
    (nn.MaxPool2d(2, ceil_mode=True), False),
    (nn.MaxPool2d(2, padding=1), False),
    (nn.AvgPool2d(2), False),
])
def test_only_a_plain_2x2_max_pool_is_taken_over_and_the_output_is_the_same(pool, fused):
    """The site takes over the pool after its ReLU only for MaxPool2d(2) of stride 2, no padding, floor mode; any
    other pool keeps its own forward; either way the model computes what the unfused site followed by the pool
    computes."""
    torch.manual_seed(3)
    model = nn.Sequential(_PoolBlock(pool), nn.Flatten()).train()
    x = torch.randn(4, 3, 9, 9)
    handle = attach(model, MetaPerturb(init_std=0.3).requires_grad_(False), image_size=9)
    block = model[0]
    assert ("forward" in vars(block.pool)) == fused
    assert "forward" in vars(block.bn)  # the BatchNorm before the ReLU is taken either way
    torch.manual_seed(4)
    out = model(x)
    block.act.forward = types.MethodType(lambda self, t: F.relu(self.perturb_site(t)), block.act)
    del block.bn.forward
    if fused:
        del block.pool.forward
    torch.manual_seed(4)
    expected = model(x)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)
    handle.remove()
    assert not [m for m in model.modules() if "forward" in vars(m)]


def test_a_pool_registered_twice_is_not_taken_over():
    """A MaxPool2d module that two blocks share keeps its own forward (passing its input through would skip the
    pool of the block without a site too)."""
    shared = nn.MaxPool2d(2)
    model = nn.Sequential(_PoolBlock(shared), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), shared))
    handle = attach(model, MetaPerturb(), image_size=8)
    assert "forward" not in vars(shared) and "forward" in vars(model[0].act)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 2, 2)
    handle.remove()


def test_a_batch_norm_registered_twice_is_not_taken_over_and_a_copy_takes_its_own():
    """The site takes the BatchNorm in front of its ReLU only when the model calls that BatchNorm there alone; a
    deep copy of an attached model applies the copy's own BatchNorm (its statistics move, the original's do not)."""
    torch.manual_seed(6)
    block = _PoolBlock(nn.MaxPool2d(2))
    shared = nn.Sequential(_PoolBlock(nn.MaxPool2d(2)), nn.Flatten())
    shared.alias = shared[0].bn  # registered twice (called once: the registration is what counts), not run here
    shared.forward = lambda x: shared[1](shared[0](x))
    handle = attach(shared, MetaPerturb(), image_size=8)
    assert "forward" not in vars(shared[0].bn) and "forward" in vars(shared[0].pool)
    handle.remove()
    model = nn.Sequential(block, nn.Flatten()).train()
    attach(model, MetaPerturb(), image_size=8)
    assert "forward" in vars(block.bn)
    twin = copy.deepcopy(model)
    before = block.bn.running_mean.clone()
    twin(torch.randn(4, 3, 8, 8) + 2)
    assert torch.equal(block.bn.running_mean, before)
    assert not torch.equal(twin[0].bn.running_mean, before) and int(twin[0].bn.num_batches_tracked) == 1
