"""The functions behind every control of the notebooks: the phi explorer (``workbench.explore``) shows what the
site computed (its ``last_scale``, the multiplier it applied, the statistics phi saw), follows each selection, is
channel-permutation equivariant like phi, and reads trained networks; the reading notebooks' filters
(``workbench.filters``) agree with the runs' own artifacts; ``workbench.controls`` re-renders when a control moves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench import controls, explore, filters, plots, study
from workbench._fused import relu_and_pool
from workbench.artifacts import RunStore
from workbench.attach import attach
from workbench.errors import WorkbenchError
from workbench.meta_train import initial_phi
from workbench.models import build
from workbench.perturb import MetaPerturb, reference_perturb
from workbench.study import ExploreConfig

import dashboard_fixtures as fixtures
from helpers import OFFICIAL_PHI, require_shared

CLASSES = 10


def _phi(seed: int, std: float = 0.5) -> MetaPerturb:
    torch.manual_seed(seed)
    return MetaPerturb(init_std=std).requires_grad_(False)


def _images(count: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with a meta-training run (phi.pt, phi_init.pt), a finished transfer run of a Conv-4 with its
    network, and the synthetic npz dataset both use."""
    from workbench.transfer import transfer

    require_shared(OFFICIAL_PHI)  # the transfer run's phi
    base = tmp_path_factory.mktemp("explore")
    rng = np.random.default_rng(0)
    per_class = 12
    y = np.repeat(np.arange(CLASSES), per_class)
    x = (rng.random((len(y), 8, 8, 3)) * 120 + y[:, None, None, None] * 12).astype(np.uint8)
    data = base / "shapes.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[::-1].copy(), y_test=y[::-1].copy(),
             classes=np.asarray([f"class{i}" for i in range(CLASSES)]))
    store = RunStore(base / "artifacts")
    with fixtures.fast_environment():
        meta = fixtures.write_meta_train_run(store, seed=0)
    _phi(3).save(meta.path / "phi.pt")
    initial_phi(0).save(meta.path / "phi_init.pt")
    result = transfer({"target": f"npz:{data}", "arch": "conv4_8", "method": "metaperturb", "phi": "official",
                       "per_class": 4, "image_size": 8, "steps": 2, "batch_size": 8, "final_mc_samples": 1,
                       "eval_mc_samples": 1, "eval_every": 0, "test_per_class": 2, "threads": 1, "device": "cpu",
                       "seed": 0}, store, progress=False)
    return {"store": store, "meta": meta.run_id, "transfer": result.run_id, "data": f"npz:{data}"}


@pytest.fixture
def explorer(world):
    return explore.PhiExplorer(world["store"])


def _config(world, **values) -> ExploreConfig:
    defaults = {"phi": world["meta"], "compare": "official", "network": None, "arch": "conv4_8",
                "dataset": world["data"], "image_size": 8, "batch_size": 8, "site": 1, "channels": [0, 1]}
    return ExploreConfig.from_dict({**defaults, **values})


# ======================================================================================= the site, exactly
@pytest.mark.parametrize("arch,site", [("conv4_8", 1), ("resnet20", 4), ("wrn16_4", 2)])
def test_the_scale_shown_is_the_sites_last_scale_for_that_batch(arch, site):
    phi, x = _phi(1), _images()
    torch.manual_seed(5)
    model = build(arch, CLASSES, image_size=16)
    twin = build(arch, CLASSES, image_size=16)
    twin.load_state_dict(model.state_dict())
    view, names = explore.site_view(model, phi, x, site, seed=7)

    # the same network run by hand: one site active, batch statistics; its own last_scale
    handle = attach(twin, phi, image_size=16)
    handle.set_active(False)
    handle.sites[site].active = True
    twin.train()
    with torch.no_grad():
        twin(x)
    assert names == handle.site_names
    # (the hand-run site takes the fused fast path, the explorer's the plain one: the same function to rounding)
    torch.testing.assert_close(view.scale, handle.sites[site].last_scale, rtol=1e-5, atol=1e-6)
    assert view.stats["scale"].to_numpy() == pytest.approx(view.scale.double().numpy(), abs=0)
    # and it is sigmoid of the logit the statistics table shows (phi's formula, recomputed from the table)
    assert torch.sigmoid(torch.tensor(view.stats["logit"].to_numpy())).numpy() == pytest.approx(
        view.scale.double().numpy(), abs=1e-5)
    handle.remove()
    assert not any("perturb_site" in k for k in model.state_dict()), "the explorer detached phi again"


