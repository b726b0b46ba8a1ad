"""The run store's readers and writers under damage and contention (issue 22): every file a reader opens is checked
for its schema and types and for leading outside the root, so one bad run is listed as corrupt and breaks nothing
else; a root that is a file is one line; a finished run without its arrays says so; a run has one writer (an OS
lock), a finished run is not resumed, a final phase cut short is run again once, a resumed run's time sums its
sessions, and a run of another kind is sent to its own command."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dashboard_fixtures as fixtures
from helpers import REPO, TESTS, save_npz, synthetic_dataset
from helpers import band_dataset as synthetic  # (the child scripts below import it from here)

from workbench import dashboard_data as dd
from workbench.artifacts import LOCK_FILE, RunStore, atomic_savez
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.labels import labels_for, phi_verdict
from workbench.meta_train import MetaTrainConfig, MetaTrainer, meta_train
from workbench.transfer import TransferConfig, transfer

APP_MAIN = REPO / "app" / "main.py"

SECRET = fixtures.SECRET
PAGES = ["runs", "accuracy", "scales", "calibration", "curves"]
HOST = socket.gethostname()


# ------------------------------------------------------------------------------------------------- helpers
def transfer_config(root, **changes) -> TransferConfig:
    values = dict(target="synthetic", arch="conv4_4", image_size=16, steps=6, batch_size=8, eval_every=0,
                  eval_mc_samples=2, final_mc_samples=2, eval_batch_size=16, train_eval_examples=12, log_every=1,
                  checkpoint_every=2, device="cpu", method="base", threads=1, artifacts_root=str(root))
    values.update(changes)
    return TransferConfig.from_dict(values)


META = dict(arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=4, checkpoint_every=2, log_every=1,
            threads=1, device="cpu")


def child(code: str, *args: str, stdin: bool = False) -> subprocess.Popen:
    """A Python process running ``code`` (``sys.argv[1:]`` = ``args``) with this folder importable."""
    script = "import sys\n" + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None)


HOLD = """
from workbench.artifacts import RunStore
run = RunStore(sys.argv[1]).resume_run(sys.argv[2], sys.argv[3])
print("holding", flush=True)
sys.stdin.readline()  # until the test closes stdin
"""


def rows_of(run) -> list[tuple[str, int]]:
    return [(row["stage"], row["step"]) for row in run.read_metrics()]


def texts(app) -> str:
    """Every piece of text on an AppTest page, tables and chart specs included."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(app, kind)]
    parts += [e.value.to_string() for e in app.dataframe]
    parts += [str(e.value) for e in app.json]
    parts += [chart.proto.spec for chart in app.get("plotly_chart")]
    return "\n".join(parts)


def render(root, page: str, monkeypatch, query: dict | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(root))
    app = AppTest.from_file(str(APP_MAIN), default_timeout=120)
    app.run()
    if page != "runs":
        app.switch_page(f"views/{page}.py")
    app.query_params.update(query or {})
    app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """(root, {run id: reason fragment}) of a small store plus one run damaged in each way the store checks."""
    base = tmp_path_factory.mktemp("damaged")
    root = base / "artifacts"
    fixtures.populate(root, targets=("cifar10",), archs=("conv4",), methods=("base", "metaperturb"), seeds=(0, 1),
                      study=False)
    return root, fixtures.add_damaged_runs(root, base / "outside")


