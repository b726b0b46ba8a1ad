"""The model zoo: every name builds for any input channels and sizes, counts and layouts match the known
architectures, perturbation sites are declared where the original code put them, errors are one clear line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models import (
    BasicBlock,
    ConvBlock,
    OptionAShortcut,
    WideBasicBlock,
    available,
    build,
    model_info,
    register_model,
)

NUM_CLASSES = 3


def _site_blocks(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if isinstance(getattr(type(m), "site_activation", None), str) or getattr(type(m), "site_output", False)
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_registered_model_builds_for_any_channels_and_size(name, in_channels):
    for size in (28, 32, 64):
        model = build(name, NUM_CLASSES, in_channels=in_channels, image_size=size)
        out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, NUM_CLASSES)
        assert torch.isfinite(out).all()
        assert model.workbench_name == name
        assert model.image_size == size
        assert isinstance(model.channel_norm, int) and model.channel_norm > 0
        assert _site_blocks(model), f"{name} declares no perturbation site"


def test_available_lists_the_required_architectures():
    names = available()
    for required in ("resnet20", "resnet32", "resnet44", "resnet56", "vgg9", "conv4", "conv6", "wrn16_4", "wrn28_2"):
        assert required in names
    assert names == sorted(names)
    with_tv = available(torchvision=True)
    assert "tv:resnet18" in with_tv and "tv:mobilenet_v2" in with_tv and set(names) <= set(with_tv)


@pytest.mark.parametrize(
    "name, channel_norm",
    [("resnet20", 64), ("resnet56", 64), ("vgg9", 512), ("conv4", 64), ("conv4_32", 32), ("conv6_16", 16),
     ("wrn16_4", 256), ("wrn28_2", 128), ("wrn10_1", 64)],
)
def test_channel_norm_is_the_widest_conv(name, channel_norm):
    assert build(name, NUM_CLASSES).channel_norm == channel_norm
    assert model_info(name)["channel_norm"] == channel_norm


def test_resnet20_parameter_count_matches_the_known_value():
    model = build("resnet20", 10)
    # Convs: stem 3*16*9; stage 1: 6 * 16*16*9; stage 2: 16*32*9 + 5 * 32*32*9; stage 3: 32*64*9 + 5 * 64*64*9.
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9) + (32 * 64 * 9 + 5 * 64 * 64 * 9)
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    fc = 64 * 10 + 10
    assert convs + bns + fc == 269_722
    assert sum(p.numel() for p in model.parameters()) == 269_722  # "0.27M" (He et al. 2016, table 6)
    # The deeper CIFAR ResNets: 0.46M / 0.66M / 0.85M / 1.7M.
    counts = {d: sum(p.numel() for p in build(f"resnet{d}", 10).parameters()) for d in (32, 44, 56, 110)}
    assert counts == {32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("name, sites", [("resnet20", 9), ("resnet32", 15), ("resnet44", 21), ("resnet56", 27),
                                         ("vgg9", 8), ("conv4", 4), ("conv6", 6), ("wrn16_4", 6), ("wrn28_2", 12)])
def test_site_count_matches_the_original_placement(name, sites):
    blocks = _site_blocks(build(name, NUM_CLASSES))
    assert len(blocks) == sites
    for block in blocks:
        if isinstance(getattr(type(block), "site_activation", None), str):
            act = getattr(block, type(block).site_activation)
            assert isinstance(act, nn.ReLU)
        channels = [m.out_channels for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
        assert block.site_channels == channels


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    model = build("resnet20", NUM_CLASSES)
    shortcuts = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2  # one per stage transition (16->32, 32->64)
    assert all(sum(p.numel() for p in s.parameters()) == 0 and not list(s.buffers()) for s in shortcuts)
    # Only convs, BNs and the head carry parameters: 19 convs + 19 BNs (2 tensors) + fc (2 tensors).
    assert len(list(model.parameters())) == 19 + 2 * 19 + 2
    x = torch.randn(2, 16, 8, 8)
    y = shortcuts[0](x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_basic_block_site_is_the_residual_sum_before_the_final_relu():
    model = build("resnet20", NUM_CLASSES).eval()
    block = model.layer2[0]  # the downsampling block: exercises the option-A shortcut too
    assert isinstance(block, BasicBlock) and BasicBlock.site_activation == "act_out"
    assert block.act_out is not block.act1
    seen = []
    block.act_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.relu(torch.randn(2, 16, 16, 16))
    with torch.no_grad():
        out = block(x)
        expected = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = expected + nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert len(seen) == 1  # the final activation runs once per block forward
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(out, torch.relu(expected))


def test_a_pre_hook_on_every_declared_activation_controls_the_whole_residual_path():
    model = build("resnet20", NUM_CLASSES).eval()
    for block in _site_blocks(model):
        getattr(block, block.site_activation).register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    # Every block output is ReLU(0) = 0, so the logits are the head's bias.
    torch.testing.assert_close(out, model.fc.bias.expand(2, -1))


def test_conv_block_site_is_after_bn_before_relu_and_pool():
    model = build("conv4", NUM_CLASSES).eval()
    blocks = _site_blocks(model)
    assert all(isinstance(b, ConvBlock) and b.site_activation == "act" for b in blocks)
    assert [name for name, _ in blocks[0].named_children()] == ["conv", "bn", "act", "pool"]
    bn_out, act_in = [], []
    blocks[1].bn.register_forward_hook(lambda m, args, out: bn_out.append(out))
    blocks[1].act.register_forward_pre_hook(lambda m, args: act_in.append(args[0]))
    blocks[-1].act.register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert act_in[0] is bn_out[0]  # a forward hook on bn and a pre-hook on act are the same place
    torch.testing.assert_close(out, model.fc.bias.expand(2, -1))


def test_wide_block_declares_its_output_as_the_site():
    model = build("wrn16_4", NUM_CLASSES).eval()
    block = model.layer2[0]
    assert isinstance(block, WideBasicBlock) and WideBasicBlock.site_output is True
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        pre = torch.relu(block.bn1(x))
        residual = block.conv2(torch.relu(block.bn2(block.conv1(pre))))
        torch.testing.assert_close(block(x), residual + block.shortcut(pre))


@pytest.mark.parametrize("name", ["resnet20", "conv4"])
def test_channels_last_gives_the_same_output(name):
    model = build(name, NUM_CLASSES)
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            ref = model(x)
            model_cl = model.to(memory_format=torch.channels_last)
            out = model_cl(x.to(memory_format=torch.channels_last))
            model.to(memory_format=torch.contiguous_format)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    model_cl = build(name, NUM_CLASSES).to(memory_format=torch.channels_last)
    model_cl(x.to(memory_format=torch.channels_last)).sum().backward()
    assert all(p.grad is not None for p in model_cl.parameters())


def test_conv_width_by_name_or_option_and_original_flatten_head():
    assert build("conv4_32", NUM_CLASSES).features[0].conv.out_channels == 32
    assert build("conv6", NUM_CLASSES, width=16).features[5].conv.out_channels == 16
    assert build("conv4", NUM_CLASSES, width=32).workbench_build_args["width"] == 32
    # The original Conv-4 flattened the last map: 84 -> 42 -> 21 -> 10 -> 5, so 5*5*width features.
    model = build("conv4_64", NUM_CLASSES, image_size=84, head="flatten")
    assert model.fc.in_features == 5 * 5 * 64
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, NUM_CLASSES)
    # VGG-9 keeps its five pools at 32x32 (1x1 final map) and drops the fifth at 28x28.
    def pools(m):
        return sum(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert pools(build("vgg9", NUM_CLASSES, image_size=32)) == 5
    assert pools(build("vgg9", NUM_CLASSES, image_size=28)) == 4
    assert build("vgg9", NUM_CLASSES, image_size=32, head="flatten").fc.in_features == 512


def test_build_args_rebuild_the_same_architecture():
    model = build("conv6_16", 7, in_channels=1, image_size=28)
    again = build(**model.workbench_build_args)
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]


def test_model_info_reads_layout_without_allocating():
    info = model_info("resnet20")
    assert info["family"] == "cifar_resnet" and info["num_params"] == 269_722 and "act_out" in info["site_rule"]
    assert model_info("wrn16_4")["site_rule"].startswith("output of each WideBasicBlock")
    # torchvision's own count for ResNet-50 at 224x224 and 1000 classes: no small-input change there.
    tv = model_info("tv:resnet50", num_classes=1000, image_size=224)
    assert tv["num_params"] == 25_557_032 and tv["channel_norm"] == 2048
    assert tv["family"] == "torchvision.resnet"


@pytest.mark.parametrize(
    "name, in_channels",
    [("tv:resnet18", 1), ("tv:mobilenet_v2", 3), ("tv:efficientnet_b0", 1), ("tv:densenet121", 3)],
)
def test_torchvision_models_at_32x32(name, in_channels):
    model = build(name, NUM_CLASSES, in_channels=in_channels, image_size=32)
    out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, NUM_CLASSES)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == in_channels
    assert first.stride == (1, 1)  # small-input stem keeps the resolution
    assert model.workbench_name == name and model.channel_norm == max(
        m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)
    )


def test_torchvision_resnet_small_input_adaptation_only_below_64():
    small = build("tv:resnet18", NUM_CLASSES, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build("tv:resnet18", NUM_CLASSES, in_channels=1, image_size=96)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2) and large.conv1.in_channels == 1
    assert isinstance(large.maxpool, nn.MaxPool2d)
    forced = build("tv:resnet18", NUM_CLASSES, image_size=96, small_input=True)
    assert forced.conv1.stride == (1, 1)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(name="resnt20"), "did you mean resnet20"),
        (dict(name="VGG"), "vgg9"),
        (dict(name="tv:resnet19"), "did you mean tv:resnet18"),
        (dict(name="tv:not_a_model_at_all"), "list_models"),
        (dict(name="resnet20", width=8), "has no option 'width'"),
        (dict(name="conv4_32", width=16), "fixes width=32"),
        (dict(name="conv4", width=0), "width must be a positive integer"),
        (dict(name="wrn17_2"), "6n + 4"),
        (dict(name="conv4", head="max"), "head must be"),
        (dict(name="resnet20", num_classes=0), "num_classes must be an integer"),
        (dict(name="resnet20", in_channels=2.5), "in_channels must be an integer"),
        (dict(name="tv:googlenet", aux_logits=True), "aux_logits=False"),
        (dict(name="tv:resnet18", weights="DEFAULT"), "weights=None"),
        (dict(name="tv:vit_b_16", image_size=28), "could not build tv:vit_b_16"),
    ],
)
def test_bad_input_raises_one_line_workbench_error(kwargs, expected):
    kwargs = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(WorkbenchError) as info:
        build(**kwargs)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if kwargs["name"] == "resnt20":
        assert "available:" in message and "tv:<name>" in message


def test_register_model_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError):
        register_model("resnet20", family="cifar_resnet")(lambda num_classes, in_channels=3, image_size=32: None)
    with pytest.raises(ValueError):
        register_model("tv:mine", family="x")
