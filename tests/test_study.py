"""Studies: the notebooks' parameters cells match their typed configs, profiles validate, bad parameters are
refused (by the runner before anything is written, and by the notebook itself under plain papermill), a failing
cell marks the study failed, and the helpers that find phi and source studies pick the right records."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml

from workbench import study
from workbench.artifacts import RunStore
from workbench.cli import main as cli_main
from workbench.data import ImageDataset
from workbench.errors import WorkbenchError
from workbench.study import (CalibrationStudyConfig, ParameterError, ScalesStudyConfig, TransferStudyConfig,
                             notebook_config)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STUDY_NOTEBOOKS = ["01_meta_train", "02_transfer_study", "03_calibration_robustness", "04_scales",
                   "05_explore_phi"]


def _parameters_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell is tagged parameters"
    return cells[0]


# ------------------------------------------------------------------------------------------ the notebooks
@pytest.mark.parametrize("name", STUDY_NOTEBOOKS)
def test_parameters_cell_lists_exactly_the_config_fields_with_their_defaults(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    cls = study.notebook_config_class(NOTEBOOKS / f"{name}.ipynb")
    tree = ast.parse(_parameters_cell(nb).source)
    assigned = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, "the parameters cell only assigns names"
        assigned[node.targets[0].id] = ast.literal_eval(node.value)
    assert list(assigned) == cls.field_names()
    defaults = cls().to_dict()
    assert assigned == defaults
    # the notebook's own config accepts its own defaults
    cls.from_dict(assigned)
    # the cell after the parameters validates with the config the metadata names
    index = nb.cells.index(_parameters_cell(nb))
    assert f"study.notebook_config({cls.__name__}, globals(), _names_before)" in nb.cells[index + 1].source
    assert "_names_before = set(globals())" in nb.cells[index - 1].source


def test_committed_notebooks_are_what_the_build_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main(["--check"]) == 0, "run .venv/bin/python notebooks/_build.py and commit the notebooks"
    assert build.main(["--out", str(tmp_path)]) == 0
    for name in STUDY_NOTEBOOKS:
        assert (tmp_path / f"{name}.ipynb").read_text() == (NOTEBOOKS / f"{name}.ipynb").read_text()


@pytest.mark.parametrize("profile", ["smoke", "demo", "cpu", "paper", "results"])
def test_every_profile_gives_every_notebook_valid_parameters(profile):
    data = study.read_profile(profile)
    assert set(data) == set(STUDY_NOTEBOOKS), f"{profile} must cover every notebook"
    prepared = study.prepare_studies(STUDY_NOTEBOOKS, profile)
    assert [p.name for p in prepared] == STUDY_NOTEBOOKS
    for item in prepared:
        assert set(data[item.name]) <= set(item.config_class.field_names())
        assert item.profile == profile


def test_demo_profile_compares_in_a_regime_where_base_overfits():
    grid = study.prepare_studies(["02_transfer_study"], "demo")[0].config
    assert {"base", "metaperturb@official", "metaperturb_untrained"} <= set(grid.methods)
    assert grid.per_class <= 100 and grid.steps * grid.batch_size >= 500 * grid.per_class  # >= 50 epochs
    assert grid.test_per_class * 10 >= 1000 and grid.final_mc_samples >= 30 and len(grid.seeds) >= 2


def test_cpu_profile_is_the_meta_training_config_and_a_grid_with_the_control():
    from workbench.meta_train import MetaTrainConfig

    meta = study.prepare_studies(["01_meta_train"], "cpu")[0].config
    shipped = MetaTrainConfig.from_yaml(REPO / "configs" / "meta_train_cpu.yaml")
    for name in ("arch", "num_tasks", "batch_size", "steps", "lr", "phi_lr", "phi_init_std", "num_runs", "seed",
                 "select_target", "split_scheme", "image_size"):
        assert getattr(meta, name) == getattr(shipped, name), name
    grid = study.prepare_studies(["02_transfer_study"], "cpu")[0].config
    assert set(grid.methods) == {"base", "metaperturb", "metaperturb@official", "metaperturb_untrained"}
    assert set(grid.archs) == {"conv4", "resnet20"} and len(grid.targets) >= 2 and len(grid.seeds) >= 3
    assert grid.test_per_class * 10 >= 1000 and grid.final_mc_samples >= 30


def test_results_profile_is_the_planned_study():
    grid = study.prepare_studies(["02_transfer_study"], "results")[0].config
    assert set(grid.targets) == {"cifar10", "imagenette64", "fashion_mnist", "mnist_test10k", "omniglot_small"}
    assert "resnet20" in grid.archs and len(grid.archs) == 2
    assert {"base", "dropblock", "manifold_mixup", "information_dropout", "mixup", "metaperturb",
            "metaperturb@official", "metaperturb_untrained"} == set(grid.methods)
    assert grid.methods[0] == "base", "Base first: its first run is the regime pilot"
    assert len(grid.seeds) >= 3 and len(grid.robust_targets) == 1
    assert grid.image_size == 32 and grid.test_per_class * 10 >= 1000 and grid.final_mc_samples >= 30
    assert grid.steps * grid.batch_size >= 50 * 10 * grid.per_class, "at least 50 epochs: where Base overfits"
    meta = study.prepare_studies(["01_meta_train"], "results")[0].config
    assert meta == study.prepare_studies(["01_meta_train"], "cpu")[0].config, "our phi is the cpu profile's"


# --------------------------------------------------------------------------------------- validation
def test_notebook_config_refuses_unknown_and_ill_typed_names_and_ignores_the_notebooks_own_objects():
    before = {"study", "plots"}
    namespace = {"study": study, "plots": None, "source_study": "latest", "max_heatmaps": 3, "_private": 1,
                 "session": object(), "config": ScalesStudyConfig()}
    config = notebook_config(ScalesStudyConfig, namespace, before)
    assert config.max_heatmaps == 3 and config.source_study == "latest"
    with pytest.raises(ParameterError, match=r"^unknown ScalesStudyConfig parameter\(s\) \['bogus'\]; valid names "
                                             r"are: archs, artifacts_root, max_heatmaps"):
        notebook_config(ScalesStudyConfig, {**namespace, "bogus": 1}, before)
    with pytest.raises(ParameterError, match=r"^config field 'max_heatmaps' must be an integer, got str 'ten'$"):
        notebook_config(ScalesStudyConfig, {**namespace, "max_heatmaps": "ten"}, before)
    with pytest.raises(ParameterError, match="config field 'targets' must be a list"):
        notebook_config(CalibrationStudyConfig, {"targets": "cifar10"}, set())
    # a ParameterError prints as one line in a notebook (IPython uses _render_traceback_)
    assert ParameterError("x must be y")._render_traceback_() == ["ParameterError: x must be y"]


@pytest.mark.parametrize("change, message", [
    ({"methods": ["base", "dropblock@official"]}, "only methods that use phi take '@phi'"),
    ({"methods": ["base", "nosuchmethod"]}, "nosuchmethod"),
    ({"per_class_by_target": {"svhn": 3}}, "per_class_by_target names 'svhn', which is neither among targets"),
    ({"run_name": "x"}, "unknown TransferStudyConfig parameter"),
    ({"robust_targets": ["svhn"]}, "robust_targets names 'svhn'"),
    ({"noise_warmup": 3}, "noise_warmup is a fraction of the steps"),
    ({"nonsense": 3}, "unknown TransferStudyConfig parameter"),
    ({"seeds": [0, 0]}, "seeds lists an entry twice"),
    ({"archs": []}, "archs must list at least one entry"),
    ({"archs": ["resnet7"]}, "resnet7"),
    ({"method_options": {"dropblock": {"drop_prob": 0.1}}}, "method_options names 'dropblock'"),
    ({"robust_norms": ["l7"]}, "l7"),
    ({"regime_check": "abort"}, "regime_check must be one of warn, stop, off"),
])
def test_transfer_study_config_refuses_bad_grids(change, message):
    with pytest.raises(WorkbenchError, match=message):
        TransferStudyConfig.from_dict({"targets": ["cifar10", "fashion_mnist"], "archs": ["conv4_8"], **change})


def _fake_grid(monkeypatch, base_train_accuracy: float):
    """run_transfer_grid with transfer() replaced: every run ends at 50% test accuracy, Base at
    ``base_train_accuracy`` on its training images, the others at 90%. Returns the list of cells trained."""
    import types

    import workbench.data
    import workbench.transfer

    trained = []

    def fake_transfer(cfg, store, progress=True, dataset=None):
        trained.append((cfg.target, cfg.arch, cfg.seed, cfg.method))
        train = base_train_accuracy if cfg.method == "base" else 0.9
        summary = {"test_accuracy": 0.5, "test_nll": 1.0, "test_ece": 0.1, "train_eval_accuracy": train,
                   "generalization_gap": train - 0.5, "mc_samples": 1, "train_examples": 20, "test_examples": 20,
                   "train_seconds_last_session": 0.0}
        return types.SimpleNamespace(run_id=f"run{len(trained)}", summary=summary,
                                     regularizer=types.SimpleNamespace(needs_phi=False))

    monkeypatch.setattr(workbench.transfer, "transfer", fake_transfer)
    monkeypatch.setattr(workbench.data, "load_dataset", lambda name, root=None: name)
    return trained


def _study_store(root) -> study.StudyRunStore:
    made = RunStore(root).create_study("notebooks/02_transfer_study.ipynb", "test", {})
    return study.StudyRunStore(root, made.study_id)


def _pilot_config(check: str) -> TransferStudyConfig:
    return TransferStudyConfig.from_dict({"targets": ["cifar10", "fashion_mnist"], "archs": ["conv4_8"],
                                          "methods": ["base", "dropblock"], "seeds": [0, 1], "regime_check": check,
                                          "workers": 1})


def test_an_underfit_pilot_stops_the_grid_before_the_other_methods_run(tmp_path, monkeypatch):
    trained = _fake_grid(monkeypatch, base_train_accuracy=0.52)
    with pytest.raises(study.StudyError, match=r"Base on cifar10 / conv4_8 \(seed 0\) ends at 52.0% on its training "
                                               r"images and 50.0% on test.*underfit.*per_class"):
        study.run_transfer_grid(_pilot_config("stop"), _study_store(tmp_path), progress=False)
    assert trained == [("cifar10", "conv4_8", 0, "base")]


def test_an_underfit_pilot_warns_once_per_target_and_arch_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    trained = _fake_grid(monkeypatch, base_train_accuracy=0.52)
    grid = study.run_transfer_grid(_pilot_config("warn"), _study_store(tmp_path), progress=False)
    assert len(trained) == len(grid) == 8
    warnings = grid.attrs["regime_warnings"]
    assert [w.split(" (seed")[0] for w in warnings] == ["Base on cifar10 / conv4_8", "Base on fashion_mnist / conv4_8"]
    assert "warning: Base on cifar10 / conv4_8" in capsys.readouterr().out


@pytest.mark.parametrize("check, train", [("stop", 0.56), ("off", 0.5)])
def test_an_overfitting_pilot_or_no_check_lets_the_whole_grid_run(tmp_path, monkeypatch, check, train):
    trained = _fake_grid(monkeypatch, base_train_accuracy=train)
    grid = study.run_transfer_grid(_pilot_config(check), _study_store(tmp_path), progress=False)
    assert len(trained) == 8 and grid.attrs["regime_warnings"] == []


def test_default_per_class_exceptions_do_not_block_another_grid():
    config = TransferStudyConfig.from_dict({"targets": ["cifar10"], "archs": ["conv4_8"]})
    assert config.per_class_for("cifar10") == 200 and "fashion_mnist" in config.per_class_by_target


def test_transfer_config_of_a_grid_cell():
    config = TransferStudyConfig.from_dict({
        "targets": ["cifar10", "fashion_mnist"], "per_class": 20, "per_class_by_target": {"fashion_mnist": None},
        "archs": ["conv4_8"], "methods": ["base", "metaperturb", "metaperturb@official", "dropblock"],
        "method_options": {"dropblock": {"drop_prob": 0.2}}, "robust_targets": ["cifar10"], "steps": 7,
        "noise_warmup": 0.5, "lr_gamma": 0.5})
    cell = config.transfer_config("cifar10", "conv4_8", "metaperturb", 3, phi="run-x")
    assert (cell.target, cell.per_class, cell.method, cell.phi, cell.seed, cell.steps) == \
        ("cifar10", 20, "metaperturb", "run-x", 3, 7)
    assert cell.robust_norms == ["linf"] and cell.noise_warmup == 0.5 and cell.lr_gamma == 0.5
    # every recipe field reaches the cell as the study has it, apart from the per-target ones
    per_target = {"per_class", "robust_norms", "test_per_class"}
    assert {k: v for k, v in cell.recipe().items() if k not in per_target} == \
        {k: v for k, v in config.recipe().items() if k not in per_target}
    official = config.transfer_config("fashion_mnist", "conv4_8", "metaperturb@official", 0, phi="run-x")
    assert official.phi == "official" and official.per_class is None and official.robust_norms == []
    assert config.transfer_config("cifar10", "conv4_8", "dropblock", 0, "x").method_options == {"drop_prob": 0.2}
    assert len(study.grid_cells(config)) == 2 * 1 * 3 * 4
    assert study.method_label("metaperturb", "official") == "metaperturb (authors' phi)"
    assert study.method_label("metaperturb", "20261203-meta-train-ab12") == "metaperturb (ours: …ab12)"
    assert study.method_label("metaperturb", "20261203-meta-train-ab12", False) == \
        "metaperturb (ours, did not learn: …ab12)"
    assert study.method_label("base") == "base"


def test_overrides_go_to_the_notebooks_that_have_the_field():
    prepared = study.prepare_studies(["01", "02"], "smoke", {"seed": 5, "02.steps": 9, "threads": 2})
    meta, grid = prepared
    assert meta.config.seed == 5 and meta.config.threads == 2 and grid.config.threads == 2
    assert grid.config.steps == 9 and meta.config.steps == study.load_profile("smoke", "01_meta_train")["steps"]
    with pytest.raises(WorkbenchError, match=r"unknown parameter\(s\) \['bogus'\]"):
        study.prepare_studies(["01", "02"], "smoke", {"bogus": 1})
    with pytest.raises(WorkbenchError, match="'05' is not one of the notebooks run"):
        study.prepare_studies(["01"], "smoke", {"05.steps": 1})
    with pytest.raises(WorkbenchError, match="has no entry for notebook 'failing'"):
        study.load_profile("smoke", "failing")


@pytest.mark.parametrize("args, message", [
    (["-p", "bogus", "1"], r"error: 04_scales: unknown ScalesStudyConfig parameter\(s\) \['bogus'\]; valid names"),
    (["-p", "max_heatmaps", "ten"], "error: 04_scales: config field 'max_heatmaps' must be an integer, got str 'ten'"),
])
def test_runner_refuses_bad_parameters_before_writing_anything(tmp_path, capsys, args, message):
    root = tmp_path / "artifacts"
    code = cli_main(["study", "run", "04", "--profile", "smoke", "--artifacts", str(root), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and __import__("re").match(message, err.strip())
    assert not root.exists()


# --------------------------------------------------------------------------------- executing notebooks
def _tiny_notebook(path: Path, failing: bool) -> Path:
    from nbformat.v4 import new_code_cell, new_notebook

    cells = [
        new_code_cell("from workbench import study\nfrom workbench.study import ScalesStudyConfig\n\n"
                      "_names_before = set(globals())"),
        new_code_cell(study.parameters_source(ScalesStudyConfig), metadata={"tags": ["parameters"]}),
        new_code_cell("config = study.notebook_config(ScalesStudyConfig, globals(), _names_before)\n"
                      "session = study.open_session('failing', config)"),
        new_code_cell("print('before the failure', config.max_heatmaps)"),
        new_code_cell("raise RuntimeError('deliberate failure')" if failing else "print('no failure')"),
        new_code_cell("print('never printed')\nsession.finish()"),
    ]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "workbench": {"config": "workbench.study:ScalesStudyConfig"}})
    nbformat.write(nb, str(path))
    return path


def test_a_failing_cell_marks_the_study_failed_and_keeps_the_error_in_the_executed_notebook(tmp_path, capsys):
    notebook = _tiny_notebook(tmp_path / "failing.ipynb", failing=True)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"failing": {"max_heatmaps": 2}}))
    root = tmp_path / "artifacts"
    code = cli_main(["study", "run", str(notebook), "--profile", str(profile), "--artifacts", str(root), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "RuntimeError: deliberate failure" in err.strip().splitlines()[-1]
    [record] = RunStore(root).list_studies()
    assert record.status == "failed" and record.stored_status == "failed"
    assert "RuntimeError: deliberate failure" in record.reason
    assert record.profile == "profile" and record.parameters["max_heatmaps"] == 2
    assert record.git_revision is None or len(record.git_revision) == 40
    assert record.environment.get("torch") == torch.__version__
    executed = nbformat.read(record.path / "failing.ipynb", as_version=4)
    outputs = {c.source.splitlines()[0]: c.get("outputs", []) for c in executed.cells if c.cell_type == "code"}
    assert any("before the failure 2" in o.get("text", "") for o in outputs["print('before the failure', "
                                                                            "config.max_heatmaps)"])
    errors = [o for o in outputs["raise RuntimeError('deliberate failure')"] if o.output_type == "error"]
    assert errors and errors[0].ename == "RuntimeError" and errors[0].evalue == "deliberate failure"
    assert outputs["print('never printed')"] == []
    assert not list(record.path.glob(".*partial*")), "the partial notebook was renamed into place"


@pytest.mark.parametrize("args, message", [
    (["-p", "bogus", "1"], "ParameterError: unknown ScalesStudyConfig parameter(s) ['bogus']; valid names are: "),
    (["-p", "max_heatmaps", "ten"], "ParameterError: config field 'max_heatmaps' must be an integer, got str 'ten'"),
])
def test_plain_papermill_stops_at_the_validation_cell(tmp_path, args, message):
    out = tmp_path / "out.ipynb"
    env = {**os.environ, "WORKBENCH_ARTIFACTS": str(tmp_path / "artifacts")}
    env.pop("WORKBENCH_STUDY_ID", None)
    result = subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / "04_scales.ipynb"), str(out),
                             "--no-progress-bar", *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "ParameterError"
    assert errors[0].traceback == [f"ParameterError: {errors[0].evalue}"], "one line, no traceback"
    assert not (tmp_path / "artifacts").exists(), "nothing is written before the parameters are valid"


# -------------------------------------------------------------------------------------- finding records
def _finished_run(store: RunStore, kind: str, tags: dict, phi: bool = True):
    run = store.create_run(kind, {"k": 1}, tags=tags)
    if phi:
        (run.path / "phi.pt").write_bytes(b"placeholder")
    run.mark_finished({"x": 1})
    return run


def test_latest_phi_is_the_newest_finished_meta_training_result(tmp_path):
    store = RunStore(tmp_path)
    assert study.latest_phi_run(store) is None
    with pytest.raises(study.StudyError, match="no finished meta-training run"):
        study.resolve_study_phi("latest", store)
    first = _finished_run(store, "meta_train", {"seed": 0})
    assert study.latest_phi_run(store).run_id == first.run_id
    select = store.create_run("meta_select", {"k": 1})
    child = _finished_run(store, "meta_train", {"seed": 1, "parent": select.run_id})
    assert study.latest_phi_run(store).run_id == first.run_id, "a candidate of an unfinished selection is not it"
    (select.path / "phi.pt").write_bytes(b"placeholder")
    select.mark_finished({})
    assert study.latest_phi_run(store).run_id == select.run_id
    store.create_run("meta_train", {"k": 1})  # running: not a result yet
    _finished_run(store, "meta_train", {"seed": 3}, phi=False)  # no phi.pt
    assert study.resolve_study_phi("latest", store) == select.run_id
    assert child.run_id != select.run_id
    assert study.resolve_study_phi("official", store) == "official"
    with pytest.raises(WorkbenchError, match="neither 'official', a phi file, nor a run id"):
        study.resolve_study_phi("no-such-run", store)


def test_find_study_latest_finished_of_the_transfer_notebook(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(study.StudyError, match="no finished 02_transfer_study study.*workbench study run "
                                               "02_transfer_study --profile demo"):
        study.find_study(store, "latest")
    old = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {})
    old.mark_finished()
    store.create_study("notebooks/04_scales.ipynb", "smoke", {}).mark_finished()
    failed = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {})
    failed.mark_failed("boom")
    assert study.find_study(store, "latest").study_id == old.study_id
    newer = store.create_study("notebooks/02_transfer_study.ipynb", "demo", {})
    newer.mark_finished()
    assert study.find_study(store, "latest").study_id == newer.study_id
    assert study.find_study(store, old.study_id).study_id == old.study_id
    with pytest.raises(study.StudyError, match="is failed, not finished"):
        study.find_study(store, failed.study_id)
    with pytest.raises(study.StudyError, match="has no finished transfer runs"):
        study.study_runs(store, study.find_study(store, "latest"))


def test_limit_test_keeps_the_first_images_of_every_class():
    y_test = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1])
    x_test = torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1).expand(9, 1, 2, 2).contiguous()
    ds = ImageDataset("t", torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]), x_test, y_test,
                      ["a", "b", "c"])
    cut = study.limit_test(ds, 2)
    assert cut.y_test.tolist() == [0, 1, 0, 2, 1, 2]
    assert cut.x_test[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 6]
    assert study.limit_test(ds, None) is ds
    assert study.limit_test(ds, 10).y_test.tolist() == y_test.tolist()


def test_tidy_outputs_merges_streams_and_keeps_the_last_state_of_progress_bars():
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    cell = new_code_cell("x")
    cell.outputs = [new_output("stream", name="stderr", text="bar  0%\r"), new_output("stream", name="stderr",
                    text="bar 50%\rbar 100%\n\x1b[Ainner\r     \r"), new_output("stream", name="stdout", text="done\n"),
                    new_output("execute_result", data={"text/plain": "1"}, execution_count=1)]
    study.tidy_outputs(new_notebook(cells=[cell]))
    assert [(o.output_type, o.get("text")) for o in cell.outputs] == [
        ("stream", "bar 100%"), ("stream", "done\n"), ("execute_result", None)]


def test_study_list(tmp_path, capsys):
    assert cli_main(["study", "list", "--artifacts", str(tmp_path)]) == 0
    assert "no studies" in capsys.readouterr().out
    store = RunStore(tmp_path)
    done = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {"steps": 3})
    done.mark_finished()
    store.create_study("notebooks/04_scales.ipynb", "demo", {}).mark_failed("cell [5] raised StudyError: nope")
    assert cli_main(["study", "list", "--artifacts", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and done.study_id in out[1] and "finished" in out[1]
    assert "failed" in out[2] and "cell [5] raised StudyError: nope" in out[2]
    assert cli_main(["study", "list", "--artifacts", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["finished", "failed"] and rows[0]["parameters.steps"] == 3
