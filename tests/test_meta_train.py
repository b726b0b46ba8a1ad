"""Meta-training: which parameters each verb changes, phi's averaged gradient, the look-ahead gradient against finite
differences, artifacts, resume after SIGKILL, NaN handling, run selection, config errors, the CLI."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workbench.artifacts import RunStore
from workbench.cli import main as cli_main
from workbench.data import ImageDataset
from workbench.errors import WorkbenchError
from workbench.lookahead import lookahead_meta_grad, twice_differentiable
from workbench.meta_train import (MetaTrainConfig, MetaTrainer, TaskRNG, batchnorm_eval, meta_train,
                                  prepare_source)
from workbench.perturb import MetaPerturb, PerturbSite

from helpers import TINY, save_npz, synthetic_dataset  # noqa: F401 (test_gpu and test_compiled import it here)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    return synthetic_dataset()


def make_trainer(dataset, **overrides) -> MetaTrainer:
    config = MetaTrainConfig.from_dict({**TINY, **overrides})
    data = prepare_source(config, dataset)
    return MetaTrainer(config, data.tasks, device="cpu", mean=data.mean, std=data.std, flip=data.flip)


def task_steps_then_heldout_batches(trainer: MetaTrainer) -> dict:
    """One task step on every slot, then each slot's next held-out batch: what a meta step is given."""
    batches = {}
    for slot in trainer.slots:
        with slot.rng.active():
            trainer.task_step(slot, next(slot.train_iter))
        batches[slot.index] = next(slot.valid_iter)
    return batches


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------------ the verbs
def test_task_step_changes_only_its_own_network(dataset):
    trainer = make_trainer(dataset)
    slot, other = trainer.slots
    phi0, own0, other0 = snapshot(trainer.phi), snapshot(slot.model), snapshot(other.model)
    with slot.rng.active():
        trainer.task_step(slot, next(slot.train_iter))
    assert changed(phi0, trainer.phi) == set(), "task_step must not move phi"
    assert changed(other0, other.model) == set(), "task_step must not touch another task"
    moved = changed(own0, slot.model)
    weights = {n for n, _ in slot.model.named_parameters()}
    assert weights <= moved, f"every weight of theta_t should move, unchanged: {weights - moved}"
    # beyond the weights only buffers move: BN and perturbation-site running statistics
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved - weights)
    assert any("perturb_site.running_mean" in k for k in moved)
    assert all(p.grad is None for p in trainer.phi.parameters()), "phi's gradient is not even computed"


def test_meta_step_changes_only_phi_and_site_statistics(dataset):
    trainer = make_trainer(dataset)
    batches = task_steps_then_heldout_batches(trainer)
    phi0 = snapshot(trainer.phi)
    models0 = [snapshot(s.model) for s in trainer.slots]
    trainer.meta_step(batches)
    assert changed(phi0, trainer.phi) == set(phi0), "every phi tensor should take a step"
    for slot, before in zip(trainer.slots, models0):
        moved = changed(before, slot.model)
        assert moved, "the sites' running statistics are updated in the meta pass"
        assert all("perturb_site." in k for k in moved), f"meta_step changed theta_t or BN: {sorted(moved)}"
        assert all(p.grad is None for p in slot.model.parameters()), "no weight gradient in the meta pass"