@pytest.mark.parametrize("arch,site", [("conv4_8", 0), ("conv4_8", 3), ("resnet20", 8), ("wrn16_4", 1)])
@pytest.mark.parametrize("k", [1.0, 0.3])
def test_the_multiplier_is_exactly_what_the_site_applied(arch, site, k):
    phi, x = _phi(2), _images()
    torch.manual_seed(1)
    view, _ = explore.site_view(build(arch, CLASSES, image_size=16), phi, x, site, noise_coeff=k, seed=3)
    # what the site returned is the explorer's perturbed map through the layer's ReLU (and pool) it stands in for
    torch.testing.assert_close(relu_and_pool(view.out, view.relu, view.pool), view.site_output, rtol=0, atol=0)
    torch.testing.assert_close(view.out, view.h * view.multiplier, rtol=0, atol=0)
    # the multiplier is 1 + k (s z - 1) with z = softplus(mu + eps) for the eps shown
    z = F.softplus(phi.noise_mean(view.h) + view.eps)
    expected = 1 + k * (view.scale.view(1, -1, 1, 1) * z - 1)
    torch.testing.assert_close(view.multiplier, expected, rtol=1e-5, atol=1e-5)
    # the original implementation's formula on the site's input gives the same map
    c = view.h.shape[1]
    assert view.spatial_norm == 16
    reference = reference_perturb(view.h, phi, torch.zeros(c, 4), torch.ones(c, 4), channel_norm=view.channel_norm,
                                  spatial_norm=view.spatial_norm, eps=view.eps, noise_coeff=k)
    torch.testing.assert_close(reference, view.out, rtol=1e-4, atol=1e-4)


