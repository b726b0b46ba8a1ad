"""Did phi learn: the function probe, the verdict a meta-training run writes, its flag in labels, notebook and
dashboard readers, and the untrained-phi control method."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench import dashboard_data as dd
from workbench import study
from workbench.artifacts import RunStore
from workbench.labels import method_label, phi_learned
from workbench.meta_train import PHI_INIT_FILE, MetaTrainConfig, MetaTrainer, gradient_agreement, initial_phi, \
    meta_train, prepare_source
from workbench.perturb import MetaPerturb
from workbench.phi_diagnostics import LEARNED_THRESHOLD, diagnose, function_change, probe_phi
from workbench.regularizers import available_regularizers, build_regularizer
from workbench.transfer import resolve_phi, transfer

from helpers import TINY, synthetic_dataset


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_classes=4, per_class=32)


def _images(n: int = 16, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_probe_sees_the_function_not_the_weights():
    phi = initial_phi(0)
    images = _images()
    same = probe_phi(phi, "conv4_8", images, num_classes=4, image_size=16, seed=1)
    again = probe_phi(phi, "conv4_8", images, num_classes=4, image_size=16, seed=1)
    assert function_change(same, again) == 0.0
    assert len(same.site_names) == 4 and all(s.shape == (8,) for s in same.scales)
    # an untrained phi gives a scale of about 0.5 everywhere
    assert np.allclose(same.scale_mean, 0.5, atol=0.01)
    # the scale's last weight on C/C0 moves every site's scale: the function changes
    moved = MetaPerturb()
    moved.load_state_dict(phi.state_dict())
    with torch.no_grad():
        moved.scale_fc.weight[0, 8] += 2.0
    changed = probe_phi(moved, "conv4_8", images, num_classes=4, image_size=16, seed=1)
    assert function_change(same, changed) > 0.1


def test_diagnose_compares_with_the_initialisation_and_the_authors_phi(official_phi_path):
    phi = initial_phi(0)
    record = diagnose(phi, initial_phi(0), "conv4_8", _images(), num_classes=4, image_size=16)
    assert record["learned"] is False and record["function_change"] == 0.0 and record["distance_from_init"] == 0.0
    assert record["distance_from_official"] > 0.5
    assert [row["site"] for row in record["sites"]] and all("scale_official" in row for row in record["sites"])
    official = MetaPerturb.load(official_phi_path)
    record = diagnose(official, initial_phi(0), "conv4_8", _images(), num_classes=4, image_size=16)
    assert record["learned"] is True and record["function_change"] >= LEARNED_THRESHOLD
    assert record["distance_from_official"] == 0.0
    scales = [row["scale"] for row in record["sites"]]
    assert scales == [row["scale_official"] for row in record["sites"]]


def test_gradient_agreement():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    cosine, norm = gradient_agreement(g)
    assert cosine == pytest.approx(1.0) and norm == pytest.approx(4 / 3)
    cosine, _ = gradient_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert cosine == pytest.approx(0.0)
    cosine, _ = gradient_agreement(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert cosine == pytest.approx(-1.0)
    assert np.isnan(gradient_agreement(torch.ones(1, 3))[0])


def test_the_trainer_starts_from_initial_phi(dataset):
    config = MetaTrainConfig.from_dict({**TINY, "seed": 5, "phi_init_std": 0.02})
    data = prepare_source(config, dataset)
    trainer = MetaTrainer(config, data.tasks, device="cpu", mean=data.mean, std=data.std)
    start = initial_phi(5, 0.02)
    assert all(torch.equal(a, b) for a, b in zip(trainer.phi.state_dict().values(), start.state_dict().values()))
    assert not torch.equal(start.scale_fc.weight, initial_phi(6, 0.02).scale_fc.weight)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """Two tiny meta-training runs: one whose phi moves (a large phi_lr), one whose phi cannot (phi_lr 1e-9)."""
    root = tmp_path_factory.mktemp("diag")
    store = RunStore(root)
    moving = meta_train({**TINY, "steps": 8, "phi_lr": 0.05, "log_every": 2, "checkpoint_every": 8},
                        store=store, progress=False, dataset=dataset)
    stuck = meta_train({**TINY, "steps": 2, "phi_lr": 1e-9, "log_every": 1, "checkpoint_every": 2, "seed": 1},
                       store=store, progress=False, dataset=dataset)
    return root, store, moving, stuck


def test_a_few_meta_steps_move_phis_function(runs):
    root, store, moving, _ = runs
    s = moving.summary
    assert s["phi_learned"] is True and s["phi_function_change"] >= LEARNED_THRESHOLD
    assert s["chance"] == pytest.approx(0.25)  # the original scheme: one group of 4 classes, two swapped halves
    run = store.open_run(moving.run_id)
    record = run.load_json("phi_diagnostics")
    assert record["learned"] is True and record["distance_from_init"] == pytest.approx(s["phi_distance_from_init"])
    start = MetaPerturb.load(run.path / PHI_INIT_FILE)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), initial_phi(0).state_dict().values()))
    assert record["distance_from_init"] > 0.05


def test_diagnostics_are_written_and_read_back(runs):
    root, store, moving, _ = runs
    run = store.open_run(moving.run_id)
    phi_rows = run.read_metrics("phi")
    assert [r["step"] for r in phi_rows] == [2, 4, 6, 8]
    for key in ("dist_init", "dist_official", "grad_cosine", "task_grad_norm", "scale_site_range",
                "scale_channel_std"):
        assert all(key in r for r in phi_rows), key
    assert phi_rows[-1]["dist_init"] > phi_rows[0]["dist_init"] > 0
    stats = run.load_arrays("site_stats")
    assert stats["scale_channel_std"].shape == stats["scale_mean"].shape == (4, 2, 4)
    history = study.meta_history(store, moving)
    assert history.learned is True and history.status == "learned" and history.chance == pytest.approx(0.25)
    assert len(history.probe_sites()) == 4 and {"scale", "scale_init", "scale_official"} <= set(history.probe_sites())
    shown = dd.phi_diagnostics(root, moving.run_id)
    assert shown["learned"] is True and shown["message"].startswith("learned")
    from workbench import plots
    assert len(plots.meta_diagnostics(history.curves, history.chance).data) >= 6
    assert len(plots.probe_scales(history.probe_sites()).data) == 3


def test_a_phi_that_did_not_learn_is_flagged(runs):
    root, store, _, stuck = runs
    assert stuck.summary["phi_learned"] is False and "did not learn" in stuck.summary["phi_verdict"]
    assert "WARNING" in study.describe_meta(stuck)
    assert study.meta_history(store, stuck).status == "did not learn"
    assert dd.phi_diagnostics(root, stuck.run_id)["learned"] is False
    verdicts = phi_learned(store, [stuck.run_id, "official", None])
    assert verdicts == {stuck.run_id: False, "official": None}
    assert method_label("metaperturb", stuck.run_id, False).startswith("metaperturb (ours, did not learn: …")


def test_labels_say_which_phi_a_row_used(runs):
    _, _, moving, _ = runs
    assert method_label("base") == "base"
    assert method_label("metaperturb", "official") == "metaperturb (authors' phi)"
    assert method_label("metaperturb", moving.run_id, True) == f"metaperturb (ours: …{moving.run_id[-4:]})"
    assert method_label("metaperturb_untrained", moving.run_id) == "metaperturb (untrained control)"


def test_the_untrained_control_is_registered_and_uses_the_runs_initial_phi(runs, dataset):
    root, store, moving, _ = runs
    assert "metaperturb_untrained" in available_regularizers()
    assert build_regularizer("metaperturb_untrained").initial_phi and build_regularizer("metaperturb_untrained").needs_phi
    phi, label, path = resolve_phi(moving.run_id, store, initial=True)
    assert label == moving.run_id and path.name == PHI_INIT_FILE
    assert all(torch.equal(a, b) for a, b in zip(phi.state_dict().values(), initial_phi(0).state_dict().values()))
    trained, _, _ = resolve_phi(moving.run_id, store)
    assert not torch.equal(trained.scale_fc.weight, phi.scale_fc.weight)
    # a run made before phi_init.pt existed: the initialisation is rebuilt from its seed and init std
    (store.open_run(moving.run_id).path / PHI_INIT_FILE).rename(root / "moved_away.pt")
    try:
        rebuilt, _, path = resolve_phi(moving.run_id, store, initial=True)
    finally:
        (root / "moved_away.pt").rename(store.open_run(moving.run_id).path / PHI_INIT_FILE)
    assert path is None and torch.equal(rebuilt.scale_fc.weight, phi.scale_fc.weight)
    config = dict(target="synthetic", arch="conv4_8", image_size=16, per_class=8, steps=2, batch_size=8,
                  eval_every=0, final_mc_samples=2, eval_mc_samples=2, train_eval_examples=16, threads=1,
                  device="cpu", phi=moving.run_id, method="metaperturb_untrained")
    result = transfer(config, store, progress=False, dataset=dataset)
    record = result.run.load_json("phi")
    assert record["initial"] is True and record["path"].endswith(PHI_INIT_FILE)
    frame = dd.runs_frame(root)
    assert frame.set_index("run_id").loc[result.run_id, "label"] == "metaperturb (untrained control)"
    s = result.summary
    assert s["train_eval_examples"] == 16 and s["generalization_gap"] == pytest.approx(
        s["train_eval_accuracy"] - s["test_accuracy"])


def test_a_selection_run_stands_for_its_chosen_run(tmp_path, dataset):
    store = RunStore(tmp_path)
    result = meta_train({**TINY, "steps": 2, "log_every": 1, "checkpoint_every": 2, "num_runs": 2, "seed": 3},
                        store=store, progress=False, dataset=dataset)
    chosen = store.open_run(result.run_id)
    assert result.selection_run_id != result.run_id and chosen.kind == "meta_train"
    from workbench.labels import phi_verdict
    from workbench.phi_diagnostics import trained_by

    assert trained_by(store, result.selection_run_id) == result.run_id
    assert phi_verdict(store, result.selection_run_id) == chosen.load_json("phi_diagnostics")
    phi, _, path = resolve_phi(result.selection_run_id, store, initial=True)
    assert path == (chosen.path / PHI_INIT_FILE).resolve()
    seed = chosen.config["seed"]
    assert all(torch.equal(a, b) for a, b in zip(phi.state_dict().values(), initial_phi(seed).state_dict().values()))
    assert dd.phi_diagnostics(tmp_path, result.selection_run_id)["learned"] is False  # 2 steps at phi_lr 1e-3
