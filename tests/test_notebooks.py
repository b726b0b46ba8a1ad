"""Every study notebook runs under papermill with the smoke profile and writes its artifacts; rerunning the smoke
study gives the same numbers. The smoke study runs once per session (conftest's ``smoke_study``, about a minute on a
loaded 2-core machine) and is shared with tests/test_dashboard.py: these tests only read it."""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from workbench.artifacts import RunStore
from workbench.cli import main as cli_main
from workbench.study import REPORT_KIND

from helpers import SMOKE_FILES, SMOKE_NOTEBOOKS, require_shared

NOTEBOOKS = SMOKE_NOTEBOOKS  # what conftest's smoke_study runs
DEMO_NOTEBOOKS = NOTEBOOKS[:4]  # what `workbench demo` runs (the explorer is for a person at the controls)
SMOKE_GRID = {"targets": 2, "archs": 1, "seeds": 2, "methods": 5}  # notebooks/profiles/smoke.yaml


def _run_smoke(root: Path, notebooks: list[str]) -> dict[str, object]:
    code = cli_main(["study", "run", *notebooks, "--profile", "smoke", "--artifacts", str(root), "--quiet"])
    assert code == 0, f"the smoke study failed; see the executed notebooks under {root / 'studies'}"
    store = RunStore(root)
    return {Path(r.notebook).stem: r for r in store.list_studies()}


@pytest.fixture(scope="module")
def smoke(smoke_study):
    """(root, studies by notebook) of the session's smoke study."""
    return smoke_study, {Path(r.notebook).stem: r for r in RunStore(smoke_study).list_studies()}


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_every_notebook_finishes_with_its_executed_notebook_saved(smoke):
    root, studies = smoke
    assert sorted(studies) == NOTEBOOKS
    for name, record in studies.items():
        assert record.status == "finished", (name, record.reason)
        assert record.profile == "smoke" and record.notebook == f"notebooks/{name}.ipynb"
        assert record.executed_notebook_exists
        nb = nbformat.read(record.path / f"{name}.ipynb", as_version=4)
        outputs = _outputs(nb)
        assert not [o for o in outputs if o.output_type == "error"]
        assert nb.metadata["papermill"]["parameters"] == record.parameters
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code_cells if c.source.strip())
        figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
        assert len(figures) >= 2, f"{name} shows its plotly figures inline"
        assert record.environment.get("torch") == torch.__version__