def test_phi_gradient_is_the_mean_of_per_task_gradients(dataset):
    trainer = make_trainer(dataset)
    batches = task_steps_then_heldout_batches(trainer)
    saved = [(copy.deepcopy(s.rng.state_dict()), snapshot(s.model)) for s in trainer.slots]
    per_task = []
    for slot in trainer.slots:
        with slot.rng.active():
            grads, _ = trainer.task_meta_grad(slot, batches[slot.index])
        per_task.append(torch.cat([g.reshape(-1) for g in grads]))
    for slot, (rng, state) in zip(trainer.slots, saved):  # rewind noise streams and site statistics
        slot.rng.load_state_dict(rng)
        slot.model.load_state_dict(state)
    phi_before = copy.deepcopy(trainer.phi)
    reference_opt = torch.optim.Adam(phi_before.parameters(), lr=trainer.config.phi_lr,
                                     weight_decay=trainer.config.phi_weight_decay)
    trainer.meta_step(batches)
    expected = torch.stack(per_task).mean(0)
    assert torch.allclose(trainer.last_phi_grad, expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(per_task[0], per_task[1]), "the tasks should disagree (else the test proves little)"
    offset = 0
    for p in phi_before.parameters():  # phi moved exactly as one Adam step with that mean gradient
        p.grad = expected[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    reference_opt.step()
    for a, b in zip(phi_before.parameters(), trainer.phi.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_batchnorm_eval_leaves_sites_training(dataset):
    trainer = make_trainer(dataset)
    model = trainer.slots[0].model
    model.train()
    with batchnorm_eval(model):
        assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert all(s.training for s in trainer.slots[0].handle.sites)
    assert all(m.training for m in model.modules())


def test_task_rng_is_private_and_resumable():
    rng = TaskRNG(123, torch.device("cpu"))
    torch.manual_seed(0)
    outer = torch.randn(3)
    torch.manual_seed(0)
    with rng.active():
        first = torch.randn(3)
    assert torch.equal(torch.randn(3), outer), "the caller's stream is restored after the block"
    state = copy.deepcopy(rng.state_dict())
    with rng.active():
        second = torch.randn(3)
    rng.load_state_dict(state)
    with rng.active():
        assert torch.equal(torch.randn(3), second)
    assert not torch.equal(first, second)


# -------------------------------------------------------------------------------------- second order
class TinyPhi(nn.Module):
    """A phi-like module: input-dependent noise mean and a batch-statistics scale (4 parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3]))
        self.b = nn.Parameter(torch.tensor([-0.2]))
        self.w = nn.Parameter(torch.tensor([0.5, -0.4]))


class TinySite(nn.Module):
    def __init__(self, phi: TinyPhi, eps: torch.Tensor):
        super().__init__()
        self._phi = [phi]
        self.register_buffer("eps", eps)

    def forward(self, h):
        phi = self._phi[0]
        z = F.softplus(phi.a * h + phi.b + self.eps)
        stats = torch.stack([h.mean((0, 2, 3)), h.var((0, 2, 3))], dim=1)
        return h * torch.sigmoid(stats @ phi.w).view(1, -1, 1, 1) * z


class TinyNet(nn.Module):
    def __init__(self, site: nn.Module, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, channels, 3, padding=1)
        self.site = site
        self.fc = nn.Linear(channels * 16, 3)

    def forward(self, x):
        return self.fc(F.relu(self.site(self.conv(x))).flatten(1))


def _finite_difference(loss_of, params, h=1e-6, per_tensor=None):
    """Central differences of ``loss_of()`` w.r.t. every entry of ``params`` (or ``per_tensor`` seeded entries of
    each); returns ``[(param index, flat index, value)]``."""
    picks = torch.Generator().manual_seed(0)
    out = []
    for k, p in enumerate(params):
        entries = range(p.numel()) if per_tensor is None else \
            torch.randperm(p.numel(), generator=picks)[:per_tensor].tolist()
        for i in entries:
            with torch.no_grad():
                flat = p.view(-1)
                orig = flat[i].item()
                flat[i] = orig + h
                up = loss_of()
                flat[i] = orig - h
                down = loss_of()
                flat[i] = orig
            out.append((k, i, (up - down) / (2 * h)))
    return out


def _first_order_at_lookahead(model, phi_params, x, y, xv, yv, lr, before=lambda: None):
    """The first-order shortcut at the same look-ahead weights: theta' held constant."""
    before()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    fast = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
    return torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (xv,)), yv), phi_params)


def _lookahead_loss(model, x, y, xv, yv, lr, before=lambda: None):
    """Reference: L_valid(theta - lr * dL_train/dtheta, phi) with plain autograd (no graph kept)."""
    before()
    params = dict(model.named_parameters())
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(params.values()))
    fast = {n: p.detach() - lr * g for (n, p), g in zip(params.items(), grads)}
    return F.cross_entropy(functional_call(model, fast, (xv,)), yv).item()