# ------------------------------------------------------------------------------ 1, 2: readers check what they open
def test_every_damaged_run_is_listed_as_corrupt_with_its_reason(damaged):
    root, made = damaged
    store = RunStore(root)
    records = {r.run_id: r for r in store.list_runs()}
    for run_id, fragment in made.items():
        record = records[run_id]
        if fragment == fixtures.NOTICE:
            assert (record.status, record.reason) == ("finished", "") and fragment in record.notice
            continue
        assert record.status == "corrupt" and fragment in record.reason, (run_id, record)
        assert "\n" not in record.reason and SECRET not in record.reason
        assert store.run_record(run_id).reason == record.reason  # one rule for a listing and a single record
        with pytest.raises(WorkbenchError, match=f"run {run_id} is corrupt: "):
            store.open_run(run_id)
    # the run whose tag holds a list keeps its other tags (filters find it) but not that one
    assert records["bad-tag-list"].tags == {"target": "cifar10", "arch": "resnet20", "method": "metaperturb",
                                            "phi": "official", "source": "official"}
    frame = dd.runs_frame(root)
    for column in ("source", "target", "arch", "method", "seed", "status"):
        values = dd.options(frame, column)
        assert all(isinstance(v, (str, int, float, bool)) for v in values), (column, values)
    assert dd.options(frame, "seed") == [0, 1, 7, 98, 99]
    assert SECRET not in frame.to_string()


def test_options_never_offer_a_value_that_is_not_plain():
    import pandas as pd

    runs = pd.DataFrame({"seed": [0, [1, 2], {"a": 1}, None, 1.0, float("nan"), np.int64(3)]})
    assert dd.options(runs, "seed") == [0, 1, 3]


