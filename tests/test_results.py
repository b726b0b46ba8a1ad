"""The results layer (workbench/results.py): one label per run wherever it is shown, the tables taking the
notebooks' rows and the dashboard's runs frame alike, and the names the notebooks and the dashboard import from it."""
from __future__ import annotations

import types
from pathlib import Path

import pandas as pd
import pytest

import dashboard_fixtures as fixtures

from workbench import dashboard_data, labels, results, study
from workbench.artifacts import RunStore
from workbench.meta_train import initial_phi


def _fake_transfer(monkeypatch) -> None:
    """run_transfer_grid with transfer() replaced by one that writes a finished run with the tags transfer writes
    (phi: the label :func:`workbench.transfer.resolve_phi` gives the cell's phi) and made-up numbers."""
    import workbench.data
    import workbench.transfer
    from workbench.regularizers import build_regularizer

    def fake_transfer(cfg, store, progress=True, dataset=None, resume=None):
        tags = {"target": cfg.target, "arch": cfg.arch, "method": cfg.method, "seed": cfg.seed}
        if build_regularizer(cfg.method).needs_phi:
            label = workbench.transfer.resolve_phi(cfg.phi, store)[1]
            tags.update(phi=label, source=label)
        run = store.create_run("transfer", cfg.to_dict(), tags=tags, run_id=cfg.run_name)
        test = 0.5 + 0.01 * cfg.seed + 0.02 * len(cfg.method) / 10
        summary = {"test_accuracy": test, "test_nll": 1.0, "test_ece": 0.1, "train_eval_accuracy": 0.9,
                   "generalization_gap": 0.9 - test, "mc_samples": 1, "train_examples": 20, "test_examples": 20,
                   "train_seconds_last_session": 0.0}
        run.mark_finished(summary)
        return types.SimpleNamespace(run_id=run.run_id, summary=summary)

    monkeypatch.setattr(workbench.transfer, "transfer", fake_transfer)
    monkeypatch.setattr(workbench.data, "load_dataset", lambda name, root=None: name)


def _meta_run(store: RunStore, learned: bool) -> str:
    """A finished meta-training run with a phi and the diagnostics verdict ``learned``."""
    run = store.create_run("meta_train", {"seed": 0}, tags={"source": "tinyimagenet32", "arch": "conv4", "seed": 0})
    initial_phi(0).save(run.path / "phi.pt")
    run.save_json("phi_diagnostics", {"learned": learned, "message": "made up for the test", "sites": []})
    run.mark_finished({"steps": 1, "chance": 0.1})
    return run.run_id


def test_a_run_has_the_same_label_in_the_notebook_tables_and_the_dashboard(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    ours = _meta_run(RunStore(root), learned=False)
    phi_file = tmp_path / "my_phi.pt"
    initial_phi(1).save(phi_file)
    made = RunStore(root).create_study("notebooks/02_transfer_study.ipynb", "test", {})
    store = study.StudyRunStore(root, made.study_id)
    _fake_transfer(monkeypatch)
    config = study.TransferStudyConfig.from_dict({
        "targets": ["cifar10"], "archs": ["conv4_8"], "seeds": [0, 1], "phi": ours, "workers": 1,
        "regime_check": "off",
        "methods": ["base", "metaperturb", "metaperturb@official", "metaperturb_untrained", f"metaperturb@{phi_file}"]})
    grid = study.run_transfer_grid(config, store, progress=False)

    expected = {"base", f"metaperturb (ours, did not learn: …{ours[-4:]})", "metaperturb (authors' phi)",
                "metaperturb (untrained control)", "metaperturb (ours: …_phi)"}
    assert set(grid["label"]) == expected
    # the dashboard's frame: the same label for every run, and the same rows in its accuracy table
    frame = dashboard_data.runs_frame(root).set_index("run_id")
    assert grid.set_index("run_id")["label"].to_dict() == frame.loc[list(grid["run_id"]), "label"].to_dict()
    notebook = study.summarize(grid, "test_accuracy")
    dashboard = results.accuracy_table(results.finished(frame.reset_index()))
    pd.testing.assert_frame_equal(notebook.reset_index(drop=True), dashboard.reset_index(drop=True),
                                  check_dtype=False)
    # a study's runs read back for notebooks 03 and 04: the same labels again
    runs = study.study_runs(RunStore(root), made)
    assert runs.set_index("run_id")["label"].to_dict() == grid.set_index("run_id")["label"].to_dict()


def test_tables_read_the_notebooks_rows_and_the_dashboards_frame_alike(tmp_path):
    root = tmp_path / "artifacts"
    fixtures.populate(root, targets=("cifar10", "fashion_mnist"), archs=("conv4",), methods=("base", "metaperturb"),
                      seeds=(0, 1))
    frame = results.finished(results.runs_frame(root))
    record = results.find_study(RunStore(root), "latest")
    rows = results.study_runs(RunStore(root), record)
    assert results.metric_column(rows, "summary.test_accuracy") == "test_accuracy"
    assert results.metric_column(frame, "test_accuracy") == results.ACCURACY_KEY
    for table in (results.regime_table, lambda r: results.accuracy_table(r, "test_ece"),
                  lambda r: results.paired_differences(r, "test_nll")):
        a = table(rows).reset_index(drop=True)
        b = table(frame[frame["run_id"].isin(rows["run_id"])]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    regime = results.regime_table(frame).set_index("target")["regime"]
    assert regime["cifar10"] == "overfits" and regime["fashion_mnist"] == results.UNDERFIT


def test_phi_tags_and_labels():
    assert results.phi_tag("official") == "official"
    assert results.phi_tag("20261203-meta-train-ab12") == "20261203-meta-train-ab12"
    assert results.phi_tag("/data/phis/my_phi.pt") == "my_phi"          # a file: its stem, as transfer tags it
    assert results.phi_tag("/artifacts/runs/20261203-meta-x.y-ab12") == "20261203-meta-x.y-ab12"  # a run folder
    assert results.phi_tag(None) is None and results.phi_tag(float("nan")) is None
    assert results.method_label("metaperturb", "/data/phis/my_phi.pt") == "metaperturb (ours: …_phi)"
    assert results.method_label("metaperturb", "official") == "metaperturb (authors' phi)"
    assert results.method_label("metaperturb_untrained", "anything") == "metaperturb (untrained control)"
    assert results.method_label("dropblock") == "dropblock"


def test_one_layer_behind_every_import():
    """study, dashboard_data and labels hand out the results layer's own functions, not copies."""
    for name in ("summarize", "paired_differences", "regime_table", "wide", "find_study", "study_runs",
                 "reliability_groups", "robustness_table", "scale_data", "meta_history", "describe_meta",
                 "MetaHistory", "ScaleData", "method_label"):
        assert getattr(study, name) is getattr(results, name), name
    for name in ("accuracy_table", "wide_table", "regime_table", "runs_frame", "reliability", "site_scales",
                 "robustness", "meta_site_stats", "phi_diagnostics", "pool_bins", "ece", "layer_profile",
                 "OVERFIT_GAP", "UNDERFIT", "ACCURACY_KEY", "RunDetails"):
        assert getattr(dashboard_data, name) is getattr(results, name), name
    for name in ("method_label", "labels_for", "phi_verdict", "phi_learned", "short_id", "CONTROL_METHOD"):
        assert getattr(labels, name) is getattr(results, name), name
    assert "dashboard_data" not in Path(study.__file__).read_text()