def test_lookahead_gradient_matches_finite_differences_tiny_phi():
    torch.manual_seed(0)
    phi = TinyPhi().double()
    eps = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    model = TinyNet(TinySite(phi, eps)).double()
    x, xv = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y, yv = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    lr = 0.5
    params = list(phi.parameters())
    result = lookahead_meta_grad(model, params, x, y, xv, yv, lr)
    for k, i, fd in _finite_difference(lambda: _lookahead_loss(model, x, y, xv, yv, lr), params):
        assert abs(result.meta_grads[k].view(-1)[i].item() - fd) <= 1e-5 * abs(fd) + 1e-8, (k, i, fd)
    # the look-ahead term matters: the first-order shortcut at the same theta' differs
    first = _first_order_at_lookahead(model, params, x, y, xv, yv, lr)
    gap = max((a - b).abs().max().item() for a, b in zip(result.meta_grads, first))
    assert gap > 1e-3 * max(a.abs().max().item() for a in result.meta_grads)
    # and with lr = 0 the look-ahead gradient is the plain first-order one
    zero = lookahead_meta_grad(model, params, x, y, xv, yv, 0.0).meta_grads
    for a, b in zip(zero, _first_order_at_lookahead(model, params, x, y, xv, yv, 0.0)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_lookahead_gradient_matches_finite_differences_real_phi():
    torch.manual_seed(1)
    phi = MetaPerturb(init_std=0.3).double()
    site = PerturbSite(phi, channels=3, channel_norm=3, spatial_norm=4).double()
    site.clip = 100.0
    model = TinyNet(site).double()
    x, xv = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y, yv = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))
    lr = 0.3
    params = list(phi.parameters())
    reseed = lambda: torch.manual_seed(7)  # noqa: E731 - the same noise draws in every evaluation
    with twice_differentiable([site]):  # the fused fast path has no second derivative
        reseed()
        result = lookahead_meta_grad(model, params, x, y, xv, yv, lr)
        numeric = _finite_difference(lambda: _lookahead_loss(model, x, y, xv, yv, lr, reseed), params, per_tensor=3)
        first = _first_order_at_lookahead(model, params, x, y, xv, yv, lr, reseed)
    assert "forward" not in vars(site), "the fast path is back after the block"
    for k, i, fd in numeric:
        assert abs(result.meta_grads[k].view(-1)[i].item() - fd) <= 1e-4 * abs(fd) + 1e-8, (k, i, fd)
    assert any(abs(first[k].view(-1)[i].item() - fd) > 1e-3 * abs(fd) for k, i, fd in numeric), \
        "the first-order shortcut should not pass this check"


def test_twice_differentiable_sites_compute_the_same_function():
    torch.manual_seed(3)
    phi = MetaPerturb(init_std=0.3)
    site = PerturbSite(phi, channels=5, channel_norm=8, spatial_norm=6)
    site.clip = 2.0
    h = torch.randn(4, 5, 6, 6)
    eps = torch.randn(4, 5, 6, 6)
    fast = site(h, eps)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(phi.parameters()))
    with twice_differentiable([site]):
        slow = site(h, eps)
        slow_grads = torch.autograd.grad(slow.square().sum(), list(phi.parameters()))
        assert site.last_scale is not None and site.last_scale.shape == (5,)
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_second_order_training_runs_and_updates_theta(dataset):
    trainer = make_trainer(dataset, second_order=True, lookahead_lr=0.1)
    models0 = [snapshot(s.model) for s in trainer.slots]
    phi0 = snapshot(trainer.phi)
    trainer.train_step()
    assert changed(phi0, trainer.phi) == set(phi0)
    for slot, before in zip(trainer.slots, models0):
        assert {n for n, _ in slot.model.named_parameters()} <= changed(before, slot.model)


# -------------------------------------------------------------------------------------------- end to end
def test_meta_train_writes_artifacts(dataset, tmp_path):
    store = RunStore(tmp_path)
    result = meta_train(MetaTrainConfig.from_dict(TINY), store=store, progress=False, dataset=dataset)
    run = store.open_run(result.run_id)
    assert run.status == "finished"
    assert MetaPerturb.load(result.phi_path).state_dict().keys() == result.phi.state_dict().keys()
    rows = run.read_metrics("meta_train")
    assert [(r["step"], r["task"]) for r in rows] == [(s, t) for s in (1, 2, 3) for t in (0, 1)]
    assert {"train_loss", "train_acc", "heldout_loss", "heldout_acc"} <= set(rows[0])
    stats = run.load_arrays("site_stats")
    assert stats["scale_mean"].shape == (3, 2, 4) and np.all((stats["scale_mean"] > 0) & (stats["scale_mean"] < 1))
    assert run.load_arrays("phi_trajectory")["phi"].shape == (3, 82)
    assert set(run.list_checkpoints()) == {"last", "phi_2", "phi_3"}
    split = run.load_json("task_split")
    assert split["num_tasks"] == 2 and len(split["tasks"][0]["train_index"]) == 48
    assert run.summary["phi_path"] == "phi.pt" and len(run.summary["heldout_acc"]) == 2
    assert torch.equal(MetaPerturb.load(result.phi_path).scale_fc.weight, result.phi.scale_fc.weight)