def test_permuting_channels_permutes_the_explorers_per_channel_scales():
    phi, x = _phi(4), _images(count=6)
    torch.manual_seed(0)
    model = build("conv4_8", CLASSES, image_size=16)
    permuted = build("conv4_8", CLASSES, image_size=16)
    permuted.load_state_dict(model.state_dict())
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    block = permuted.features[0]
    with torch.no_grad():  # permute the first block's output channels: the site's input is permuted
        block.conv.weight.copy_(block.conv.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn, name).copy_(getattr(block.bn, name)[perm])
    view, _ = explore.site_view(model, phi, x, 0)
    moved, _ = explore.site_view(permuted, phi, x, 0)
    torch.testing.assert_close(moved.h, view.h[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved.scale, view.scale[perm], rtol=1e-5, atol=1e-6)
    columns = ["scale", "m1", "m4", "v2", "mean term", "variance term", "logit"]
    np.testing.assert_allclose(moved.stats[columns].to_numpy(), view.stats[columns].to_numpy()[perm.numpy()],
                               rtol=1e-4, atol=1e-6)
    # the table function itself, on any map: a permuted map gives the permuted rows
    h = torch.randn(4, 6, 9, 9)
    order = torch.randperm(6)
    a = explore.channel_statistics(phi, h, 64, 32)
    b = explore.channel_statistics(phi, h[:, order], 64, 32)
    np.testing.assert_allclose(b.drop(columns="channel").to_numpy(),
                               a.drop(columns="channel").to_numpy()[order.numpy()], rtol=1e-4, atol=1e-6)


def test_a_site_out_of_range_is_refused_and_phi_is_detached():
    model = build("conv4_8", CLASSES, image_size=16)
    before = set(model.state_dict())
    with pytest.raises(WorkbenchError, match=r"site 4: this PlainConvNet has 4 perturbation sites \(0 .. 3\)"):
        explore.site_view(model, _phi(0), _images(), 4)
    assert set(model.state_dict()) == before


# ================================================================================ the explorer's selection
def test_every_control_changes_what_is_shown(world, explorer):
    config = _config(world)
    base = explorer.explore(config)
    assert [v.label for v in base.views][1] == "metaperturb (authors' phi)"
    assert base.views[0].label == f"metaperturb (ours: …{world['meta'][-4:]})"
    assert base.site == "1: features.1.act" and base.channels == 8

    other_phi = explorer.explore(config, phi="official", compare=None)
    assert len(other_phi.views) == 1
    torch.testing.assert_close(other_phi.views[0].scale, base.views[1].scale)  # the same phi, the same batch
    assert not torch.equal(base.views[0].scale, base.views[1].scale)

    site = explorer.explore(config, site=2)
    assert site.site == "2: features.2.act" and site.views[0].h.shape[-1] == base.views[0].h.shape[-1] // 2

    batch = explorer.explore(config, batch=1)
    assert not torch.equal(batch.images, base.images) and not torch.equal(batch.views[0].scale, base.views[0].scale)
    image = explorer.explore(config, image=3)
    torch.testing.assert_close(image.views[0].scale, base.views[0].scale)  # same batch: same statistics
    maps = explore.feature_maps(image)
    assert np.asarray(maps.data[0].z).tolist() == image.images[3].permute(1, 2, 0).numpy().tolist()
    assert "image 3 (" in maps.layout.title.text

    arch = explorer.explore(config, arch="conv4", site=0)
    assert arch.channels == 64 and arch.network == "a fresh conv4 (seed 0)"
    seed = explorer.explore(config, seed=1)
    assert not torch.equal(seed.views[0].h, base.views[0].h)

    # the noise coefficient: k = 0 leaves the map alone; any k is 1 + k (s z - 1) with the same s z
    off = explorer.explore(config, noise_coeff=0.0)
    assert torch.equal(off.views[0].multiplier, torch.ones_like(off.views[0].multiplier))
    torch.testing.assert_close(off.views[0].out, off.views[0].h)
    half = explorer.explore(config, noise_coeff=0.5)
    torch.testing.assert_close(half.views[0].multiplier, 1 + 0.5 * (base.views[0].multiplier - 1), rtol=1e-5,
                               atol=1e-6)
    assert "k = 0.5" in explore.multiplier_figure(half).layout.title.text

    # the channels shown, and the statistic the scale is plotted against
    shown = explore.feature_maps(explorer.explore(config, channels=[3, 5, 6]))
    assert [a.text for a in shown.layout.annotations if a.text.startswith("channel ")] == \
        ["channel 3", "channel 5", "channel 6"]
    for statistic in ("m2", "v3", "logit", "variance term"):
        figure = explore.scale_figure(base, statistic)
        assert list(figure.data[0].x) == pytest.approx(base.views[0].stats[statistic].tolist())
        assert list(figure.data[0].y) == pytest.approx(base.views[0].scale.double().tolist())
    with pytest.raises(WorkbenchError, match="channels \\[9\\]: site 1 \\(features.1.act\\) has 8 channels"):
        explorer.explore(config, channels=[0, 9])


def test_the_multiplier_histogram_counts_what_the_site_applied(world, explorer):
    exploration = explorer.explore(_config(world))
    figure = explore.multiplier_figure(exploration)
    assert len(figure.data) == 2
    for trace, view in zip(figure.data, exploration.views):
        width = float(trace.width)
        assert sum(trace.y) * width == pytest.approx(1.0, rel=1e-6)  # a density over the values
        stats = view.multiplier_stats
        assert f"mean {stats['mean']:.3f}, std {stats['std']:.3f}" in trace.name
        centres = np.asarray(trace.x)
        mean = float(np.sum(centres * np.asarray(trace.y) * width))
        assert mean == pytest.approx(float(view.multiplier.double().mean()), abs=width)


def test_the_untrained_control_is_the_phi_the_run_started_from(world, explorer):
    config = _config(world, compare="untrained")
    exploration = explorer.explore(config)
    control = exploration.views[1]
    assert control.label == f"metaperturb (untrained control): …{world['meta'][-4:]}"
    phi, _ = explorer.load_phi(f"untrained:{world['meta']}")
    assert all(torch.equal(a, b) for a, b in zip(phi.state_dict().values(), initial_phi(0).state_dict().values()))
    assert control.scale.sub(0.5).abs().max() < 0.05, "an untrained phi's scale is about sigmoid(0)"
    latest = explorer.explore(config, phi="latest", compare="untrained:latest")
    torch.testing.assert_close(latest.views[1].scale, control.scale)
    fresh, label = explorer.load_phi("untrained", first="official")
    assert label == "metaperturb (untrained control)"
    with pytest.raises(WorkbenchError, match="untrained:<run id>"):
        explorer.explore(config, phi="untrained")


def test_choices_list_the_stores_phis_and_trained_networks(world, explorer):
    phis = dict((v, k) for k, v in explorer.phi_choices())
    assert phis["official"] == "metaperturb (authors' phi)"
    assert phis[world["meta"]] == f"metaperturb (ours: …{world['meta'][-4:]})"
    assert f"untrained:{world['meta']}" in phis and "latest" in phis and "untrained" in phis
    assert explorer.phi_choices(none=True)[0] == ("none", None)
    file_phi = world["store"].root / "mine.pt"
    _phi(9).save(file_phi)
    assert dict((v, k) for k, v in explorer.phi_choices(str(file_phi)))[str(file_phi)] == "metaperturb (ours: mine)"
    networks = dict((v, k) for k, v in explorer.network_choices())
    assert networks[None] == "fresh network (seeded)"
    assert world["transfer"] in networks and networks["latest"].startswith("latest transfer run")
    assert world["data"] in explorer.dataset_choices(world["data"])
    assert explorer.batch_count(world["data"], "test", 8) == 120 // 8


def test_a_trained_networks_features_are_its_own(world, explorer):
    """With a finished transfer run's network the site's input is what its trained layers compute (evaluation-mode
    BatchNorm), on the run's own normalisation; its MetaPerturb sites are not loaded, phi is ours to choose."""
    from workbench.data import Augment, load_dataset
    from workbench.transfer import load_network_payload

    exploration = explorer.explore(_config(world, network="latest", dataset=None, site=0, channels=[0]))
    assert exploration.network.startswith(f"the trained conv4_8 of run …{world['transfer'][-4:]} (metaperturb, ")
    assert exploration.dataset == world["data"], "the network's own target by default"
    payload, _ = load_network_payload(world["transfer"], world["store"])
    model = build("conv4_8", CLASSES, image_size=8)
    own = model.state_dict()
    model.load_state_dict({k: payload["state_dict"][k] for k in own})
    model.eval()
    ds = load_dataset(world["data"])
    x = Augment(8, padding=0, flip=False, mean=payload["mean"], std=payload["std"]).normalize(ds.x_test[:8])
    with torch.no_grad():
        block = model.features[0]
        expected = block.bn(block.conv(x))
    torch.testing.assert_close(exploration.views[0].h, expected, rtol=1e-5, atol=1e-5)
    fresh = explorer.explore(_config(world, site=0, channels=[0]))
    assert not torch.allclose(fresh.views[0].h, exploration.views[0].h)
    by_id = explorer.explore(_config(world, network=world["transfer"], site=0, channels=[0]))
    torch.testing.assert_close(by_id.views[0].h, exploration.views[0].h)


def test_bad_selections_are_refused_with_one_line(world, explorer):
    with pytest.raises(WorkbenchError, match="image must be an index into the batch"):
        ExploreConfig.from_dict({"image": 8, "batch_size": 8})
    with pytest.raises(WorkbenchError, match="statistic must be one of"):
        ExploreConfig.from_dict({"statistic": "median"})
    with pytest.raises(WorkbenchError, match="batch_size must be >= 2"):
        ExploreConfig.from_dict({"batch_size": 1})
    with pytest.raises(WorkbenchError, match="batch 99 of 8 images is past the end"):
        explorer.explore(_config(world, batch=99))
    with pytest.raises(WorkbenchError, match="neither 'official', a phi file, nor a run id"):
        explorer.explore(_config(world, phi="nope"))
    assert explore.parse_channels("0, 2-4 ,7") == [0, 2, 3, 4, 7]
    with pytest.raises(WorkbenchError, match="write channel indices like"):
        explore.parse_channels("zero")


def test_the_per_channel_table_has_a_row_per_phi_and_channel(world, explorer):
    exploration = explorer.explore(_config(world))
    table = explore.channel_table(exploration)
    assert len(table) == 2 * 8 and list(table["phi"].unique()) == [v.label for v in exploration.views]
    for view in exploration.views:
        rows = table[table["phi"] == view.label]
        assert rows["scale"].to_numpy() == pytest.approx(view.scale.double().numpy(), abs=0)
    assert len(explore.figures(exploration)) == 3


# ============================================================================== the reading notebooks' filters
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters") / "artifacts"
    store = fixtures.populate(root, targets=("cifar10", "mnist_test10k"), archs=("resnet20", "conv4"),
                              methods=("base", "dropblock", "metaperturb"), seeds=(0, 1))
    runs = study.study_runs(store, study.find_study(store, "latest"))
    return store, runs


def test_choices_offer_all_then_each_value(grid):
    _, runs = grid
    assert filters.run_choices(runs, "target") == [("all", "all"), ("cifar10", "cifar10"),
                                                   ("mnist_test10k", "mnist_test10k")]
    methods = [v for _, v in filters.run_choices(runs, "method")]
    assert methods[:2] == ["all", "base"] and "metaperturb (authors' phi)" in methods
    assert [v for _, v in filters.run_choices(runs, "seed")] == ["all", 0, 1]
    run_ids = [v for _, v in filters.run_choices(runs, "run")][1:]
    assert sorted(run_ids) == sorted(runs["run_id"])
    with pytest.raises(WorkbenchError, match="cannot filter by 'colour'"):
        filters.run_choices(runs, "colour")


def test_unfiltered_figures_are_the_notebooks_static_figures(grid):
    store, runs = grid
    accuracy = study.summarize(runs, "test_accuracy")
    assert filters.metric_figure(runs).to_dict() == plots.metric_bars(accuracy, "test accuracy").to_dict()
    assert filters.delta_figure(runs).to_dict() == plots.delta_bars(accuracy, "test accuracy").to_dict()
    ece = study.summarize(runs, "test_ece")
    assert filters.metric_figure(runs, "test_ece").to_dict() == plots.metric_bars(
        ece, "ECE", title="Expected calibration error (lower is better)").to_dict()
    assert filters.reliability_figure(store, runs).to_dict() == plots.reliability_diagrams(
        study.reliability_groups(store, runs)).to_dict()
    assert filters.robustness_figure(store, runs).to_dict() == plots.robustness_curves(
        study.robustness_table(store, runs)).to_dict()
    scales = study.scale_data(store, runs, 2)
    assert filters.profile_figure(store, runs).to_dict() == plots.layer_profile(scales.profile).to_dict()
    assert filters.heatmap_figure(store, runs, 2).to_dict() == plots.scale_heatmaps(scales.heatmaps).to_dict()


def test_a_filtered_figure_shows_the_selected_runs_numbers(grid):
    store, runs = grid
    row = runs[(runs["method"] == "metaperturb") & (runs["target"] == "cifar10") & (runs["arch"] == "conv4")
               & (runs["seed"] == 1)].iloc[0]
    summary = store.run_record(row.run_id).summary
    selection = dict(target="cifar10", arch="conv4", method="metaperturb", seed=1)
    assert len(filters.select_runs(runs, **selection)) == 1
    figure = filters.metric_figure(runs, "test_nll", **selection)
    assert [list(t.y) for t in figure.data] == [[pytest.approx(summary["test_nll"])]]
    assert "seed = 1" in figure.layout.title.text
    # two seeds: the bar is their mean
    both = filters.metric_figure(runs, **{**selection, "seed": "all"})
    values = [store.run_record(r).summary["test_accuracy"] for r in
              filters.select_runs(runs, target="cifar10", arch="conv4", method="metaperturb")["run_id"]]
    assert list(both.data[0].y) == [pytest.approx(np.mean(values))]
    # the difference to Base keeps Base as the reference whatever the method filter
    delta = filters.delta_figure(runs, **selection)
    base = store.run_record(filters.select_runs(runs, target="cifar10", arch="conv4", method="base",
                                                seed=1)["run_id"][0]).summary["test_accuracy"]
    assert [t.name for t in delta.data] == ["metaperturb (authors' phi)"]
    assert list(delta.data[0].y) == [pytest.approx(summary["test_accuracy"] - base)]
    # the selected run's reliability bins, robustness curve and scales, as its arrays hold them
    run = store.open_run(row.run_id)
    bins = run.load_arrays("reliability")
    used = bins["count"] > 0
    reliability = filters.reliability_figure(store, runs, run=row.run_id)
    curve = [t for t in reliability.data if t.name == row.label][0]
    assert list(curve.y) == pytest.approx(bins["accuracy"][used].tolist())
    scales = run.load_arrays("site_scales")["scale"]
    profile = filters.profile_figure(store, runs, run=row.run_id)
    assert list(profile.data[0].y) == pytest.approx(np.nanmean(scales, axis=1).tolist())
    heatmap = filters.heatmap_figure(store, runs, 6, run=row.run_id)
    np.testing.assert_allclose(np.asarray(heatmap.data[0].z, dtype=float), scales, rtol=1e-6)
    robust_row = runs[(runs["method"] == "metaperturb") & (runs["target"] == "cifar10") & (runs["arch"] == "conv4")
                      & (runs["seed"] == 0)].iloc[0]
    arrays = store.open_run(robust_row.run_id).load_arrays("robustness")
    robustness = filters.robustness_figure(store, runs, run=robust_row.run_id)
    curves = sorted([float(v) for v in t.y] for t in robustness.data)
    clean = float(arrays["clean_accuracy"])
    expected = sorted([clean] + arrays[f"{norm}_accuracy"].tolist() for norm in ("l2", "linf"))
    assert len(curves) == 2 and all(c == pytest.approx(e) for c, e in zip(curves, expected))


def test_a_selection_without_runs_says_so(grid):
    store, runs = grid
    empty = filters.metric_figure(runs, target="cifar10", seed=7)
    assert empty.layout.annotations[0].text == "no runs match this selection"
    base_only = filters.profile_figure(store, runs, method="base")
    assert "no selected run recorded scales" in base_only.layout.annotations[0].text
    with pytest.raises(WorkbenchError, match="metric must be one of"):
        filters.metric_figure(runs, "accuracy")


# ======================================================================================= the widget plumbing
def test_a_panel_renders_again_when_a_control_moves(grid):
    _, runs = grid
    widgets = controls.filters(runs, "target", "seed")
    assert widgets["target"].value == "all" and widgets["seed"].value == "all"
    calls = []

    def render(target, seed):
        calls.append((target, seed))
        return [filters.metric_figure(runs, target=target, seed=seed)]

    panel = controls.show(render, **widgets)
    assert calls == [("all", "all")] and len(panel.figures) == 1 and len(panel.outputs) == 1
    first = panel.figures[0].to_dict()
    widgets["target"].value = "cifar10"
    assert calls[-1] == ("cifar10", "all")
    assert panel.figures[0].to_dict() != first and "target = cifar10" in panel.figures[0].layout.title.text
    assert set(panel.figures[0].data[0].x) == {"cifar10"}


def test_a_refused_selection_shows_its_reason_in_place_of_the_figure():
    slider = controls.slider(0, 5, 1, 1, "site")
    text = controls.text("0, 1", "channels")

    def render(site, channels):
        if site > 3:
            raise WorkbenchError(f"site {site}: this network has 4 sites")
        return [plots.empty(f"site {site} {explore.parse_channels(channels)}", "ok"), plots.empty("second", "ok")]

    panel = controls.show(render, site=slider, channels=text)
    slider.value = 5
    assert panel.error == "site 5: this network has 4 sites"
    assert panel.figures[0].layout.annotations[0].text == panel.error
    assert panel.figures[1].layout.title.text == "second", "the other figures stay"
    slider.value = 2
    text.value = "3-4"
    assert panel.error is None and panel.figures[0].layout.title.text == "site 2 [3, 4]"


def test_dropdowns_start_at_their_value_even_when_it_is_none():
    network = controls.dropdown([("fresh network", None), ("run …ab12", "x-ab12")], None, "network")
    assert network.value is None and network.label == "fresh network"
    arch = controls.dropdown(["resnet20", "conv4"], "vgg9", "arch")
    assert arch.value == "vgg9" and arch.options[-1] == ("vgg9", "vgg9")
    assert controls.dropdown(["a", "b"]).value == "a"
    assert isinstance(controls.slider(0.0, 2.0, 0.05, 1.0).value, float)
    assert controls.slider(0, 3, 1, 9).value == 3