def test_runs_are_linked_to_their_studies_and_carry_their_artifacts(smoke):
    root, studies = smoke
    store = RunStore(root)
    meta_runs = store.list_runs(kind="meta_train")
    assert len(meta_runs) == 1 and meta_runs[0].study_id == studies["01_meta_train"].study_id
    meta = store.open_run(meta_runs[0].run_id)
    assert (meta.path / "phi.pt").is_file() and meta.has_arrays("site_stats")

    grid_study = studies["02_transfer_study"]
    transfers = store.list_runs(kind="transfer")
    expected = int(np.prod(list(SMOKE_GRID.values())))
    assert len(transfers) == expected
    assert {r.study_id for r in transfers} == {grid_study.study_id}
    assert set(grid_study.run_ids) >= {r.run_id for r in transfers}
    phis = {r.tags.get("phi") for r in transfers if r.tags["method"] == "metaperturb"}
    assert phis == {"official", meta.run_id}, "metaperturb ran with our phi (phi=latest) and the authors'"
    for record in transfers:
        run = store.open_run(record.run_id)
        assert record.status == "finished" and run.has_arrays("reliability") and run.has_arrays("predictions")
        assert run.has_arrays("site_scales") == record.tags["method"].startswith("metaperturb")
        assert run.has_arrays("robustness") == (record.tags["target"] == "mnist_test10k")
        assert run.summary["test_examples"] == 20 * 10, "test_per_class=20 on 10-class targets"

    for name in ("02_transfer_study", "03_calibration_robustness", "04_scales"):
        reports = store.list_runs(kind=REPORT_KIND, study_id=studies[name].study_id)
        assert len(reports) == 1 and reports[0].status == "finished"
    report = store.open_run(store.list_runs(kind=REPORT_KIND, study_id=grid_study.study_id)[0].run_id)
    accuracy = report.load_json("accuracy")
    assert len(accuracy) == 2 * 1 * 5  # targets x archs x method labels
    labels = {row["method"] for row in accuracy}
    # a 4-step smoke phi cannot learn: its rows say so rather than passing for ours
    ours = f"metaperturb (ours, did not learn: …{meta.run_id[-4:]})"
    assert labels == {"base", "dropblock", ours, "metaperturb (authors' phi)", "metaperturb (untrained control)"}
    assert meta.load_json("phi_diagnostics")["learned"] is False
    regime = report.load_json("regime")
    assert {(row["arch"], row["target"]) for row in regime} == {("conv4_8", "mnist_test10k"), ("conv4_8", "cifar10")}
    paired = report.load_json("paired_test_nll")
    assert {row["label"] for row in paired} == labels - {"base"} and all(row["n"] == 2 for row in paired)
    assert all(row["n"] == 2 for row in accuracy)
    assert all(row["delta_base"] is None for row in accuracy if row["method"] == "base")
    assert report.load_json("info")["our_phi"] == meta.run_id

    calib = store.open_run(store.list_runs(kind=REPORT_KIND, study_id=studies["03_calibration_robustness"]
                                           .study_id)[0].run_id)
    assert calib.tags["source_study"] == grid_study.study_id
    robust = calib.load_json("robustness")
    assert {row["target"] for row in robust} == {"mnist_test10k"}
    assert sorted({row["eps"] for row in robust}) == pytest.approx([0.0, 0.0157, 0.0314])
    scales = store.open_run(store.list_runs(kind=REPORT_KIND, study_id=studies["04_scales"].study_id)[0].run_id)
    profile = scales.load_json("profile")
    assert {row["label"] for row in profile} == {ours, "metaperturb (authors' phi)", "metaperturb (untrained control)"}
    assert {row["site_index"] for row in profile} == {0, 1, 2, 3}, "Conv-4 has four perturbation sites"

    # the explorer read the newest transfer run's network and showed our phi beside its untrained control
    [explorer] = store.list_runs(kind=REPORT_KIND, study_id=studies["05_explore_phi"].study_id)
    explored = store.open_run(explorer.run_id)
    info = explored.load_json("info")
    newest = max(transfers, key=lambda r: r.run_id).run_id
    assert info["network"].startswith(f"the trained conv4_8 of run …{newest[-4:]}")
    assert info["site"] == "1: features.1.act"
    assert info["phis"] == [ours, f"metaperturb (untrained control): …{meta.run_id[-4:]}"]
    channels = explored.load_json("channels")
    assert len(channels) == 2 * 8 and all(0 < row["scale"] < 1 for row in channels)


def test_rerunning_the_smoke_study_gives_identical_numbers(smoke, tmp_path):
    root, _ = smoke
    again = tmp_path / "again"
    _run_smoke(again, NOTEBOOKS[:2])

    def numbers(path: Path) -> dict:
        store = RunStore(path)
        out = {}
        [meta] = store.list_runs(kind="meta_train")
        run = store.open_run(meta.run_id)
        out["meta"] = (run.summary["heldout_acc"], run.summary["final_means"])
        phi = torch.load(run.path / "phi.pt", map_location="cpu", weights_only=True)
        out["phi"] = [v.numpy().tolist() for _, v in sorted(phi["state_dict"].items())]
        for record in store.list_runs(kind="transfer"):
            t = record.tags
            phi_kind = None if "phi" not in t else ("official" if t["phi"] == "official" else "ours")
            s = store.run_record(record.run_id).summary
            out[(t["target"], t["arch"], t["method"], phi_kind, t["seed"])] = (
                s["test_accuracy"], s["test_nll"], s["test_ece"], s.get("mean_scale"))
        return out

    first, second = numbers(root), numbers(again)
    assert len(first) == 2 + int(np.prod(list(SMOKE_GRID.values())))
    assert first == second


