"""Evaluation: MC prediction, accuracy/NLL/ECE against torchmetrics, reliability bins, site statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.functional.classification.calibration_error import _binning_bucketize

from workbench.errors import WorkbenchError
from workbench.evaluate import (
    SiteStatistics,
    classification_metrics,
    evaluate,
    expected_calibration_error,
    mc_predict,
    reliability_bins,
)


class NoisyNet(nn.Module):
    """A stochastic toy classifier: deterministic prefix, then multiplicative noise drawn in eval mode too."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.prefix = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.noise = Noise()
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))

    def forward(self, x):
        return self.head(self.noise(self.prefix(x)))


class Noise(nn.Module):
    def forward(self, h):
        return h * F.softplus(torch.randn_like(h) + 1.0)



def noisy_net_and_batch(n):
    """A seeded NoisyNet in eval mode and a batch of n random 8x8 images."""
    torch.manual_seed(0)
    return NoisyNet().eval(), torch.randn(n, 1, 8, 8)

def random_predictions(n=3000, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = F.softmax(torch.randn(n, classes, generator=g) * 2.5, dim=1)
    labels = torch.randint(classes, (n,), generator=g)
    # make it informative so that bins have varied accuracy
    labels = torch.where(torch.rand(n, generator=g) < 0.5, probs.argmax(1), labels)
    return probs, labels


def test_ece_and_bins_agree_with_torchmetrics():
    for seed in range(3):
        probs, labels = random_predictions(seed=seed)
        ours = expected_calibration_error(probs, labels, n_bins=15)
        ref = MulticlassCalibrationError(num_classes=7, n_bins=15, norm="l1")(probs, labels)
        assert ours == pytest.approx(float(ref), abs=1e-6)
        conf, pred = probs.max(1)
        bins = reliability_bins(conf, pred == labels, 15)
        acc_ref, conf_ref, prop_ref = _binning_bucketize(conf, (pred == labels).float(), torch.linspace(0, 1, 16))
        np.testing.assert_allclose(bins["accuracy"], acc_ref[:15].numpy(), atol=1e-6)
        np.testing.assert_allclose(bins["confidence"], conf_ref[:15].numpy(), atol=1e-6)
        np.testing.assert_allclose(bins["count"] / len(labels), prop_ref[:15].numpy(), atol=1e-6)
        assert bins["count"].sum() == len(labels)
        np.testing.assert_allclose(bins["lower"], np.linspace(0, 1, 16)[:-1])


def test_confidence_one_goes_to_last_bin_and_metrics_match_references():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 1])
    bins = reliability_bins(probs.max(1).values, probs.argmax(1) == labels, 15)
    assert bins["count"][-1] == 2 and bins["count"].sum() == 4  # 1.0 and 0.95 are in [14/15, 1]
    p, y = random_predictions(n=500, classes=4, seed=3)
    m = classification_metrics(p, y)
    assert m["accuracy"] == pytest.approx(float(MulticlassAccuracy(num_classes=4, average="micro")(p, y)))
    assert m["nll"] == pytest.approx(float(F.nll_loss(p.log(), y)), rel=1e-6)


def test_mc_with_one_sample_equals_one_noisy_pass():
    model, x = noisy_net_and_batch(6)
    torch.manual_seed(123)
    with torch.no_grad():
        reference = F.softmax(model(x), dim=1)
    torch.manual_seed(123)
    assert torch.equal(mc_predict(model, x, 1), reference)
    torch.manual_seed(123)
    assert torch.equal(mc_predict(model, x, 1, tile_at=model.noise), reference)


def test_mc_chunks_of_one_sample_equal_a_loop_and_tiling_estimates_the_same_mean():
    model, x = noisy_net_and_batch(4)
    torch.manual_seed(7)
    with torch.no_grad():
        loop = torch.stack([F.softmax(model(x), 1) for _ in range(5)]).mean(0)
    torch.manual_seed(7)
    chunked = mc_predict(model, x, 5, max_rows=4)  # one sample per forward
    assert torch.allclose(chunked, loop, atol=1e-6)
    # tiled in one forward: the same expectation within Monte-Carlo error
    tiled = mc_predict(model, x, 200)
    looped = mc_predict(model, x, 200, max_rows=4)
    assert torch.allclose(tiled, looped, atol=0.04)
    assert torch.allclose(tiled.sum(1), torch.ones(4), atol=1e-5)


def test_tiling_at_first_stochastic_module_equals_tiling_at_input():
    model, x = noisy_net_and_batch(5)
    torch.manual_seed(3)
    at_input = mc_predict(model, x, 6)
    torch.manual_seed(3)
    at_noise = mc_predict(model, x, 6, tile_at=model.noise)
    assert torch.allclose(at_input, at_noise, atol=1e-6)


