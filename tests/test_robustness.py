"""PGD/EoT: constraints, effect on a trained toy model, agreement with the Adversarial Robustness Toolbox."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.robustness import (
    PixelModel,
    eot_gradient,
    perturbation_norm,
    pgd,
    project_l1_ball,
    robustness_curve,
)


def toy_data(n=256, seed=0):
    """Two classes of 1x6x6 images in [0, 1]: a bright top half or a bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g)
    x = torch.rand(n, 1, 6, 6, generator=g) * 0.4 + 0.1
    x[y == 0, :, :3] += 0.35
    x[y == 1, :, 3:] += 0.35
    return x.clamp(0, 1), y


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))


@pytest.fixture(scope="module")
def trained():
    model = toy_model()
    x, y = toy_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = toy_data(128, seed=1)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.95
    return model, xt, yt


class NoisyToy(nn.Module):
    """Stochastic in eval mode (EoT needed)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x * (1 + 0.3 * torch.randn_like(x)))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5), ("l1", 2.0)])
def test_pgd_stays_in_the_ball_and_the_valid_range(trained, norm, eps):
    model, x, y = trained
    for m in (model, NoisyToy(model)):
        adv = pgd(m, x[:32], y[:32], norm=norm, eps=eps, steps=8, eot_samples=3 if m is not model else 1)
        assert perturbation_norm(adv - x[:32], norm).max() <= eps * (1 + 1e-5) + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
    # a large step size must still be projected
    adv = pgd(model, x[:32], y[:32], norm=norm, eps=eps, steps=3, step_size=10 * eps, random_init=True)
    assert perturbation_norm(adv - x[:32], norm).max() <= eps * (1 + 1e-5) + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


def test_pgd_lowers_accuracy_of_a_trained_model(trained):
    model, x, y = trained
    clean = (model(x).argmax(1) == y).float().mean()
    curve = robustness_curve(model, x, y, norms=["linf", "l2", "l1"],
                             epsilons={"linf": [0.0, 0.3], "l2": [0.0, 2.0], "l1": [0.0, 12.0]},
                             steps=60, batch_size=64)  # 60 x 0.025 eps: 1.5 eps of travel
    for norm in ("linf", "l2", "l1"):
        acc0, acc1 = curve[norm]["accuracy"]
        assert acc0 == pytest.approx(float(clean))
        assert acc1 < clean - 0.3, (norm, curve[norm])


def test_linf_and_l2_agree_with_adversarial_robustness_toolbox(trained):
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    model, x, y = trained
    x, y = x[:48], y[:48]
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 6, 6), nb_classes=2,
                                   clip_values=(0.0, 1.0), device_type="cpu")
    for norm, art_norm, eps in (("linf", np.inf, 0.1), ("l2", 2, 0.6)):
        step = 0.025 * eps * 4
        attack = ProjectedGradientDescentPyTorch(classifier, norm=art_norm, eps=eps, eps_step=step, max_iter=12,
                                                 num_random_init=0, batch_size=len(x), verbose=False)
        theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
        ours = pgd(model, x, y, norm=norm, eps=eps, steps=12, step_size=step)
        assert torch.allclose(ours, theirs, atol=1e-5), (norm, (ours - theirs).abs().max())
        ours_loss = F.cross_entropy(model(ours), y)
        assert ours_loss.item() == pytest.approx(F.cross_entropy(model(theirs), y).item(), rel=1e-5)


def test_l1_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 3, 4, 4, generator=g)
    eps = 5.0
    w = project_l1_ball(v, eps)
    norms = w.flatten(1).abs().sum(1)
    outside = v.flatten(1).abs().sum(1) > eps
    assert torch.allclose(norms[outside], torch.full_like(norms[outside], eps), atol=1e-4)
    assert torch.equal(w[~outside], v[~outside])
    # reference: soft thresholding with theta found by bisection
    for row_v, row_w in zip(v.flatten(1)[outside], w.flatten(1)[outside]):
        lo, hi = 0.0, float(row_v.abs().max())
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (row_v.abs() - mid).clamp_min(0).sum() > eps else (lo, mid)
        expected = row_v.sign() * (row_v.abs() - lo).clamp_min(0)
        assert torch.allclose(row_w, expected, atol=1e-4)


def test_eot_gradient_is_the_mean_of_single_pass_gradients(trained):
    model, x, y = trained
    x = x[:8]
    assert torch.allclose(eot_gradient(model, x, y[:8], 4), eot_gradient(model, x, y[:8], 1), atol=1e-6)
    noisy = NoisyToy(model)
    torch.manual_seed(3)
    chunked = eot_gradient(noisy, x, y[:8], 3, max_rows=8)  # one sample per pass
    torch.manual_seed(3)
    singles = []
    for _ in range(3):
        xr = x.clone().requires_grad_(True)
        singles.append(torch.autograd.grad(F.cross_entropy(noisy(xr), y[:8], reduction="sum"), xr)[0])
    assert torch.allclose(chunked, torch.stack(singles).mean(0), atol=1e-6)


def test_pixel_model_normalises():
    base = nn.Conv2d(3, 2, 1)
    wrapped = PixelModel(base, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    x = torch.rand(2, 3, 4, 4)
    expected = base((x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1))
    assert torch.allclose(wrapped(x), expected)


def test_bad_attack_settings_are_one_line_errors(trained):
    model, x, y = trained
    with pytest.raises(WorkbenchError, match="unknown attack norm"):
        pgd(model, x[:2], y[:2], norm="l3", eps=0.1, steps=1)
    with pytest.raises(WorkbenchError, match="Monte-Carlo samples"):
        pgd(model, x[:2], y[:2], norm="linf", eps=0.1, steps=1, eot_samples=0)
    with pytest.raises(WorkbenchError, match="eps"):
        pgd(model, x[:2], y[:2], norm="linf", eps=-1.0, steps=1)