def test_demo_runs_the_studies_then_serves_the_dashboard_until_interrupted(tmp_path):
    require_shared(*SMOKE_FILES)
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "artifacts"
    # stderr to a file: progress bars write more on a slow machine, and an undrained pipe that fills up would
    # block the demo on a write (it then never reaches the dashboard, or never exits after the interrupt)
    errors = open(tmp_path / "demo.stderr", "w+")
    # started with SIGINT ignored, as a shell without job control starts background jobs (CI runners, `cmd &`):
    # Ctrl-C must still stop the demo and its server
    process = subprocess.Popen([sys.executable, "-m", "workbench", "demo", "--profile", "smoke", "--quiet",
                                "--artifacts", str(root), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=errors, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                               start_new_session=True)  # its own process group: a failed test kills the server too
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()  # stdout is drained all along too
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if any("dashboard running at" in line for line in lines):
                break
            time.sleep(0.2)
        running = [line for line in lines if "dashboard running at" in line]
        assert running, "".join(lines) + (tmp_path / "demo.stderr").read_text()
        url = f"http://127.0.0.1:{port}"
        assert url in running[0]
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=10) as response:
            assert response.read().decode() == "ok"
        text = "".join(lines)
        assert "demo studies done in" in text and "test accuracy (mean ± std over seeds)" in text
        assert "does Base overfit?" in text and "test_nll: difference to Base of the same seed" in text
        studies = RunStore(root).list_studies()
        assert [Path(s.notebook).stem for s in studies] == DEMO_NOTEBOOKS
        assert all(s.status == "finished" and s.profile == "smoke" for s in studies)
        grid = studies[1]
        assert grid.parameters["phi"] == RunStore(root).list_runs(kind="meta_train")[0].run_id
        assert studies[2].parameters["source_study"] == grid.study_id == studies[3].parameters["source_study"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert "dashboard stopped" in "".join(lines)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=5)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the demo and the server it started, if still there
        except ProcessLookupError:
            pass
        process.wait()
        errors.close()


def test_results_report_tables_and_provenance(smoke, tmp_path):
    import importlib.util
    import json

    shared, studies = smoke
    root = tmp_path / "artifacts"  # the report writes provenance.json into its root: a copy, not the shared study
    shutil.copytree(shared, root, symlinks=True)
    path = Path(__file__).resolve().parents[1] / "scripts" / "results_report.py"
    spec = importlib.util.spec_from_file_location("results_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.report(root, "latest", "workbench study run 01 02 03 04 --profile smoke", write_provenance=True)
    store = RunStore(root)
    runs = [r for r in store.list_runs(kind="transfer")]
    assert module.study_runs(store, module.find_study(store, "latest"))["label"].nunique() == SMOKE_GRID["methods"]
    for heading in ("## Provenance", "## Test accuracy (%)", "difference to Base", "## Expected calibration error",
                    "## Per-layer perturbation scales"):
        assert heading in text
    accuracy = text.split("## Test accuracy (%), mean ± std over seeds")[1].split("###")[0]
    rows = [line for line in accuracy.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == SMOKE_GRID["methods"] and rows[0].startswith("| base |")
    assert all(line.count("±") == SMOKE_GRID["targets"] * SMOKE_GRID["archs"] for line in rows)
    prov = json.loads((root / "provenance.json").read_text())
    # the studies its numbers rest on: not the explorer's, which reports none
    assert {s["study_id"] for s in prov["studies"]} == {str(s.study_id) for name, s in studies.items()
                                                        if name in module.NOTEBOOKS}
    assert all(len(s["git_revision"] or "") == 40 for s in prov["studies"]) and prov["wall_minutes"] is not None
    assert len(runs) == int(np.prod(list(SMOKE_GRID.values())))


def test_ship_results_leaves_out_weights_and_probabilities_and_never_overwrites(smoke, tmp_path):
    import importlib.util

    root, _ = smoke
    spec = importlib.util.spec_from_file_location(
        "ship_results", Path(__file__).resolve().parents[1] / "scripts" / "ship_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    into = tmp_path / "shipped"
    count = module.ship(root, into)
    assert count == len(list((root / "runs").iterdir())) + len(list((root / "studies").iterdir()))
    assert not list(into.rglob("checkpoints")) and list(root.rglob("checkpoints"))
    shipped = sorted(into.rglob("predictions.npz"))
    assert shipped
    with np.load(shipped[0]) as arrays:
        assert "probs" not in arrays.files and {"confidence", "predicted", "label", "correct"} <= set(arrays.files)
    store = RunStore(into)
    assert all(r.status == "finished" for r in store.list_runs())
    with pytest.raises(SystemExit, match="never overwritten"):
        module.ship(root, into)