def test_readers_of_an_open_run_refuse_wrong_types_and_files_outside_the_root(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    outside = tmp_path / "outside"
    outside.mkdir()
    run = store.create_run("transfer", {"steps": 2}, tags={"seed": 0})
    run.log_metrics(1, "train", loss=1.0)
    run.save_arrays("predictions", confidence=np.full(3, 0.5, np.float32))
    run.save_json("split", {"a": 1})
    run.save_checkpoint({"step": 1})
    run.mark_finished({"test_accuracy": 0.5})
    reader = store.open_run(run.run_id)  # opened while every file is fine, then damaged underneath

    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": SECRET, "loss": 1.0}) + "\n")
    (run.path / "metrics.jsonl").rename(tmp_path / "kept.jsonl")
    os.symlink(outside / "metrics.jsonl", run.path / "metrics.jsonl")
    with pytest.raises(WorkbenchError, match="metrics.jsonl leads outside the artifacts root"):
        reader.read_metrics()
    os.remove(run.path / "metrics.jsonl")
    (tmp_path / "kept.jsonl").rename(run.path / "metrics.jsonl")
    with open(run.path / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": [2], "stage": "train", "loss": 1.0}) + "\n")
    with pytest.raises(WorkbenchError, match="is corrupt: metrics.jsonl line 2: step is a list, not an integer"):
        reader.read_metrics()

    atomic_savez(outside / "predictions.npz", confidence=np.full(3, 0.9, np.float32))
    os.remove(run.path / "arrays" / "predictions.npz")
    os.symlink(outside / "predictions.npz", run.path / "arrays" / "predictions.npz")
    for read in (lambda: reader.load_arrays("predictions"), lambda: reader.has_arrays("predictions")):
        with pytest.raises(WorkbenchError, match="arrays/predictions.npz leads outside the artifacts root"):
            read()
    os.remove(run.path / "arrays" / "predictions.npz")
    atomic_savez(run.path / "arrays" / "predictions.npz", confidence=np.full(2, 0.5, np.float32), extra=np.asarray(["a"]))
    reader.load_arrays("predictions")  # a plain npz fitting the schema (extra members are allowed)
    atomic_savez(run.path / "arrays" / "predictions.npz", confidence=np.asarray(["high"]))
    with pytest.raises(WorkbenchError, match="predictions.npz array 'confidence' has dtype <U4, not a number"):
        reader.load_arrays("predictions")

    for relative, read in (("summary.json", lambda: reader.summary),
                           ("records/split.json", lambda: reader.load_json("split")),
                           ("checkpoints/last.pt", lambda: reader.load_checkpoint()),
                           ("config.json", lambda: store.open_run(run.run_id))):
        target = outside / Path(relative).name
        target.write_text(json.dumps({"secret": SECRET}))
        os.replace(run.path / relative, tmp_path / "kept")
        os.symlink(target, run.path / relative)
        with pytest.raises(WorkbenchError, match=f"{re.escape(relative)} (leads|is a symlink leading) outside the "
                                                 "artifacts root"):
            read()
        os.remove(run.path / relative)
        os.replace(tmp_path / "kept", run.path / relative)
    (run.path / "summary.json").write_text(json.dumps({"test_accuracy": [0.5]}))
    with pytest.raises(WorkbenchError, match="summary.json test_accuracy is a list, not a number"):
        reader.summary


def test_the_phi_verdict_reads_diagnostics_only_inside_the_root(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    with fixtures.fast_environment():
        meta = fixtures.write_meta_train_run(store)
    assert phi_verdict(store, meta.run_id)["learned"] is True
    outside = tmp_path / "outside" / "phi_diagnostics.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"learned": False, "message": SECRET}))
    record = meta.path / "records" / "phi_diagnostics.json"
    record.unlink()
    record.symlink_to(outside)
    assert phi_verdict(store, meta.run_id) is None  # not read: the store lists the run as corrupt
    assert labels_for(store, ["metaperturb"], [meta.run_id]) == [f"metaperturb (ours: …{meta.run_id[-4:]})"]
    with pytest.raises(WorkbenchError, match="records/phi_diagnostics.json is a symlink leading outside"):
        dd.phi_diagnostics(tmp_path / "artifacts", meta.run_id)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_a_store_with_damaged_runs(damaged, page, monkeypatch):
    root, made = damaged
    app = render(root, page, monkeypatch)
    shown = texts(app)
    assert SECRET not in shown
    assert len(app.get("plotly_chart")) >= 1
    if page == "runs":
        (problems,) = [e.value for e in app.dataframe if {"where", "reason"} <= set(e.value.columns)]
        (notices,) = [e.value for e in app.dataframe if {"where", "notice"} <= set(e.value.columns)]
        for run_id, fragment in made.items():
            table, column = (notices, "notice") if fragment == fixtures.NOTICE else (problems, "reason")
            row = table[table["where"] == f"runs/{run_id}"]
            assert len(row) == 1 and fragment in row[column].iloc[0], (run_id, row)
    if page == "calibration":  # the finished run without predictions is not left out silently
        app.selectbox(key="cal_arch").set_value("resnet20").run()
        assert not app.exception and SECRET not in texts(app)
        assert any("missing-arrays" in e.value and fixtures.NOTICE in e.value for e in app.info)


def test_a_damaged_run_asked_for_by_id_is_refused_and_never_shown(damaged, monkeypatch):
    root, made = damaged
    app = render(root, "runs", monkeypatch)
    for run_id, fragment in made.items():
        app.text_input(key="run_id_text").input(run_id).run()
        assert not app.exception and SECRET not in texts(app)
        if fragment == fixtures.NOTICE:
            assert any(fixtures.NOTICE in w.value for w in app.warning)  # the run's details say what it lacks
        else:
            assert any(f"runs/{run_id} is corrupt" in e.value and fragment in e.value for e in app.error), run_id
    for page in ("scales", "curves", "calibration"):
        for run_id in ("arrays-out", "npz-out", "metrics-out", "config-out"):
            shown = render(root, page, monkeypatch, query={"run": run_id})
            assert SECRET not in texts(shown), (page, run_id)


# ------------------------------------------------------------------------------------ 3: a root that is a file
def test_a_root_that_is_a_file_is_one_line_everywhere(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    holds_file = tmp_path / "holds-file"
    holds_file.mkdir()
    (holds_file / "runs").write_text("not a folder")
    (holds_file / "studies").write_text("not a folder")
    for root, fragment in ((afile, f"the artifacts root {afile} is a file, not a folder; pass --artifacts DIR"),
                           (holds_file, f"{holds_file / 'runs'} is a file, not a folder")):
        with pytest.raises(WorkbenchError, match=re.escape(fragment)) as info:
            RunStore(root).create_run("transfer", {})
        assert "\n" not in str(info.value)
    with pytest.raises(WorkbenchError, match="is a file, not a folder"):
        RunStore(afile).create_study("notebooks/01_meta_train.ipynb", "smoke", {})
    with pytest.raises(WorkbenchError, match=re.escape(f"{holds_file / 'studies'} is a file, not a folder")):
        RunStore(holds_file).create_study("notebooks/01_meta_train.ipynb", "smoke", {})
    with pytest.raises(WorkbenchError, match="is a file, not a folder"):
        RunStore(afile).list_runs()
    (record,) = RunStore(holds_file).list_runs()
    assert (record.run_id, record.status, record.reason) == ("runs", "corrupt", "the runs folder is a file, not a "
                                                                                 "folder; not read")
    (study,) = RunStore(holds_file).list_studies()
    assert study.status == "corrupt" and "is a file" in study.reason

    source = save_npz(synthetic(), tmp_path / "source.npz")
    sets = [f"--set={k}={v}" for k, v in dict(target=source, arch="conv4_4", image_size=16, steps=1,
                                                batch_size=8, eval_every=0, final_mc_samples=1, eval_mc_samples=1,
                                                train_eval_examples=0, device="cpu", method="base").items()]
    for root, fragment in ((afile, "is a file, not a folder; pass --artifacts"), (holds_file, "runs is a file")):
        assert main(["transfer", "--artifacts", str(root), "--no-progress", *sets]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err

    app = render(afile, "runs", monkeypatch)  # the dashboard says so on the page
    assert any("is a file, not a folder" in e.value for e in app.error)


# ------------------------------------------------------------------------------------- 5: one writer per run
def test_the_writer_lock_is_held_from_creation_to_the_final_status(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    run = store.create_run("transfer", {}, run_id="locked")
    assert run.holds_lock and (run.path / LOCK_FILE).is_file()
    assert [r.run_id for r in store.list_runs()] == ["locked"] and run.list_arrays() == []  # never listed
    with pytest.raises(WorkbenchError, match=f"run locked is being written by process {os.getpid()} on host "
                                             f"{re.escape(HOST)} since "):
        store.resume_run("locked", "transfer")
    run.mark_failed("stopped")
    assert not run.holds_lock
    again = store.resume_run("locked", "transfer")
    assert again.holds_lock
    again.mark_running()
    again.mark_finished()
    assert not again.holds_lock
    # a lock file that is a symlink is never followed (it would truncate whatever it points at)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run.path / LOCK_FILE).unlink()
    (run.path / LOCK_FILE).symlink_to(victim)
    with pytest.raises(WorkbenchError, match=r"cannot open its writer lock \.writer\.lock \(it is a symlink\)"):
        store.resume_run("locked", "transfer")
    assert victim.read_text() == "keep me"


def test_a_second_process_cannot_resume_a_run_another_process_writes(tmp_path, capsys):
    root = tmp_path / "artifacts"
    store = RunStore(root)
    cfg = transfer_config(root)
    stopped = transfer(cfg, store, progress=False, dataset=synthetic(), stop_at=2)
    holder = child(HOLD, str(root), stopped.run_id, "transfer", stdin=True)
    try:
        line = holder.stdout.readline()
        assert line.strip() == "holding", holder.stderr.read() if holder.poll() is not None else line
        held = rf"run {stopped.run_id} is being written by process {holder.pid} on host {re.escape(HOST)}"
        with pytest.raises(WorkbenchError, match=held):
            transfer(cfg, store, progress=False, dataset=synthetic(), resume=stopped.run_id)
        assert main(["transfer", "--artifacts", str(root), "--resume", stopped.run_id]) == 2
        err = capsys.readouterr().err
        assert re.match(f"error: {held}", err) and err.count("\n") == 1
        assert store.run_record(stopped.run_id).stored_status == "failed"  # the refused resume changed nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    resumed = transfer(cfg, store, progress=False, dataset=synthetic(), resume=stopped.run_id)
    assert resumed.run.status == "finished"
    reference = transfer(cfg, store, progress=False, dataset=synthetic())
    assert rows_of(resumed.run) == rows_of(reference.run)
    record = store.run_record(stopped.run_id)
    assert (record.status, record.reason, record.notice) == ("finished", "", "")  # what transfer writes fits


RACE = """
import time
from pathlib import Path
from workbench.artifacts import RunStore
from workbench.errors import WorkbenchError
from workbench.transfer import transfer
from test_store_hardening import synthetic, transfer_config  # synthetic: helpers.band_dataset
root, run_id, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
data = synthetic()
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
try:
    transfer(transfer_config(root, steps=40), RunStore(root), progress=False, dataset=data, resume=run_id)
except WorkbenchError as exc:
    print(f"refused: {exc}", flush=True)
    sys.exit(3)
print("finished", flush=True)
"""


def test_two_processes_resuming_one_run_at_once_one_refuses(tmp_path):
    root = tmp_path / "artifacts"
    store = RunStore(root)
    cfg = transfer_config(root, steps=40)
    stopped = transfer(cfg, store, progress=False, dataset=synthetic(), stop_at=2)
    go = tmp_path / "go"
    racers = [child(RACE, str(root), stopped.run_id, str(go)) for _ in range(2)]
    try:
        for racer in racers:
            line = racer.stdout.readline()
            assert line.strip() == "ready", racer.stderr.read() if racer.poll() is not None else line
        go.touch()
        outputs = [racer.communicate(timeout=300) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    codes = sorted(racer.returncode for racer in racers)
    assert codes == [0, 3], outputs
    refused = next(out for (out, _), racer in zip(outputs, racers) if racer.returncode == 3)
    # the loser either met the winner's lock or, if it came late, a finished run
    assert re.search(rf"is being written by process \d+ on host {re.escape(HOST)}|is finished", refused), refused
    reference = transfer(cfg, store, progress=False, dataset=synthetic())
    run = store.open_run(stopped.run_id)
    assert run.status == "finished"
    assert rows_of(run) == rows_of(reference.run)  # one writer: no duplicated rows


def test_resuming_a_finished_transfer_run_says_it_is_finished(tmp_path, capsys):
    root = tmp_path / "artifacts"
    store = RunStore(root)
    done = transfer(transfer_config(root), store, progress=False, dataset=synthetic())
    before = rows_of(done.run)
    with pytest.raises(WorkbenchError, match=rf"run {done.run_id} is finished \(test accuracy \d\.\d{{4}}\); there "
                                             "is nothing to resume"):
        transfer(transfer_config(root), store, progress=False, dataset=synthetic(), resume=done.run_id)
    assert main(["transfer", "--artifacts", str(root), "--resume", done.run_id]) == 2
    assert "is finished" in capsys.readouterr().err
    assert rows_of(store.open_run(done.run_id)) == before and before.count(("final", 6)) == 1
    assert not store.open_run(done.run_id).holds_lock


KILL_IN_FINAL_PHASE = """
import os
import signal
import workbench.transfer as stage
from workbench.artifacts import RunStore
from test_store_hardening import synthetic, transfer_config

def killed(setup):  # the final evaluation on the test split is logged, the one on training images never ends
    os.kill(os.getpid(), signal.SIGKILL)

stage._evaluate_train = killed
stage.transfer(transfer_config(sys.argv[1]), RunStore(sys.argv[1]), progress=False, dataset=synthetic())
"""


def test_a_kill_in_the_final_phase_then_resume_leaves_one_final_row(tmp_path):
    root = tmp_path / "artifacts"
    store = RunStore(root)
    killed = child(KILL_IN_FINAL_PHASE, str(root))
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    (record,) = store.list_runs()
    assert record.stored_status == "running" and record.status == "stale"
    assert [row for row in rows_of(store.open_run(record.run_id)) if row[0] == "final"] == [("final", 6)]
    resumed = transfer(transfer_config(root), store, progress=False, dataset=synthetic(), resume=record.run_id)
    assert resumed.run.status == "finished"
    reference = transfer(transfer_config(root), store, progress=False, dataset=synthetic())
    rows = rows_of(resumed.run)
    assert rows == rows_of(reference.run) and rows.count(("final", 6)) == 1 and rows.count(("train_eval", 6)) == 1
    assert resumed.summary["test_accuracy"] == reference.summary["test_accuracy"]


def test_a_resumed_meta_train_run_times_all_its_sessions(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "artifacts")
    data = synthetic_dataset()
    original = MetaTrainer.train_step

    def interrupted(self, record=False):
        if self.step == 2:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return original(self, record)

    monkeypatch.setattr(MetaTrainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meta_train(MetaTrainConfig.from_dict(META), store=store, progress=False, dataset=data)
    monkeypatch.setattr(MetaTrainer, "train_step", original)
    (record,) = store.list_runs()
    assert record.status == "failed"
    first = store.open_run(record.run_id).load_checkpoint()["log"]
    assert first["seconds"] > 0 and first["sessions"] == 1
    result = meta_train(None, store=store, resume=record.run_id, dataset=data, progress=False)
    summary = result.summary
    assert summary["sessions"] == 2
    assert summary["seconds"] == pytest.approx(first["seconds"] + summary["seconds_last_session"])
    assert summary["seconds_per_step"] == pytest.approx(summary["seconds"] / META["steps"])
    assert store.open_run(record.run_id).summary["seconds"] == pytest.approx(summary["seconds"])
    record = store.run_record(record.run_id)
    assert (record.status, record.reason, record.notice) == ("finished", "", "")  # what meta-training writes fits


def test_meta_train_refuses_to_resume_a_run_another_process_writes(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    data = synthetic_dataset()
    done = meta_train(MetaTrainConfig.from_dict({**META, "steps": 2}), store=store, progress=False, dataset=data)
    holder = child(HOLD, str(store.root), done.run_id, "meta_train", stdin=True)
    try:
        line = holder.stdout.readline()
        assert line.strip() == "holding", holder.stderr.read() if holder.poll() is not None else line
        with pytest.raises(WorkbenchError, match=rf"run {done.run_id} is being written by process {holder.pid} on host"):
            meta_train(None, store=store, resume=done.run_id, dataset=data, progress=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with pytest.raises(WorkbenchError, match="already finished"):  # once the holder is gone: the usual answer
        meta_train(None, store=store, resume=done.run_id, dataset=data, progress=False)


# ---------------------------------------------------------------------------- 6: a run of the other kind
def test_resuming_a_run_of_the_other_kind_names_its_command(tmp_path, capsys):
    root = tmp_path / "artifacts"
    store = RunStore(root)
    for run_id, kind, config in (("a-transfer-run", "transfer", TransferConfig(target="synthetic").to_dict()),
                                 ("a-meta-run", "meta_train", MetaTrainConfig().to_dict())):
        store.create_run(kind, config, run_id=run_id).mark_failed("stopped at step 2")
    cases = [
        (["meta-train", "--resume", "a-transfer-run"],
         "a-transfer-run is a transfer run, not a meta-train run; resume it with "
         "`workbench transfer --resume a-transfer-run`"),
        (["transfer", "--resume", "a-meta-run"],
         "a-meta-run is a meta-train run, not a transfer run; resume it with `workbench meta-train --resume a-meta-run`"),
        (["source-train", "--resume", "a-transfer-run"],
         "a-transfer-run is a transfer run, not a source-training run; resume it with "
         "`workbench transfer --resume a-transfer-run`"),
    ]
    for args, message in cases:
        assert main([*args, "--artifacts", str(root)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(WorkbenchError, match=re.escape(cases[0][1])):
        meta_train(None, store=store, resume="a-transfer-run", progress=False)
    with pytest.raises(WorkbenchError, match=re.escape(cases[1][1])):
        transfer(None, store, progress=False, resume="a-meta-run")
    with pytest.raises(WorkbenchError, match=re.escape(cases[1][1])):  # with a config given, before any work
        transfer(transfer_config(root), store, progress=False, dataset=synthetic(), resume="a-meta-run")
    assert {r.stored_status for r in store.list_runs()} == {"failed"}