def test_same_seed_same_phi_and_resume_errors(dataset, tmp_path):
    store = RunStore(tmp_path)
    a = meta_train(MetaTrainConfig.from_dict({**TINY, "steps": 2}), store=store, progress=False, dataset=dataset)
    b = meta_train(MetaTrainConfig.from_dict({**TINY, "steps": 2}), store=store, progress=False, dataset=dataset)
    for p, q in zip(a.phi.parameters(), b.phi.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(WorkbenchError, match="different config.*lr"):
        meta_train(MetaTrainConfig.from_dict({**TINY, "steps": 2, "lr": 0.01}), store=store, resume=a.run_id,
                   dataset=dataset, progress=False)
    with pytest.raises(WorkbenchError, match="already finished"):
        meta_train(None, store=store, resume=a.run_id, dataset=dataset, progress=False)
    empty = meta_train(MetaTrainConfig.from_dict({**TINY, "steps": 1, "checkpoint_every": 5}), store=store,
                       progress=False, dataset=dataset)
    os.remove(store.open_run(empty.run_id).path / "checkpoints" / "last.pt")
    with pytest.raises(WorkbenchError, match="no checkpoint"):
        meta_train(None, store=store, resume=empty.run_id, dataset=dataset, progress=False)
    with pytest.raises(WorkbenchError, match="no run"):
        meta_train(None, store=store, resume="no-such-run", dataset=dataset, progress=False)


def test_nan_loss_stops_with_step_and_task_and_keeps_checkpoint(dataset, tmp_path):
    store = RunStore(tmp_path)
    config = MetaTrainConfig.from_dict({**TINY, "steps": 6, "checkpoint_every": 1})
    original = MetaTrainer.task_step

    def poisoned(self, slot, batch):  # task 1 gets NaN images from step 3 on
        x, y = batch
        if slot.index == 1 and self.step >= 2:
            x = torch.full_like(x, float("nan"))
        return original(self, slot, (x, y))

    MetaTrainer.task_step = poisoned
    try:
        with pytest.raises(WorkbenchError, match=r"not finite .* at step 3 on task 1 \(task1\).*step 2") as info:
            meta_train(config, store=store, progress=False, dataset=dataset)
    finally:
        MetaTrainer.task_step = original
    assert "\n" not in str(info.value)
    (record,) = store.list_runs("meta_train")
    run = store.open_run(record.run_id)
    assert run.status == "failed" and "step 3" in run.reason
    assert run.load_checkpoint("last")["step"] == 2


def test_num_runs_selects_best_phi_with_reason(dataset, tmp_path):
    store = RunStore(tmp_path)
    target = save_npz(synthetic_dataset(num_classes=3, per_class=12, seed=5), tmp_path / "target.npz")
    config = MetaTrainConfig.from_dict({**TINY, "steps": 2, "num_runs": 2, "select_target": target,
                                        "select_steps": 3, "select_per_class": 6, "select_valid_per_class": 4,
                                        "select_mc_samples": 2})
    result = meta_train(config, store=store, progress=False, dataset=dataset)
    assert len(result.run_ids) == 2 and result.run_id in result.run_ids
    parent = store.open_run(result.selection_run_id)
    assert parent.kind == "meta_select" and parent.status == "finished"
    selection = parent.load_json("selection")
    scores = [c["score"] for c in selection["candidates"]]
    assert selection["chosen_index"] == int(np.argmax(scores))
    assert selection["chosen_run_id"] == result.run_id and "highest" in selection["reason"]
    assert [store.open_run(r).config["seed"] for r in result.run_ids] == [0, 1]
    chosen = MetaPerturb.load(parent.path / "phi.pt")
    assert torch.equal(chosen.scale_fc.weight, result.phi.scale_fc.weight)
    # the scoring transfer runs live in a scratch store: the store holds the candidates and the selection only
    assert sorted(r.kind for r in store.list_runs()) == ["meta_select", "meta_train", "meta_train"]


def test_selection_score_is_a_transfer_run_on_held_out_training_images(tmp_path):
    from workbench.meta_train import selection_dataset, selection_transfer_config, transfer_score
    from workbench.transfer import transfer

    target = save_npz(synthetic_dataset(num_classes=3, per_class=12, seed=5), tmp_path / "target.npz")
    config = MetaTrainConfig.from_dict({**TINY, "select_target": target, "select_steps": 3, "select_per_class": 6,
                                        "select_valid_per_class": 4, "select_mc_samples": 2})
    held_out = selection_dataset(config)
    assert held_out.y_train.bincount().tolist() == [6, 6, 6] and held_out.y_test.bincount().tolist() == [4, 4, 4]
    train_rows = {row.numpy().tobytes() for row in held_out.x_train}
    assert not any(row.numpy().tobytes() in train_rows for row in held_out.x_test)  # scored on unseen images
    phi = MetaPerturb(init_std=0.3)
    phi_file = phi.save(tmp_path / "phi.pt")
    recipe = selection_transfer_config(config, str(phi_file), "cpu", len(held_out.y_train))
    assert recipe.steps == 3 and recipe.lr_milestones == [] and recipe.final_mc_samples == 2
    store = RunStore(tmp_path / "store")
    direct = transfer(recipe, store, progress=False, dataset=held_out)
    score = transfer_score(phi, config, torch.device("cpu"), dataset=held_out)
    assert score == direct.summary["test_accuracy"] and direct.summary["test_examples"] == 12
    assert len(store.list_runs()) == 1  # transfer_score wrote nothing here


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"phi_lr": 0.0}, "phi_lr must be a positive number"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"num_tasks": -2}, "num_tasks must be a positive integer"),
    ({"device": "tpu"}, "device 'tpu'"),
    ({"lookahead_lr": 0.1}, "second_order"),
    ({"split_scheme": "random"}, "must be one of"),
    ({"stpes": 10}, "unknown MetaTrainConfig parameter"),
])
def test_bad_config_is_one_line_error(overrides, message):
    with pytest.raises(WorkbenchError, match=message) as info:
        MetaTrainConfig.from_dict(overrides)
    assert "\n" not in str(info.value)