def test_tiled_mc_runs_the_deterministic_prefix_once_per_image_and_estimates_the_same_mean():
    model, x = noisy_net_and_batch(7)
    rows = []
    model.prefix.register_forward_hook(lambda _m, args, _out: rows.append(len(args[0])))
    tiled = mc_predict(model, x, 100, tile_at=model.noise, max_rows=256)
    assert sum(rows) == 7 and max(rows) == 2  # blocks of 2 images x 100 samples, the prefix once per image
    rows.clear()
    at_input = mc_predict(model, x, 100, max_rows=256)
    assert sum(rows) == 7 * 100
    assert torch.allclose(tiled, at_input, atol=0.04) and torch.allclose(tiled.sum(1), torch.ones(7), atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_mc_samples_below_one_is_a_one_line_error(bad):
    with pytest.raises(WorkbenchError, match="Monte-Carlo samples must be an integer >= 1"):
        mc_predict(NoisyNet().eval(), torch.randn(2, 1, 8, 8), bad)


def test_mc_predict_restores_training_mode():
    model = NoisyNet().train()
    mc_predict(model, torch.randn(2, 1, 8, 8), 2)
    assert all(m.training for m in model.modules())


def test_evaluate_forks_the_rng_and_reports_site_scales_of_attached_phi():
    from workbench.attach import attach
    from workbench.models import build
    from workbench.perturb import MetaPerturb

    torch.manual_seed(0)
    model = build("conv4", 3, in_channels=1, image_size=16, width=4)
    phi = MetaPerturb(init_std=0.3)
    handle = attach(model, phi, image_size=16)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 16, 16))  # running statistics move away from their initial values
    x = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8)
    y = torch.randint(3, (10,))
    before = torch.get_rng_state()
    result = evaluate(model, x, y, transform=lambda b: b.float() / 255, samples=3, batch_size=4,
                      sites=handle.sites, site_names=handle.site_names, seed=5)
    assert torch.equal(before, torch.get_rng_state())
    again = evaluate(model, x, y, transform=lambda b: b.float() / 255, samples=3, batch_size=4, seed=5)
    assert torch.equal(result.probs, again.probs)
    assert set(result.site_scales) == set(handle.site_names) and len(result.multiplier_stats) == 4
    heights = _site_heights(model, handle.sites)
    for site, name, height in zip(handle.sites, handle.site_names, heights):
        # in eval mode the scale depends on the running statistics only
        direct = phi.channel_scale(site.running_mean, site.running_var, site.channels / site.channel_norm,
                                   height / site.spatial_norm)
        assert result.site_scales[name].shape == (site.channels,)
        np.testing.assert_allclose(result.site_scales[name], direct.detach().numpy(), atol=1e-6)
    arrays = result.prediction_arrays()
    assert arrays["confidence"].shape == (10,) and arrays["correct"].dtype == np.bool_
    assert result.metrics["mc_samples"] == 3 and result.metrics["n"] == 10


def _site_heights(model, sites):
    heights = {}
    hooks = [s.register_forward_pre_hook(lambda m, a: heights.update({id(m): a[0].shape[2]})) for s in sites]
    with torch.no_grad():
        model.eval()(torch.zeros(2, 1, 16, 16))
    for h in hooks:
        h.remove()
    return [heights[id(s)] for s in sites]


def test_site_statistics_weight_by_rows():
    class Fake(nn.Module):
        pass

    site = Fake()
    stats = SiteStatistics([site], ["a"])
    site.last_scale, site.last_multiplier_stats = torch.tensor([1.0, 3.0]), {"mean": 1.0, "std": 0.0}
    stats.update(10)
    site.last_scale, site.last_multiplier_stats = torch.tensor([3.0, 3.0]), {"mean": 4.0, "std": 2.0}
    stats.update(30)
    np.testing.assert_allclose(stats.scales()["a"], [2.5, 3.0])
    assert stats.multiplier_stats()["a"] == {"mean": 3.25, "std": 1.5}


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(WorkbenchError, match="one label per image"):
        evaluate(NoisyNet(), torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_tiling_falls_back_to_the_input_when_a_later_layer_reuses_earlier_features():
    class DenseLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.noise = Noise()
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x):
            h = self.conv(x)
            return self.head(torch.cat([h, self.noise(h)], dim=1))  # h is used after the noise: not tileable there

    model = DenseLike().eval()
    probs = mc_predict(model, torch.randn(5, 1, 6, 6), 4, tile_at=model.noise)
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
