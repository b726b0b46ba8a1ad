"""Every regularizer trains a tiny model for a few steps and changes only what it should."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import DropBlock2d

from workbench.errors import WorkbenchError
from workbench.models import build
from workbench.perturb import MetaPerturb, PerturbSite
from workbench.regularizers import (
    NOISE_WARMUP,
    TRAIN_CLIP,
    SourceNetwork,
    TrainContext,
    available_regularizers,
    build_regularizer,
    noise_coefficient,
    regularizer_class,
)
from workbench.regularizers.information_dropout import InformationDropoutLayer
from workbench.regularizers.mixup import mixed_loss

ALL = ["base", "dropblock", "dropout", "finetune", "finetune_metaperturb", "information_dropout", "l2sp",
       "manifold_mixup", "metaperturb", "metaperturb_untrained", "mixup"]
SIZE = 16


def tiny(arch="conv4_4", seed=0, classes=3):
    torch.manual_seed(seed)
    return build(arch, classes, in_channels=1, image_size=SIZE)


def context(arch="conv4_4", steps=3, phi=None, source=None):
    return TrainContext(arch=arch, num_classes=3, in_channels=1, image_size=SIZE, total_steps=steps, train_size=64,
                        noise_warmup=NOISE_WARMUP, clip=TRAIN_CLIP, phi=phi, source=source)


def prepared(method, options=None, arch="conv4_4", steps=3):
    """A fresh tiny network prepared by ``method``: (regularizer, model, the plain network's state keys)."""
    model = tiny(arch)
    keys = set(model.state_dict())
    reg = build_regularizer(method, options)
    return reg, reg.prepare(model, context(arch, steps=steps)), keys


def source_of(arch="conv4_4"):
    src = tiny(arch, seed=99)
    return SourceNetwork({k: v.clone() for k, v in src.state_dict().items()}, arch, 1, 3, SIZE, "test-source")


def train(reg, model, steps=3, seed=0):
    """The transfer loop in miniature: Adam on the regularizer's groups, its hooks, its loss."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(reg.param_groups(model, 5e-4), lr=1e-2)
    x = torch.randn(8, 1, SIZE, SIZE)
    y = torch.randint(3, (8,))
    losses = []
    for step in range(steps):
        model.train()
        reg.on_train_step(model, step, steps)
        loss, acc = reg.loss(model, x, y, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and 0 <= float(acc) <= 1
        losses.append(float(loss.detach()))
    return opt, losses


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def eval_is_deterministic(model, reg):
    reg.on_eval(model)
    model.eval()
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        return torch.equal(model(x), model(x))


def test_registry_lists_every_method_and_refuses_unknown_ones():
    assert available_regularizers() == sorted(ALL)
    with pytest.raises(WorkbenchError, match="unknown method 'cutout'; available methods: base, dropblock"):
        build_regularizer("cutout")
    with pytest.raises(WorkbenchError, match="has no setting 'p'; its method_options are: alpha"):
        build_regularizer("mixup", {"p": 0.1})
    with pytest.raises(WorkbenchError, match="must be a number"):
        build_regularizer("dropout", {"p": "high"})
    with pytest.raises(WorkbenchError, match="in \\[0, 1\\)"):
        build_regularizer("dropout", {"p": 1.5})
    for name in ALL:
        reg = build_regularizer(name)
        assert reg.describe()["method"] == name
        doc = type(reg).__doc__ or ""
        assert len(doc) > 80, name
        for key, option in reg.options.items():  # every setting says where it comes from
            assert option.source, (name, key)


def test_base_trains_every_parameter_and_adds_nothing():
    reg, model, keys = prepared("base")
    before = snapshot(model)
    train(reg, model)
    assert set(model.state_dict()) == keys
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(list(model.parameters()))
    assert eval_is_deterministic(model, reg)


def test_dropout_sits_before_the_classifier_and_is_off_at_evaluation():
    reg, model, keys = prepared("dropout", {"p": 0.5})
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and set(model.state_dict()) == keys and reg.classifier == "fc"
    seen = {}
    model.fc.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))  # runs after dropout's hook
    model.train()
    model(torch.randn(8, 1, SIZE, SIZE))
    assert (seen["x"] == 0).float().mean() > 0.2  # features dropped in training
    train(reg, model)
    assert eval_is_deterministic(model, reg)


def test_dropblock_on_the_last_two_resolutions_with_a_linear_schedule():
    reg, model, keys = prepared("dropblock", steps=4)
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    # Conv-4 at 16x16 has sites at 16, 8, 4, 2: the last two resolutions are 4 and 2
    assert len(blocks) == 2 and reg.place_names == ["features.2.act", "features.3.act"]
    assert [b.block_size for b in blocks] == [3, 1]  # 3 fits 4x4; 2x2 maps get the largest odd size, 1
    assert set(model.state_dict()) == keys
    reg.on_train_step(model, 0, 4)
    assert blocks[0].p == 0.0
    reg.on_train_step(model, 2, 4)
    assert blocks[0].p == pytest.approx(0.05)
    train(reg, model, steps=4)
    assert blocks[0].p == pytest.approx(0.075)
    assert eval_is_deterministic(model, reg)


def test_mixup_mixes_inputs_and_labels():
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    perm = torch.tensor([1, 2, 0, 4, 5, 3])
    loss, _ = mixed_loss(logits, y, perm, 1.0)
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    loss, _ = mixed_loss(logits, y, perm, 0.25)
    assert torch.allclose(loss, 0.25 * F.cross_entropy(logits, y) + 0.75 * F.cross_entropy(logits, y[perm]))
    reg, model, keys = prepared("mixup")
    seen = {}
    model.features.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    x = torch.randn(8, 1, SIZE, SIZE)
    torch.manual_seed(0)
    reg.loss(model, x, torch.randint(3, (8,)), 0)
    lam = reg.last_lambda
    assert 0 < lam < 1 and not torch.allclose(seen["x"], x)
    train(reg, model)
    assert set(model.state_dict()) == keys and eval_is_deterministic(model, reg)


def test_manifold_mixup_mixes_at_the_input_or_a_stage_end_only_in_training():
    reg, model, keys = prepared("manifold_mixup", arch="resnet20")
    assert reg.layer_names == ["input", "layer1.2.act_out", "layer2.2.act_out"]
    x = torch.randn(8, 1, SIZE, SIZE)
    perm = torch.randperm(8)
    stage1 = lambda: model.layer1(model.act1(model.bn1(model.conv1(x))))  # noqa: E731
    model.eval()
    with torch.no_grad():
        plain = stage1()
        reg._mix = (1, 0.3, perm)  # what loss() sets while its forward runs: mix the end of stage 1
        assert torch.allclose(stage1(), 0.3 * plain + 0.7 * plain[perm], atol=1e-6)
        reg._mix = (2, 0.3, perm)  # another layer: stage 1 untouched
        assert torch.equal(stage1(), plain)
        reg._mix = None
        assert torch.equal(stage1(), plain)
    layers = set()
    for seed in range(12):
        torch.manual_seed(seed)
        reg.loss(model.train(), x, torch.randint(3, (8,)), 0)
        layers.add(reg.last_layer)
    assert layers == {0, 1, 2} and reg._mix is None
    train(reg, model)
    assert set(model.state_dict()) == keys and eval_is_deterministic(model, reg)


def test_information_dropout_adds_alpha_layers_and_a_kl_term():
    reg, model, keys = prepared("information_dropout", arch="resnet20")
    layers = [m for m in model.modules() if isinstance(m, InformationDropoutLayer)]
    assert len(layers) == 3 and reg.place_names == ["layer1.2.act_out", "layer2.2.act_out", "layer3.2.act_out"]
    assert [l.alpha_conv.in_channels for l in layers] == [16, 32, 64]
    new_keys = set(model.state_dict()) - keys
    assert new_keys and all(k.startswith("regularizer_information_dropout.") for k in new_keys)
    before = snapshot(model)
    opt, _ = train(reg, model)
    assert reg.last_kl > 0 and reg.train_metrics()["kl"] == reg.last_kl
    assert any(p is layers[0].alpha_conv.weight for g in opt.param_groups for p in g["params"])
    assert not torch.equal(layers[0].alpha_conv.weight, before["regularizer_information_dropout.0.alpha_conv.weight"])
    assert eval_is_deterministic(model, reg)
    # at evaluation the layers are the identity
    assert torch.equal(layers[0].eval()(torch.ones(1, 16, 2, 2)), torch.ones(1, 16, 2, 2))


def test_information_dropout_kl_weight_does_not_depend_on_the_train_size():
    """The KL is divided by the 50,000 images beta was tuned for, not by our (500-5,000 image) training set."""
    x, y = torch.randn(8, 1, SIZE, SIZE), torch.randint(3, (8,))
    terms = {}
    for train_size in (1000, 50000):
        model = tiny("resnet20")
        reg = build_regularizer("information_dropout")
        assert reg.settings["kl_normalizer"] == 50000
        ctx = TrainContext(arch="resnet20", num_classes=3, in_channels=1, image_size=SIZE, total_steps=3,
                           train_size=train_size, noise_warmup=NOISE_WARMUP, clip=TRAIN_CLIP)
        model = reg.prepare(model, ctx).train()
        torch.manual_seed(0)
        loss, _ = reg.loss(model, x, y, 0)
        raw_kl = sum(float(layer.last_kl.detach()) for layer in reg.layers)
        terms[train_size] = (float(loss.detach()), reg.last_kl, reg.last_ce)
        assert reg.last_kl == pytest.approx(raw_kl / 50000, rel=1e-5)
        assert float(loss.detach()) == pytest.approx(reg.last_ce + 3.0 * raw_kl / 50000, rel=1e-5)
    assert terms[1000] == terms[50000]
    # the normaliser is a setting; the old ones still work
    reg = build_regularizer("information_dropout", {"kl_normalizer": 1000, "beta": 1.0, "max_alpha": 0.5})
    assert reg.settings["kl_normalizer"] == 1000
    with pytest.raises(WorkbenchError, match="kl_normalizer must be > 0"):
        build_regularizer("information_dropout", {"kl_normalizer": 0})


def test_information_dropout_reestimates_batchnorm_statistics_without_noise():
    model = tiny("resnet20")
    reg = build_regularizer("information_dropout", {"bn_batches": 3})
    assert reg.needs_recalibration and not build_regularizer("base").needs_recalibration
    model = reg.prepare(model, context("resnet20"))
    train(reg, model, steps=2)  # running statistics of noisy features
    layers = list(reg.layers)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, SIZE, SIZE, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(4)]
    # reference: training-mode forwards with the noise layers replaced by the identity, BN inputs recorded
    state = snapshot(model)
    seen = {bn: [] for bn in bns}
    handles = [bn.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone())) for bn in bns]
    for layer in layers:
        layer.forward = lambda h: h
    model.train()
    with torch.no_grad():
        for x, _ in batches[:3]:  # bn_batches of them
            model(x)
    for layer in layers:
        del layer.forward
    for h in handles:
        h.remove()
    model.load_state_dict(state)
    expected = {bn: (torch.stack([v.mean((0, 2, 3)) for v in seen[bn]]).mean(0),
                     torch.stack([v.var((0, 2, 3), unbiased=True) for v in seen[bn]]).mean(0)) for bn in bns}
    noisy_means = [bn.running_mean.clone() for bn in bns]
    # re-estimation: the noise layers must be the identity throughout
    calls = []
    watch = [layer.register_forward_hook(lambda m, args, out: calls.append((m.training, torch.equal(args[0], out))))
             for layer in layers]
    model.train()
    momenta = [bn.momentum for bn in bns]
    reg.recalibrate(model, iter(batches))
    for h in watch:
        h.remove()
    assert len(calls) == 3 * len(layers) and all(not training and same for training, same in calls)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert [bn.momentum for bn in bns] == momenta
    for bn, noisy in zip(bns, noisy_means):
        mean, var = expected[bn]
        assert torch.allclose(bn.running_mean, mean, atol=1e-5), bn
        assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-5), bn
    assert any(not torch.allclose(bn.running_mean, noisy, atol=1e-3) for bn, noisy in zip(bns, noisy_means))
    # no batch: the statistics stay as they were
    before = snapshot(model)
    reg.recalibrate(model, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finetune_loads_conv_weights_only():
    source = source_of()
    model = tiny()
    reg = build_regularizer("finetune")
    model = reg.prepare(model, context(source=source))
    state = model.state_dict()
    convs = [k for k in state if ".conv." in k]
    assert convs and sorted(reg.loaded) == sorted(convs)
    for k in state:
        if k in convs:
            assert torch.equal(state[k], source.state_dict[k])
        elif k.endswith("weight") and "fc" in k:
            assert not torch.equal(state[k], source.state_dict[k])  # the classifier starts fresh
    bn = [k for k in state if ".bn.running_mean" in k]
    assert all(torch.equal(state[k], torch.zeros_like(state[k])) for k in bn)  # fresh BN
    train(reg, model)


def test_finetune_refuses_a_source_of_another_architecture():
    reg = build_regularizer("finetune")
    with pytest.raises(WorkbenchError, match="is a conv6_4 but the target network is a conv4_4; fine-tune from a "
                                             "source of the same architecture"):
        reg.prepare(tiny(), context(source=source_of("conv6_4")))
    with pytest.raises(WorkbenchError, match="set finetune_from"):
        reg.prepare(tiny(), context(source=None))


def test_l2sp_pulls_towards_the_source_without_weight_decay_on_it():
    source = source_of()
    model = tiny()
    reg = build_regularizer("l2sp", {"alpha": 0.5})
    model = reg.prepare(model, context(source=source))
    assert reg.penalty().item() == 0.0
    opt, _ = train(reg, model)
    anchored, rest = opt.param_groups
    assert anchored["weight_decay"] == 0.0 and rest["weight_decay"] == 5e-4
    assert len(anchored["params"]) == len(reg.loaded)
    manual = 0.25 * sum(((dict(model.named_parameters())[k] - source.state_dict[k]) ** 2).sum() for k in reg.loaded)
    assert reg.penalty().item() == pytest.approx(manual.item(), rel=1e-5) and manual.item() > 0
    restored = build_regularizer("l2sp")
    restored.prepare(tiny(), context(source=source))
    restored.load_state_dict(reg.state_dict())
    assert all(torch.equal(restored.anchors[k], reg.anchors[k]) for k in reg.anchors)


@pytest.mark.parametrize("method", ["metaperturb", "finetune_metaperturb"])
def test_metaperturb_keeps_phi_frozen_and_out_of_the_optimiser(method, official_phi_path):
    phi = MetaPerturb.load(official_phi_path)
    phi_before = {k: v.clone() for k, v in phi.state_dict().items()}
    source = source_of()
    model = tiny()
    reg = build_regularizer(method)
    model = reg.prepare(model, context(phi=phi, source=source, steps=10))
    sites = [m for m in model.modules() if isinstance(m, PerturbSite)]
    assert len(sites) == 4 and reg.tile_at() is sites[0] and reg.stochastic_eval
    assert all(not p.requires_grad for p in phi.parameters())
    if method == "finetune_metaperturb":
        assert torch.equal(model.features[0].conv.weight, source.state_dict["features.0.conv.weight"])
    opt, _ = train(reg, model, steps=3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in phi.parameters()}
    assert all(torch.equal(phi.state_dict()[k], v) for k, v in phi_before.items())
    assert all(p.grad is None for p in phi.parameters())
    # the schedule: coefficient min(1, step / (0.4 * steps)), clip 100 while training; 1 and no clip at evaluation
    reg.on_train_step(model, 2, 10)
    assert sites[0].noise_coeff == pytest.approx(0.5) and sites[-1].clip == 100.0
    reg.on_eval(model)
    assert all(s.noise_coeff == 1.0 and s.clip is None for s in sites)
    assert not (sites[0].running_mean == 0).all()  # statistics re-estimated on the target batches
    names = reg.sites()[1]
    assert names == ["features.0.act", "features.1.act", "features.2.act", "features.3.act"]


def test_noise_coefficient_values():
    assert noise_coefficient(0, 10000) == 0.0
    assert noise_coefficient(2000, 10000) == pytest.approx(0.5)
    assert noise_coefficient(4000, 10000) == 1.0
    assert noise_coefficient(9999, 10000) == 1.0
    assert noise_coefficient(5, 10, warmup=0.0) == 1.0


def test_feature_methods_use_the_attach_rule_for_torchvision_models():
    torch.manual_seed(0)
    model = build("tv:resnet18", 3, in_channels=1, image_size=SIZE)
    reg = build_regularizer("dropblock")
    reg.prepare(model, context("tv:resnet18"))
    assert reg.place_names == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def test_docs_baselines_table_states_every_registered_setting_with_its_default():
    rows = {}
    for line in (Path(__file__).resolve().parents[1] / "docs" / "baselines.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].startswith("`"):
            rows[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2]
    for name in available_regularizers():
        for key, option in regularizer_class(name).options.items():
            assert (name, key) in rows, f"docs/baselines.md has no row for {name}.{key}"
            default = option.default
            written = str(default).lower() if isinstance(default, bool) else str(default)
            assert rows[(name, key)] == written, f"docs/baselines.md says {name}.{key} = {rows[(name, key)]}, the code {written}"
