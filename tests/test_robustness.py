"""PGD/EoT: constraints, step size and random start, effect on a trained toy model, agreement with the Adversarial
Robustness Toolbox."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.robustness import (
    MIN_TRAVEL,
    PAPER_STEPS,
    PixelModel,
    default_step_size,
    eot_gradient,
    perturbation_norm,
    pgd,
    project_l1_ball,
    robustness_curve,
    uniform_in_ball,
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
                             steps=60, batch_size=64)  # 60 x 2.5 eps / 60: 2.5 eps of travel
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
        ours = pgd(model, x, y, norm=norm, eps=eps, steps=12, step_size=step, random_start=False)
        assert torch.allclose(ours, theirs, atol=1e-5), (norm, (ours - theirs).abs().max())
        ours_loss = F.cross_entropy(model(ours), y)
        assert ours_loss.item() == pytest.approx(F.cross_entropy(model(theirs), y).item(), rel=1e-5)


def test_default_step_is_the_papers_at_200_steps_and_larger_for_short_attacks():
    eps = 0.08
    assert PAPER_STEPS == 200 and MIN_TRAVEL == 2.5
    for norm in ("linf", "l2"):
        assert default_step_size(norm, eps) == pytest.approx(0.025 * eps)
        assert default_step_size(norm, eps, 200) == pytest.approx(0.025 * eps)
        assert default_step_size(norm, eps, 1000) == pytest.approx(0.025 * eps)
        assert default_step_size(norm, eps, 10) == pytest.approx(0.25 * eps)
        assert default_step_size(norm, eps, 50) == pytest.approx(0.05 * eps)
    assert default_step_size("l1", eps, 200) == pytest.approx(0.033 * eps)
    assert default_step_size("l1", eps, 5) == pytest.approx(0.5 * eps)
    for steps in (1, 3, 10, 40, 77, 200):  # the total travel reaches eps whatever the number of steps
        assert steps * default_step_size("linf", eps, steps) >= MIN_TRAVEL * eps - 1e-12


@pytest.mark.parametrize("random_start", [False, True])
def test_short_attacks_reach_the_edge_of_the_ball(trained, random_start):
    """With the paper's 0.025 eps step, 10 steps travel 0.25 eps at most: the edge must now be reached."""
    model, x, y = trained
    x, y = x[:64], y[:64]
    eps = 0.05
    adv = pgd(model, x, y, norm="linf", eps=eps, steps=10, random_start=random_start,
              generator=torch.Generator().manual_seed(0))
    linf = perturbation_norm(adv - x, "linf")
    assert (linf >= eps - 1e-6).float().mean() >= 0.9, linf
    # many coordinates (not one per image) sit on the faces of the cube
    assert ((adv - x).abs() >= eps - 1e-6).float().mean() >= 0.5
    eps = 0.5
    adv = pgd(model, x, y, norm="l2", eps=eps, steps=5, random_start=random_start,
              generator=torch.Generator().manual_seed(0))
    l2 = perturbation_norm(adv - x, "l2")
    assert (l2 >= eps * (1 - 1e-4)).float().mean() >= 0.9, l2
    assert l2.max() <= eps * (1 + 1e-5)


def test_a_short_attack_with_the_default_step_beats_the_papers_fixed_step(trained):
    model, x, y = trained
    eps = 0.2
    fixed = pgd(model, x, y, norm="linf", eps=eps, steps=10, step_size=0.025 * eps, random_start=False)
    default = pgd(model, x, y, norm="linf", eps=eps, steps=10, random_start=False)
    assert perturbation_norm(fixed - x, "linf").max() <= 0.25 * eps + 1e-6  # 10 x 0.025 eps: a quarter of the ball
    acc_fixed = (model(fixed).argmax(1) == y).float().mean()
    acc_default = (model(default).argmax(1) == y).float().mean()
    assert acc_default < acc_fixed - 0.5, (acc_default, acc_fixed)