def test_more_tasks_than_classes_and_too_small_tasks(dataset):
    with pytest.raises(WorkbenchError, match="cannot be split into 10 tasks"):
        prepare_source(MetaTrainConfig.from_dict({**TINY, "num_tasks": 10}), dataset)
    with pytest.raises(WorkbenchError, match="fewer than batch_size=64"):
        prepare_source(MetaTrainConfig.from_dict({**TINY, "batch_size": 64}), dataset)


def test_cli_runs_and_reports_errors(dataset, tmp_path, capsys):
    source = save_npz(dataset, tmp_path / "source.npz")
    code = cli_main(["meta-train", "--artifacts", str(tmp_path / "art"), "--no-progress", "--set", f"source={source}",
                     *[f"--set={k}={v}" for k, v in TINY.items()], "--set", "steps=2"])
    assert code == 0
    assert "phi saved to" in capsys.readouterr().out
    code = cli_main(["meta-train", "--artifacts", str(tmp_path / "art"), "--set", "steps=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: steps must be a positive integer") and err.count("\n") == 1
    code = cli_main(["meta-train", "--artifacts", str(tmp_path / "art"), "--resume", "nothing-here"])
    assert code == 2 and "no run 'nothing-here'" in capsys.readouterr().err


def test_config_file_example_is_valid():
    config = MetaTrainConfig.from_yaml(REPO / "configs" / "meta_train_default.yaml")
    assert config == MetaTrainConfig()


# ---------------------------------------------------------------------------------------- kill -9 + resume
def test_sigkill_then_resume_gives_the_same_phi(dataset, tmp_path):
    source = save_npz(dataset, tmp_path / "source.npz")
    settings = {**TINY, "source": source, "steps": 24, "checkpoint_every": 3, "log_every": 2, "deterministic": True}
    sets = [f"--set={k}={v}" for k, v in settings.items()]
    reference = meta_train(MetaTrainConfig.from_dict(settings), store=RunStore(tmp_path / "ref"), progress=False)

    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "meta-train", "--artifacts", str(root),
                             "--no-progress", *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((root / "runs").glob("*/checkpoints/last.pt")) if (root / "runs").exists() else []
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.01)
    assert checkpoint is not None, f"no checkpoint appeared: {proc.communicate()[1].decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = checkpoint.parent.parent
    store = RunStore(root)
    killed_at = store.open_run(run_dir.name).load_checkpoint("last")["step"]
    assert killed_at < settings["steps"], "the process finished before it was killed; make the run longer"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    result = subprocess.run([sys.executable, "-m", "workbench", "meta-train", "--no-progress", "--resume",
                             str(run_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = MetaPerturb.load(run_dir / "phi.pt")
    for p, q in zip(reference.phi.parameters(), resumed.parameters()):
        assert torch.equal(p, q), "the resumed run must end with exactly the uninterrupted run's phi"
    steps = [r["step"] for r in store.open_run(run_dir.name).read_metrics("phi")]
    assert steps == list(range(2, 25, 2)), "no duplicated or missing metric rows after the resume"
