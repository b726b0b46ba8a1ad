"""Transfer: the training loop, schedules, resume, artifacts, bad input, source training, the CLI."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from workbench.artifacts import RunStore
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.evaluate import evaluate
from workbench.perturb import MetaPerturb
from workbench.transfer import (
    TransferConfig,
    load_network,
    lr_at,
    lr_milestone_steps,
    train_source_network,
    transfer,
)

from helpers import MNIST, OFFICIAL_PHI, require_shared
from helpers import band_dataset as synthetic  # (test_gpu and test_compiled import it from here)


def tiny_config(tmp_path, **changes):
    values = dict(target="synthetic", arch="conv4_4", image_size=16, steps=3, batch_size=8, eval_every=0,
                  eval_mc_samples=2, final_mc_samples=2, eval_batch_size=16, log_every=1, device="cpu",
                  phi="official", artifacts_root=str(tmp_path / "artifacts"))
    values.update(changes)
    return TransferConfig.from_dict(values)


@pytest.fixture(scope="module")
def random_phi(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi") / "phi.pt"
    torch.manual_seed(0)
    MetaPerturb(init_std=0.2).save(path)
    return str(path)


def run_folders(tmp_path):
    runs = tmp_path / "artifacts" / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


# ------------------------------------------------------------------------------------------ schedules
def test_learning_rate_schedule_values_and_agreement_with_multisteplr():
    cfg = TransferConfig(steps=10000)
    assert lr_milestone_steps(10000) == [4000, 7000, 9000]
    assert lr_at(0, cfg) == 1e-3 and lr_at(3999, cfg) == 1e-3
    assert lr_at(4000, cfg) == pytest.approx(3e-4)
    assert lr_at(7000, cfg) == pytest.approx(9e-5)
    assert lr_at(9999, cfg) == pytest.approx(2.7e-5)
    small = TransferConfig(steps=20)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=small.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestone_steps(20), gamma=0.3)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, small))
        opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------ the spec's test
def test_the_authors_phi_transfers_to_conv4_on_mnist(tmp_path):
    official_phi, _ = require_shared(OFFICIAL_PHI, MNIST)
    cfg = TransferConfig.from_dict(dict(
        target="mnist_test10k", arch="conv4", image_size=28, per_class=8, test_per_class=4, steps=3, batch_size=16,
        eval_every=2, eval_mc_samples=2, final_mc_samples=3, log_every=1, device="cpu", phi="official",
        artifacts_root=str(tmp_path / "artifacts")))
    result = transfer(cfg, progress=False)
    s = result.summary
    assert s["steps"] == 3 and s["mc_samples"] == 3 and s["test_examples"] == 40 and s["sites"] == 4
    assert 0 <= s["test_accuracy"] <= 1 and s["test_nll"] > 0 and 0 <= s["test_ece"] <= 1
    # phi was not changed by training
    official = MetaPerturb.load(official_phi)
    assert all(torch.equal(a, b) for a, b in zip(official.parameters(), result.regularizer.phi.parameters()))
    run = RunStore(tmp_path / "artifacts").open_run(result.run_id)
    assert run.kind == "transfer" and run.status == "finished"
    assert run.tags == {"target": "mnist_test10k", "arch": "conv4", "method": "metaperturb", "seed": 0,
                        "phi": "official", "source": "official"}
    record = run.load_json("phi")
    assert record["sha256"] == hashlib.sha256(official_phi.read_bytes()).hexdigest() and record["parameters"] == 82
    stages = [(r["stage"], r["step"]) for r in run.read_metrics()]
    assert stages == [("train", 1), ("train", 2), ("test", 2), ("train", 3), ("final", 3), ("train_eval", 3)]
    # the training-set evaluation: every one of the 80 training images (fewer than train_eval_examples), 2 samples
    (on_train,) = run.read_metrics("train_eval")
    assert on_train["mc_samples"] == 2 and s["train_eval_examples"] == 80
    assert s["train_eval_accuracy"] == on_train["accuracy"]
    assert s["generalization_gap"] == pytest.approx(on_train["accuracy"] - s["test_accuracy"])
    assert [r["noise_coeff"] for r in run.read_metrics("train")] == pytest.approx([0, 1 / 1.2, 1.0])
    scales = run.load_arrays("site_scales")
    assert list(scales["channels"]) == [64] * 4 and scales["scale"].shape == (4, 64)
    assert np.all((scales["scale"] > 0) & (scales["scale"] < 1))
    preds = run.load_arrays("predictions")
    assert preds["confidence"].shape == (40,) and preds["probs"].shape == (40, 10)
    assert preds["correct"].mean() == pytest.approx(s["test_accuracy"])
    bins = run.load_arrays("reliability")
    assert bins["count"].sum() == 40 and len(bins["lower"]) == 15
    # the saved network predicts exactly what the run reported (same noise seed)
    model, reg, payload = load_network(result.run_id, RunStore(tmp_path / "artifacts"))
    again = evaluate(model, _test_images(cfg), result.evaluation.labels, transform=_normalise(payload), samples=3, batch_size=cfg.eval_batch_size,
                     tile_at=reg.tile_at(), seed=cfg.seed + 10**9)
    assert torch.allclose(again.probs, result.evaluation.probs, atol=1e-6)


def _test_images(cfg):
    from workbench.data import load_dataset, target_view
    from workbench.data.views import pick_per_class

    view = target_view(load_dataset(cfg.target), per_class=cfg.per_class, image_size=cfg.image_size, seed=cfg.seed)
    keep = pick_per_class(view.test.y, view.num_classes, cfg.test_per_class, cfg.seed, "first")
    return view.test.x[keep]


def _normalise(payload):
    from workbench.data import Augment

    return Augment(payload["image_size"], mean=payload["mean"], std=payload["std"]).eval


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", ["base", "dropout", "dropblock", "mixup", "manifold_mixup",
                                    "information_dropout", "metaperturb"])
def test_every_scratch_method_runs_through_the_loop(tmp_path, method, random_phi):
    cfg = tiny_config(tmp_path, method=method, phi=random_phi, steps=2)
    result = transfer(cfg, progress=False, dataset=synthetic())
    s = result.summary
    assert s["mc_samples"] == (2 if method == "metaperturb" else 1)
    assert s["stochastic_eval"] == (method == "metaperturb")
    run = result.run
    assert run.tags["method"] == method and run.load_json("regularizer")["method"] == method
    assert ("site_scales" in run.list_arrays()) == (method == "metaperturb")
    assert json.loads((run.path / "config.json").read_text())["method"] == method


def test_source_training_then_finetune_and_l2sp(tmp_path, random_phi):
    store = RunStore(tmp_path / "artifacts")
    source = train_source_network(tiny_config(tmp_path, steps=2, method="base"), store, progress=False, dataset=synthetic(seed=5))
    assert store.open_run(source.run_id).kind == "source" and source.summary["method"] == "base"
    for method in ("finetune", "l2sp", "finetune_metaperturb"):
        cfg = tiny_config(tmp_path, method=method, finetune_from=source.run_id, phi=random_phi, steps=1)
        # zero learning rate: the trained convs are still the source's
        cfg = cfg.replace(lr=1e-12)
        result = transfer(cfg, store, progress=False, dataset=synthetic())
        for key in result.regularizer.loaded:
            assert torch.allclose(dict(result.model.named_parameters())[key].cpu(),
                                  dict(source.model.named_parameters())[key].cpu(), atol=1e-8)
        assert result.run.tags["finetune_from"] == source.run_id
    with pytest.raises(WorkbenchError, match="is a conv4_4 but the target network is a conv6_4"):
        transfer(tiny_config(tmp_path, method="finetune", arch="conv6_4", finetune_from=source.run_id),
                 store, progress=False, dataset=synthetic())


def test_phi_from_a_meta_train_run_id(tmp_path, random_phi):
    store = RunStore(tmp_path / "artifacts")
    meta = store.create_run("meta_train", {"steps": 1}, tags={"source": "tinyimagenet32"})
    phi = MetaPerturb.load(random_phi)
    phi.save(meta.path / "phi.pt")
    meta.mark_finished({})
    result = transfer(tiny_config(tmp_path, method="metaperturb", phi=meta.run_id, steps=1), store, progress=False,
                      dataset=synthetic())
    assert result.run.tags["phi"] == meta.run_id and result.run.tags["source"] == meta.run_id
    assert all(torch.equal(a, b) for a, b in zip(phi.parameters(), result.regularizer.phi.parameters()))
    empty = store.create_run("meta_train", {"steps": 1})
    with pytest.raises(WorkbenchError, match=f"run {empty.run_id} has no phi.pt"):
        transfer(tiny_config(tmp_path, method="metaperturb", phi=empty.run_id), store, progress=False,
                 dataset=synthetic())


# ------------------------------------------------------------------------------------------ resume
def test_resume_reproduces_an_uninterrupted_run(tmp_path, random_phi):
    store = RunStore(tmp_path / "artifacts")
    cfg = tiny_config(tmp_path, method="metaperturb", phi=random_phi, steps=4, eval_every=2, checkpoint_every=2)
    straight = transfer(cfg, store, progress=False, dataset=synthetic())
    stopped = transfer(cfg, store, progress=False, dataset=synthetic(), stop_at=2)
    assert stopped.summary == {"step": 2, "stopped": True}
    assert store.open_run(stopped.run_id).status == "failed"
    resumed = transfer(cfg, store, progress=False, dataset=synthetic(), resume=stopped.run_id)
    assert resumed.run_id == stopped.run_id and resumed.run.status == "finished"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["test_accuracy"] == straight.summary["test_accuracy"]
    steps = [(r["stage"], r["step"]) for r in resumed.run.read_metrics()]
    assert steps == [(r["stage"], r["step"]) for r in straight.run.read_metrics()]
    with pytest.raises(WorkbenchError, match=r"was started with a different config \(steps: 4 -> 5\); resume it"):
        transfer(cfg.replace(steps=5), store, progress=False, dataset=synthetic(), resume=stopped.run_id)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    bad_phi = tmp_path / "not_phi.pt"
    torch.save({"weight": torch.zeros(3)}, bad_phi)
    data = synthetic()
    cases = [
        (dict(method="metaperturb", phi=str(bad_phi)), "is not a phi file"),
        (dict(method="metaperturb", phi="no-such-run"), "neither 'official', a phi file, nor a run id"),
        (dict(method="dropconnect"), "unknown method 'dropconnect'; available methods: base, dropblock"),
        (dict(final_mc_samples=0), "final_mc_samples is a number of Monte-Carlo samples and must be >= 1"),
        (dict(method="base", per_class=50), "per_class=50 but class 0 .*has only 12 training images"),
        (dict(method="base", test_per_class=50), "test_per_class=50 but class 0 of synthetic has only 4 test images"),
        (dict(method="metaperturb_untrained", phi="no-such-run"), "neither 'official', a phi file, nor a run id"),
        (dict(method="base", train_eval_examples=-1), "train_eval_examples must be >= 0"),
        (dict(method="finetune"), "set finetune_from"),
        (dict(method="base", steps=0), "steps must be >= 1"),
        (dict(method="base", robust_norms=["l3"]), "unknown attack norm"),
    ]
    for changes, message in cases:
        with pytest.raises(WorkbenchError, match=message) as info:
            transfer(tiny_config(tmp_path, **changes), progress=False, dataset=data)
        assert "\n" not in str(info.value)
    with pytest.raises(WorkbenchError, match="unknown TransferConfig parameter"):
        TransferConfig.from_dict({"stepz": 3})
    assert run_folders(tmp_path) == []


def test_robustness_curves_are_written(tmp_path, random_phi):
    cfg = tiny_config(tmp_path, method="metaperturb", phi=random_phi, steps=1, robust_norms=["linf", "l1"],
                      robust_eps_linf=[0.0, 0.1], robust_eps_l1=[1.0], robust_steps=2, robust_eot_samples=2,
                      robust_mc_samples=2, robust_examples=6)
    result = transfer(cfg, progress=False, dataset=synthetic())
    arrays = result.run.load_arrays("robustness")
    assert list(arrays["norms"]) == ["linf", "l1"] and len(arrays["examples"]) == 6
    assert list(arrays["linf_eps"]) == [0.0, 0.1] and arrays["l1_accuracy"].shape == (1,)
    assert result.run.load_json("robustness")["eot_samples"] == 2
    assert "robust_linf_0.1" in result.summary


# ------------------------------------------------------------------------------------------ CLI
def test_cli_trains_and_reports_errors_in_one_line(tmp_path, capsys):
    require_shared(MNIST)
    root = str(tmp_path / "artifacts")
    code = main(["transfer", "--artifacts", root, "--no-progress", "--set", "target=mnist_test10k",
                 "--set", "arch=conv4_4", "--set", "method=dropout", "--set", "method_options={p: 0.3}",
                 "--set", "per_class=4", "--set", "test_per_class=2", "--set", "steps=2", "--set", "batch_size=8",
                 "--set", "eval_every=0", "--set", "device=cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "transfer finished: run" in out
    run_id = out.split("run ")[1].split(";")[0]
    assert RunStore(root).open_run(run_id).load_json("regularizer")["settings"] == {"p": 0.3}
    code = main(["transfer", "--artifacts", root, "--set", "method=nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown method 'nope'") and err.count("\n") == 1
    code = main(["transfer", "--artifacts", root, "--resume", run_id, "--set", "steps=3"])
    err = capsys.readouterr().err
    assert code == 2 and "different config (steps: 2 -> 3)" in err


def test_steady_allocator_keeps_freed_memory_unless_the_environment_says_default(monkeypatch):
    from workbench import _runtime

    assert _runtime.keep_freed_memory() == "allocator: glibc keeps freed memory (mmap threshold 32 MiB, no trim)"
    called = []
    monkeypatch.setattr(_runtime, "keep_freed_memory", lambda: called.append(1) or "kept")
    monkeypatch.setenv("WORKBENCH_MALLOC", "default")
    assert "default" in _runtime.steady_allocator() and not called
    monkeypatch.delenv("WORKBENCH_MALLOC")
    assert _runtime.steady_allocator() == "kept" and called == [1]