def test_random_start_is_on_below_200_steps_seeded_and_uniform_in_the_ball(trained):
    model, x, y = trained
    x, y = x[:16], y[:16]
    eps = 0.05

    def start(steps, seed, **kw):  # a zero step size leaves the attack at its start
        return pgd(model, x, y, norm="linf", eps=eps, steps=steps, step_size=0.0,
                   generator=torch.Generator().manual_seed(seed), **kw)

    moved = start(10, 0)
    assert 0 < perturbation_norm(moved - x, "linf").max() <= eps + 1e-7
    assert torch.equal(moved, start(10, 0)) and not torch.equal(moved, start(10, 1))
    assert torch.equal(start(PAPER_STEPS, 0), x)  # the paper's protocol: no random start
    assert torch.equal(start(10, 0, random_start=False), x)
    assert torch.equal(start(10, 0, random_init=False), x)  # the former name still works
    assert torch.equal(start(PAPER_STEPS, 0, random_start=True), moved)
    # uniform in the ball, checked in two dimensions: P(||v|| <= eps / 2) = 1/4 for every norm
    g = torch.Generator().manual_seed(0)
    for norm, p in (("linf", float("inf")), ("l2", 2.0), ("l1", 1.0)):
        v = uniform_in_ball((20000, 2), norm, 3.0, generator=g)
        r = v.norm(p=p, dim=1)
        assert r.max() <= 3.0 + 1e-5
        assert (r <= 1.5).float().mean() == pytest.approx(0.25, abs=0.015), norm
        assert v.mean(0).abs().max() < 0.05, norm
        # direction uniform over the four quadrants
        quadrant = (v[:, 0] > 0).long() * 2 + (v[:, 1] > 0).long()
        assert torch.bincount(quadrant, minlength=4).float().div(len(v)).sub(0.25).abs().max() < 0.015, norm
    # high dimension: the starts are uniform in the ball, so nearly all on its edge
    v = uniform_in_ball((200, 1, 6, 6), "l2", 0.5, generator=g)
    assert v.shape == (200, 1, 6, 6) and perturbation_norm(v, "l2").min() > 0.5 * 0.8


def test_robustness_curve_is_reproducible_for_a_seed_with_random_starts(trained):
    model, x, y = trained
    kw = dict(norms=["linf", "l2"], epsilons={"linf": [0.08, 0.12], "l2": [0.6]}, steps=5, batch_size=64)
    first = robustness_curve(NoisyToy(model), x, y, eot_samples=2, mc_samples=2, seed=3, **kw)
    assert robustness_curve(NoisyToy(model), x, y, eot_samples=2, mc_samples=2, seed=3, **kw) == first
    # a radius's result does not depend on the other radii listed
    alone = robustness_curve(model, x, y, norms=["linf"], epsilons=[0.12], steps=5, seed=3)
    both = robustness_curve(model, x, y, norms=["linf"], epsilons=[0.08, 0.12], steps=5, seed=3)
    assert alone["linf"]["accuracy"][0] == both["linf"]["accuracy"][1]


def test_short_linf_attack_agrees_with_art_projected_gradient_descent(trained):
    """Same eps, default step for 10 steps, no random start, untargeted cross-entropy: the same adversarial
    predictions as ART's ``ProjectedGradientDescent`` (which runs its PyTorch implementation here)."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    model, x, y = trained
    eps, steps = 0.17, 10
    step = default_step_size("linf", eps, steps)
    assert step == pytest.approx(0.25 * eps)
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 6, 6), nb_classes=2,
                                   clip_values=(0.0, 1.0), device_type="cpu")
    attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                      targeted=False, num_random_init=0, batch_size=len(x), verbose=False)
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    ours = pgd(model, x, y, norm="linf", eps=eps, steps=steps, random_start=False)
    with torch.no_grad():
        pred_ours, pred_theirs = model(ours).argmax(1), model(theirs).argmax(1)
    acc_ours, acc_theirs = (pred_ours == y).float().mean(), (pred_theirs == y).float().mean()
    clean = (model(x).argmax(1) == y).float().mean()
    assert 0.2 < acc_ours < clean - 0.2  # the attack does something, not everything: agreement means something
    assert (pred_ours == pred_theirs).float().mean() >= 0.98
    assert float(acc_ours) == pytest.approx(float(acc_theirs), abs=1.5 / len(x))
    assert (ours - theirs).abs().max() < 1e-5


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
