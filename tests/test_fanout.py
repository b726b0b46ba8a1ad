"""Fan-out of a study's cells (workbench.fanout): local worker processes and Ray give the same runs as one process,
a failed or killed cell is retried then reported without stopping the others, and a study killed with kill -9
continues where it stopped when resumed."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from workbench import fanout
from workbench.artifacts import RunStore
from workbench.cli import main as cli_main
from workbench.errors import WorkbenchError
from workbench.fanout import Cell, WorkerPlan, plan_workers, run_cells
from workbench.meta_train import MetaTrainConfig, meta_train
from workbench.perturb import MetaPerturb
from workbench.study import StudyRunStore, TransferStudyConfig, run_transfer_grid

from helpers import CIFAR10, OFFICIAL_PHI, REPO, TINY, require_shared, synthetic_dataset

try:
    import ray  # noqa: F401
    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install -e '.[ray]')")


# ------------------------------------------------------------------------------- cell functions for workers
def double(payload, context):
    import torch

    return {"value": payload * 2, "pid": os.getpid(), "threads": torch.get_num_threads(), "device": context.device}


def always_fails(payload, context):
    raise ValueError(f"cell {payload} is broken")


def dies_first_time(payload, context):
    marker = Path(payload)
    if not marker.exists():
        marker.write_text("tried")
        os.kill(os.getpid(), signal.SIGKILL)
    return "second attempt"


def sleeps(payload, context):
    time.sleep(payload)
    return payload


def _plan(workers: int, executor: str = "local") -> WorkerPlan:
    return WorkerPlan(workers, 1, ("cpu",) * workers, executor)


# ------------------------------------------------------------------------------------------- the scheduler
@pytest.mark.parametrize("workers", [1, 2])
def test_every_cell_runs_once_with_one_thread_per_worker(workers):
    cells = [Cell(f"c{i}", f"cell {i}", i) for i in range(5)]
    outcomes = run_cells(cells, double, _plan(workers), progress=False)
    assert list(outcomes) == [c.key for c in cells]
    assert [o.value["value"] for o in outcomes.values()] == [0, 2, 4, 6, 8]
    assert all(o.status == "finished" and o.attempts == 1 for o in outcomes.values())
    assert {o.value["threads"] for o in outcomes.values()} == {1}
    pids = {o.value["pid"] for o in outcomes.values()}
    assert (pids == {os.getpid()}) if workers == 1 else (len(pids) == 2 and os.getpid() not in pids)
    assert not multiprocessing.active_children()  # the workers ended with the grid


def test_a_failing_cell_is_retried_then_reported_and_the_others_finish():
    cells = [Cell("ok0", "ok 0", 0), Cell("bad", "bad", 7), Cell("ok1", "ok 1", 1),
             Cell("after-bad", "waits for bad", 3, after=("bad",))]
    outcomes = run_cells(cells, _dispatch, _plan(2), retries=2, progress=False)
    assert outcomes["ok0"].status == outcomes["ok1"].status == "finished"
    assert outcomes["bad"].status == "failed" and outcomes["bad"].attempts == 3
    assert outcomes["bad"].error == "ValueError: cell 7 is broken"
    assert outcomes["after-bad"].status == "skipped"


def _dispatch(payload, context):
    return always_fails(payload, context) if payload == 7 else double(payload, context)


def test_a_worker_killed_mid_cell_is_replaced_and_the_cell_tried_again(tmp_path):
    cells = [Cell("dies", "dies once", str(tmp_path / "marker")), Cell("other", "other", str(tmp_path / "m2"))]
    (tmp_path / "m2").write_text("already")
    outcomes = run_cells(cells, dies_first_time, _plan(2), retries=1, progress=False)
    assert outcomes["dies"].status == "finished" and outcomes["dies"].attempts == 2
    assert outcomes["dies"].value == "second attempt"
    no_retry = run_cells([Cell("dies", "dies", str(tmp_path / "marker3"))], dies_first_time, _plan(2), retries=0,
                         progress=False)
    assert no_retry["dies"].status == "failed" and "died (killed by signal 9)" in no_retry["dies"].error


def test_an_error_in_on_result_stops_the_grid_and_ends_running_workers():
    cells = [Cell("fast", "fast", 0.0), Cell("slow", "slow", 60.0), Cell("later", "later", 0.0)]

    def stop(cell, value):
        raise RuntimeError("stop here")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stop here"):
        run_cells(cells, sleeps, _plan(2), on_result=stop, progress=False)
    assert time.monotonic() - started < 30
    assert not multiprocessing.active_children()


def test_plan_workers_defaults_to_one_single_thread_worker_per_core(monkeypatch):
    monkeypatch.setattr(fanout, "usable_cores", lambda: 4)
    assert (plan_workers(None, None, "cpu", 10).workers, plan_workers(None, None, "cpu", 10).threads) == (4, 1)
    assert plan_workers(None, 2, "cpu", 10).workers == 2
    assert plan_workers(2, None, "cpu", 10).threads == 2
    assert plan_workers(None, None, "cpu", 3).workers == 3  # never more workers than cells
    assert plan_workers(None, None, "cpu", 10, serial_seconds=2.0).workers == 1  # start-up would not pay
    assert plan_workers(3, None, "cpu", 10, serial_seconds=2.0).workers == 3  # asked for explicitly
    assert not plan_workers(1, None, "cpu", 10).parallel


@pytest.mark.parametrize("change, message", [
    ({"executor": "dask"}, "executor must be one of local, ray"),
    ({"workers": 0}, "workers must be a positive integer or null"),
    ({"retries": -1}, "retries must be a non-negative integer"),
])
def test_bad_execution_settings_are_one_line_errors(change, message):
    with pytest.raises(WorkbenchError, match=message) as info:
        TransferStudyConfig.from_dict({"archs": ["conv4_8"], **change})
    assert "\n" not in str(info.value)
    with pytest.raises(WorkbenchError, match=message):
        MetaTrainConfig.from_dict({**TINY, **change})


@needs_ray
def test_ray_runs_cells_as_tasks_and_reports_failures():
    cells = [Cell(f"c{i}", f"cell {i}", i) for i in range(3)] + [Cell("bad", "bad", 7)]
    outcomes = run_cells(cells, _dispatch, _plan(2, "ray"), retries=1, progress=False)
    assert [outcomes[f"c{i}"].value["value"] for i in range(3)] == [0, 2, 4]
    assert outcomes["bad"].status == "failed" and outcomes["bad"].attempts == 2
    assert "cell 7 is broken" in outcomes["bad"].error
    assert os.getpid() not in {outcomes[f"c{i}"].value["pid"] for i in range(3)}


# ------------------------------------------------------------------------------------- the transfer grid
def _grid(root: Path, **execution) -> tuple:
    require_shared(CIFAR10, OFFICIAL_PHI)
    store = RunStore(root)
    made = store.create_study("notebooks/02_transfer_study.ipynb", "test", {})
    config = TransferStudyConfig.from_dict(dict(
        targets=["cifar10"], per_class=10, per_class_by_target={}, test_per_class=10, image_size=8, archs=["conv4_8"],
        methods=["base", "metaperturb@official"], seeds=[0, 1], steps=3, batch_size=16, final_mc_samples=2,
        device="cpu", threads=1, **execution))
    grid_store = StudyRunStore(root, made.study_id)
    return run_transfer_grid(config, grid_store, progress=False), grid_store


def _per_run(frame, store) -> list:
    rows = []
    for _, row in frame.iterrows():
        run = store.open_run(row.run_id)
        rows.append((row.method, row.seed, row.test_accuracy, row.test_nll, row.test_ece,
                     run.load_arrays("predictions")["probs"].tobytes()))
    return rows


@pytest.fixture(scope="module")
def serial_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("serial")
    frame, store = _grid(root, workers=1)
    return _per_run(frame, store), frame


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=needs_ray)])
def test_fanned_out_grid_gives_the_serial_runs_bit_for_bit(serial_grid, tmp_path, executor):
    expected, serial = serial_grid
    frame, store = _grid(tmp_path, workers=2, executor=executor)
    assert _per_run(frame, store) == expected
    assert frame.attrs["workers"].startswith("2 workers")
    assert list(frame.columns) == list(serial.columns)
    assert len(set(frame.run_id)) == len(frame) == len(store.open_study(store.study_id).run_ids)


@pytest.mark.slow
def test_grid_run_again_in_its_study_keeps_finished_cells_and_restarts_cut_ones(tmp_path, capsys):
    frame, store = _grid(tmp_path, workers=1)
    summaries = {r: (store.runs_dir / r / "summary.json").read_bytes() for r in frame.run_id}
    cut = frame.run_id[1]
    meta = json.loads((store.runs_dir / cut / "run.json").read_text())
    meta.update(status="running", pid=2**22 + 17, pid_start=1)  # a writer that died before its first checkpoint
    (store.runs_dir / cut / "run.json").write_text(json.dumps(meta))
    (store.runs_dir / cut / "summary.json").unlink()
    for checkpoint in (store.runs_dir / cut / "checkpoints").glob("*"):
        checkpoint.unlink()
    study_id = store.study_id
    again = run_transfer_grid(TransferStudyConfig.from_dict(dict(
        targets=["cifar10"], per_class=10, per_class_by_target={}, test_per_class=10, image_size=8, archs=["conv4_8"],
        methods=["base", "metaperturb@official"], seeds=[0, 1], steps=3, batch_size=16, final_mc_samples=2,
        device="cpu", threads=1, workers=2)), StudyRunStore(tmp_path, study_id), progress=False)
    assert "3 of 4 cells were finished by an earlier session" in capsys.readouterr().out
    assert list(again.run_id) == list(frame.run_id)
    kept = [r for r in frame.run_id if r != cut]
    assert {r: (store.runs_dir / r / "summary.json").read_bytes() for r in kept} == {r: summaries[r] for r in kept}
    metrics = ["test_accuracy", "test_nll", "test_ece"]
    assert again[metrics].values.tolist() == frame[metrics].values.tolist()  # the restarted cell trains the same
    assert store.run_record(cut).status == "finished" and len(list(store.runs_dir.iterdir())) == 4


# ----------------------------------------------------------------------------- meta-training's num_runs
@pytest.mark.slow
def test_meta_train_candidates_fan_out_to_the_same_phis_and_choice(tmp_path):
    dataset = synthetic_dataset()
    settings = {**TINY, "steps": 2, "num_runs": 2}
    serial = meta_train(MetaTrainConfig.from_dict({**settings, "workers": 1}), store=RunStore(tmp_path / "a"),
                        progress=False, dataset=dataset)
    fanned = meta_train(MetaTrainConfig.from_dict({**settings, "workers": 2}), store=RunStore(tmp_path / "b"),
                        progress=False, dataset=dataset)
    assert [r.rsplit("-", 1)[1] for r in fanned.run_ids] == ["r0", "r1"]
    assert fanned.run_ids[0].startswith(fanned.selection_run_id)
    assert fanned.selection["chosen_index"] == serial.selection["chosen_index"]
    assert [c["score"] for c in fanned.selection["candidates"]] == [c["score"] for c in serial.selection["candidates"]]
    for a, b in zip(serial.run_ids, fanned.run_ids):
        phi_a = MetaPerturb.load(RunStore(tmp_path / "a").open_run(a).path / "phi.pt").state_dict()
        phi_b = MetaPerturb.load(RunStore(tmp_path / "b").open_run(b).path / "phi.pt").state_dict()
        assert all(np.array_equal(phi_a[k].numpy(), phi_b[k].numpy()) for k in phi_a)
    child = RunStore(tmp_path / "b").open_run(fanned.run_ids[1])
    assert child.tags["parent"] == fanned.selection_run_id and child.tags["run_index"] == 1


# ------------------------------------------------------------------------------------ kill -9 and resume
@pytest.mark.slow
def test_study_killed_halfway_resumes_with_every_cell_exactly_once(tmp_path):
    require_shared(CIFAR10, OFFICIAL_PHI)
    root = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "workbench", "study", "run", "02_transfer_study", "--profile", "smoke",
               "--artifacts", str(root), "--quiet", "--workers", "2",
               "-p", "targets", "[cifar10]", "-p", "robust_targets", "[]", "-p", "methods",
               "[base, metaperturb@official]", "-p", "seeds", "[0, 1, 2]", "-p", "steps", "200", "-p", "phi", "official"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    store = RunStore(root)
    deadline = time.monotonic() + 240
    finished: dict[str, bytes] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list((root / "runs").glob("*/summary.json")) if (root / "runs").is_dir() else []
        if len(runs) >= 2:
            os.kill(proc.pid, signal.SIGKILL)  # the runner only, as a user would; its kernel and workers follow
            break
        time.sleep(0.05)
    assert proc.poll() is None or proc.returncode == -signal.SIGKILL, proc.communicate()[1].decode()[-3000:]
    proc.wait()
    time.sleep(3)  # the kernel sees its parent gone within a second or so, and its workers die with it
    for summary in (root / "runs").glob("*/summary.json"):
        if json.loads((summary.parent / "run.json").read_text())["status"] == "finished":
            finished[summary.parent.name] = summary.read_bytes()
    assert 2 <= len(finished) < 6
    study_id = store.list_studies()[0].study_id
    # the kernel and its workers end after the runner (ipykernel polls its parent; workers die with the kernel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and store.study_record(study_id).status == "running":
        time.sleep(0.2)
    assert cli_main(["study", "resume", study_id, "--artifacts", str(root), "--quiet", "--workers", "2"]) == 0
    study_after = store.open_study(study_id)
    assert study_after.status == "finished"
    run_ids = [r for r in study_after.run_ids if store.run_record(r).kind == "transfer"]
    assert len(run_ids) == len(set(run_ids)) == 6
    assert len(list((root / "runs").iterdir())) == 6 + 1  # and the notebook's report run
    assert all(store.run_record(r).status == "finished" for r in run_ids)
    assert {r: (root / "runs" / r / "summary.json").read_bytes() for r in finished} == finished
    assert "cells were finished by an earlier session" in study_after.executed_notebook_path.read_text()


def test_resume_refuses_a_finished_study_and_a_changed_parameter(tmp_path, capsys):
    store = RunStore(tmp_path)
    made = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {"archs": ["conv4_8"]})
    made.mark_finished()
    assert cli_main(["study", "resume", made.study_id, "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: study {made.study_id} is finished; there is nothing to resume") and err.count("\n") == 1
    from workbench.study import resume_study

    failed = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {"archs": ["conv4_8"]})
    failed.mark_failed("cell [3] raised KeyboardInterrupt")
    with pytest.raises(WorkbenchError, match="only workers, executor, ray_address, retries may change"):
        resume_study(failed.study_id, tmp_path, {"steps": 5})
    assert cli_main(["study", "run", "03", "--profile", "smoke", "--workers", "2", "--artifacts", str(tmp_path)]) == 2
    assert "--workers applies to the notebooks whose cells fan out" in capsys.readouterr().err
