"""The run store: atomic writes, run and study lifecycle, defensive listing, path safety."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import artifacts
from workbench.artifacts import (
    SCHEMA_VERSION,
    RunStore,
    atomic_savez,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    default_root,
    environment_info,
)
from workbench.errors import WorkbenchError

TAGS = {"source": None, "target": "cifar10", "arch": "resnet20", "method": "metaperturb", "seed": 0}


@pytest.fixture
def store(tmp_path, monkeypatch):
    # environment_info shells out to git; one real call is tested separately, the rest use a fixed dict.
    monkeypatch.setattr(artifacts, "environment_info", lambda: {"python": "3", "git_revision": "abc", "git_dirty": False})
    return RunStore(tmp_path / "artifacts")


class _Custom:
    """A class that plain pickling stores and weights_only loading refuses."""


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------- atomic writes
def test_atomic_json_sorted_and_nonfinite(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"b": np.float32(1.5), "a": [np.int64(2), float("nan"), float("inf")], "p": Path("x")})
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert json.loads(text) == {"a": [2, None, None], "b": 1.5, "p": "x"}
    with pytest.raises(WorkbenchError, match=r"a.json\['x'\]\[1\] is nan"):
        atomic_write_json(path, {"x": [1.0, float("nan")]}, nonfinite="error")
    with pytest.raises(WorkbenchError, match="type object"):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text())["b"] == 1.5  # failed writes left the file alone
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~artifacts._read_umask())  # not mkstemp's 0600


def test_atomic_write_keeps_old_file_when_serialisation_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"PK\x03\x04 half of a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    atomic_savez(tmp_path / "a.npz", x=np.arange(3))

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(path, {"v": 2})
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(path, "garbage")
    with pytest.raises(OSError, match="simulated"):
        atomic_savez(tmp_path / "a.npz", x=np.arange(5))
    assert json.loads(path.read_text()) == {"v": 1}
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_atomic_savez_any_names_no_pickle(tmp_path):
    path = atomic_savez(tmp_path / "a.npz", path=np.zeros(2), file=torch.arange(4), allow_pickle=np.array(["x", "y"]))
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["allow_pickle", "file", "path"]
        assert archive["file"].tolist() == [0, 1, 2, 3]
        assert archive["allow_pickle"].tolist() == ["x", "y"]
    with pytest.raises(WorkbenchError, match="dtype object"):
        atomic_savez(tmp_path / "b.npz", bad=np.array([{}, 1], dtype=object))
    assert not (tmp_path / "b.npz").exists()


# -------------------------------------------------------------------------------------------- root, environment
def test_default_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ENV_VAR, str(tmp_path / "env"))
    assert default_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert default_root() == (tmp_path / "env").resolve()
    monkeypatch.delenv(artifacts.ENV_VAR)
    checkout = artifacts._checkout_root()
    expected = (checkout / "artifacts") if checkout else (Path.cwd() / "artifacts")
    assert default_root() == expected.resolve()


def test_environment_info_fields():
    info = environment_info()
    for key in ("python", "torch", "torchvision", "numpy", "workbench", "platform", "cpu", "gpus", "git_revision",
                "git_dirty", "time"):
        assert key in info
    assert info["torch"] == torch.__version__ and info["numpy"] == np.__version__
    json.dumps(info, allow_nan=False)


# ----------------------------------------------------------------------------------------------- run lifecycle
def test_run_lifecycle(store):
    run = store.create_run("transfer", {"lr": 0.1, "steps": 3, "out": Path("a")}, tags=TAGS)
    assert re.fullmatch(r"\d{8}-\d{6}-transfer-cifar10-resnet20-metaperturb-s0-[0-9a-f]{4}", run.run_id)
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["status"] == "running" and meta["pid"] == os.getpid()
    assert meta["tags"] == TAGS and meta["environment"]["git_revision"] == "abc"
    assert json.loads((run.path / "config.json").read_text()) == {"lr": 0.1, "steps": 3, "out": "a"}
    assert store.run_record(run.run_id).status == "running"

    run.log_metrics(0, "train", loss=np.float32(2.5), acc=torch.tensor(0.25))
    run.log_metrics(1, "train", loss=float("nan"), acc=1)
    run.log_metrics(1, "test", acc=0.5)
    rows = run.read_metrics()
    assert [(r["step"], r["stage"]) for r in rows] == [(0, "train"), (1, "train"), (1, "test")]
    assert rows[0]["loss"] == 2.5 and rows[0]["acc"] == 0.25 and rows[1]["loss"] is None
    assert [r["acc"] for r in run.read_metrics("test")] == [0.5]
    assert list(run.metrics_table("train")["loss"].isna()) == [False, True]

    run.save_json("split", {"train_classes": [1, 2], "val": (3,)})
    assert run.load_json("split") == {"train_classes": [1, 2], "val": [3]}
    run.mark_finished({"acc": 0.5, "nll": float("inf"), "per_target": {"cifar10": 0.5}})
    assert run.summary == {"acc": 0.5, "nll": None, "per_target": {"cifar10": 0.5}}

    again = store.open_run(run.run_id)
    assert again.status == "finished" and again.config["lr"] == 0.1 and again.tags == TAGS and again.kind == "transfer"
    record = store.list_runs()[0]
    assert (record.status, record.reason, record.summary["acc"]) == ("finished", "", 0.5)


def test_context_manager_marks_failed_or_finished(store):
    with pytest.raises(ValueError, match="boom"):
        with store.create_run("meta_train", {}) as run:
            raise ValueError("boom\nsecond line of a long message")
    assert run.status == "failed" and run.reason == "ValueError: boom"
    assert store.run_record(run.run_id).reason == "ValueError: boom"

    with store.create_run("meta_train", {}) as ok:
        ok.log_metrics(0, "train", loss=1.0)
    assert ok.status == "finished"

    with store.create_run("meta_train", {}) as early:
        early.mark_failed("diverged:   loss is nan")
    assert early.status == "failed" and early.reason == "diverged: loss is nan"  # not overwritten with finished

    with pytest.raises(KeyboardInterrupt):
        with store.create_run("meta_train", {}) as interrupted:
            raise KeyboardInterrupt
    assert interrupted.reason == "KeyboardInterrupt"


def test_bad_input_is_refused(store):
    with pytest.raises(WorkbenchError, match="run kind"):
        store.create_run("Transfer Run", {})
    with pytest.raises(WorkbenchError, match="config.*nan"):
        store.create_run("transfer", {"lr": float("nan")})
    with pytest.raises(WorkbenchError, match="tag 'arch'"):
        store.create_run("transfer", {}, tags={"arch": ["a"]})
    with pytest.raises(WorkbenchError, match="no study"):
        store.create_run("transfer", {}, study_id="nope")
    with pytest.raises(WorkbenchError, match="config must be a dict"):
        store.create_run("transfer", [1, 2])
    assert not store.runs_dir.exists() or list(store.runs_dir.iterdir()) == []  # nothing half-created
    run = store.create_run("transfer", {})
    with pytest.raises(WorkbenchError, match="must be a number"):
        run.log_metrics(0, "train", acc="high")
    with pytest.raises(WorkbenchError, match="reserved"):
        run.log_metrics(0, "train", wall_time=3)
    with pytest.raises(WorkbenchError, match="step must be an integer"):
        run.log_metrics(True, "train", acc=1.0)
    with pytest.raises(WorkbenchError, match="not valid"):
        run.save_arrays("../escape", x=np.zeros(1))
    with pytest.raises(WorkbenchError, match="no record 'missing'"):
        run.load_json("missing")
    with pytest.raises(WorkbenchError, match="no run 'absent'"):
        store.open_run("absent")


def test_failed_creation_leaves_no_folder(store, monkeypatch):
    real_replace = os.replace

    def replace_fails_for_run_json(src, dst):
        if Path(dst).name == "run.json":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_for_run_json)
    with pytest.raises(OSError, match="disk full"):
        store.create_run("transfer", {"a": 1}, run_id="half")
    assert not (store.runs_dir / "half").exists()


def test_duplicate_run_id_refused(store):
    first = store.create_run("transfer", {"a": 1}, run_id="fixed-id")
    first.mark_finished({"acc": 0.9})
    with pytest.raises(WorkbenchError, match="already exists"):
        store.create_run("transfer", {"a": 2}, run_id="fixed-id")
    assert json.loads((first.path / "config.json").read_text()) == {"a": 1}
    assert store.open_run("fixed-id").summary == {"acc": 0.9}
    for bad in ("../x", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(WorkbenchError, match="run id"):
            store.create_run("transfer", {}, run_id=bad)


# --------------------------------------------------------------------------------------------- metrics tearing
def test_torn_metrics_line_is_skipped(store):
    run = store.create_run("transfer", {})
    run.log_metrics(0, "train", loss=1.0)
    run.log_metrics(1, "train", loss=0.5)
    with open(run.path / "metrics.jsonl", "a") as handle:
        handle.write('{"step":2,"stage":"tr')  # the process was killed mid-write
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn *last* line is expected, not worth a warning
        assert [r["step"] for r in store.open_run(run.run_id).read_metrics()] == [0, 1]

    resumed = store.open_run(run.run_id)
    resumed.log_metrics(2, "train", loss=0.25)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable line"):
        rows = resumed.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["loss"] == 0.25


# --------------------------------------------------------------------------------------- arrays, checkpoints
def test_arrays_round_trip(store):
    run = store.create_run("transfer", {})
    probs = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    run.save_arrays("outputs", probs=probs, labels=torch.arange(5), name=np.array(["a"]))
    loaded = run.load_arrays("outputs")
    assert loaded["probs"].dtype == np.float32 and np.array_equal(loaded["probs"], probs)
    assert loaded["labels"].tolist() == [0, 1, 2, 3, 4]
    assert run.list_arrays() == ["outputs"] and run.has_arrays("outputs")
    with pytest.raises(WorkbenchError, match="has no arrays 'scales'; it has: outputs"):
        run.load_arrays("scales")


def test_checkpoint_round_trip_weights_only(store, tmp_path):
    run = store.create_run("meta_train", {})
    state = {
        "phi": OrderedDict(w=torch.randn(2, 3), b=torch.nn.Parameter(torch.zeros(2))),
        "step": 7,
        "lr": 0.01,
        "rng": {"torch": torch.get_rng_state(), "python": list(map(int, [1, 2]))},
        "shape": torch.Size([2, 3]),
        "dtype": torch.float16,
        "names": ("a", "b"),
        "schema_version": SCHEMA_VERSION,
    }
    assert not run.has_checkpoint()
    run.save_checkpoint(state)
    assert run.has_checkpoint() and run.list_checkpoints() == ["last"]
    loaded = store.open_run(run.run_id).load_checkpoint()
    assert torch.equal(loaded["phi"]["w"], state["phi"]["w"]) and loaded["step"] == 7
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"]) and loaded["shape"] == torch.Size([2, 3])
    assert loaded["dtype"] is torch.float16 and loaded["names"] == ("a", "b")

    with pytest.raises(WorkbenchError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray.*torch.as_tensor"):
        run.save_checkpoint({"rng": {"numpy": np.zeros(3)}}, name="bad")
    assert not run.has_checkpoint("bad")

    torch.save({"obj": _Custom()}, run.path / "checkpoints" / "foreign.pt")  # written around the store
    with pytest.raises(WorkbenchError, match="weights_only=True"):
        run.load_checkpoint("foreign")
    with pytest.raises(WorkbenchError, match="no checkpoint 'best'; it has: foreign, last"):
        run.load_checkpoint("best")


# ---------------------------------------------------------------------------------------- corrupt listings
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_corrupt_foreign_and_newer_folders_are_listed_with_reasons(store, tmp_path):
    good = store.create_run("transfer", {}, tags=TAGS)
    good.mark_finished({"acc": 0.7})
    runs = store.runs_dir
    (runs / "empty-foreign").mkdir()
    _write(runs / "interrupted" / "config.json", "{}")
    _write(runs / "badjson" / "run.json", '{"schema_version": 1, "run_id": ')
    _write(runs / "emptyjson" / "run.json", "")
    _write(runs / "alist" / "run.json", "[1, 2]")
    newer = json.loads((good.path / "run.json").read_text()) | {"schema_version": SCHEMA_VERSION + 1, "run_id": "newer"}
    _write(runs / "newer" / "run.json", json.dumps(newer))
    _write(runs / "noschema" / "run.json", json.dumps({"run_id": "noschema"}))
    renamed = json.loads((good.path / "run.json").read_text())
    _write(runs / "renamed" / "run.json", json.dumps(renamed))
    brokensummary = renamed | {"run_id": "brokensummary"}
    _write(runs / "brokensummary" / "run.json", json.dumps(brokensummary))
    _write(runs / "brokensummary" / "summary.json", '{"acc": 0.')
    _write(runs / "stray.txt", "notes")
    outside = tmp_path / "outside"
    _write(outside / "run.json", json.dumps(renamed | {"run_id": "escape"}))
    (runs / "escape").symlink_to(outside, target_is_directory=True)
    (runs / ".hidden-temp").mkdir()  # dot entries are private plumbing, not listed

    records = {r.run_id: r for r in store.list_runs()}
    expected = {
        "empty-foreign": "not a run folder: no run.json",
        "interrupted": "creation was interrupted",
        "badjson": "not valid JSON",
        "emptyjson": "empty",
        "alist": "not an object",
        "newer": "newer than this workbench",
        "noschema": "no schema_version",
        "renamed": "folder is 'renamed'",
        "brokensummary": "summary.json is not valid JSON",
        "stray.txt": "a file, not a run folder",
        "escape": "outside the artifacts root",
    }
    assert set(records) == set(expected) | {good.run_id}
    for run_id, fragment in expected.items():
        assert records[run_id].status == "corrupt" and fragment in records[run_id].reason, (run_id, records[run_id])
        assert "\n" not in records[run_id].reason
    assert records[good.run_id].status == "finished" and records[good.run_id].summary == {"acc": 0.7}
    # Filters see the tags of a run.json that is readable under this schema, never those of a newer one.
    assert {r.run_id for r in store.list_runs(target="cifar10")} == {good.run_id, "brokensummary", "renamed"}

    table = store.runs_table()
    assert len(table) == len(expected) + 1
    assert table.set_index("run_id").loc["newer", "status"] == "corrupt"
    assert table.set_index("run_id").loc[good.run_id, "summary.acc"] == 0.7
    for run_id, fragment in (("newer", "newer"), ("badjson", "not valid JSON"), ("escape", "outside")):
        with pytest.raises(WorkbenchError, match=fragment):
            store.open_run(run_id)


def test_stale_running_runs(store):
    alive = store.create_run("transfer", {})
    assert store.run_record(alive.run_id).status == "running"
    if Path("/proc/self/stat").exists():  # the recorded process start time proves this very process is alive
        assert store.run_record(alive.run_id).reason.startswith("process alive")

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is gone
    dead = store.create_run("transfer", {})
    meta = json.loads((dead.path / "run.json").read_text()) | {"pid": child.pid}
    atomic_write_json(dead.path / "run.json", meta)
    record = store.run_record(dead.run_id)
    assert record.status == "stale" and f"process {child.pid}" in record.reason and record.stored_status == "running"

    remote = store.create_run("transfer", {})
    meta = json.loads((remote.path / "run.json").read_text()) | {"host": "elsewhere", "heartbeat": "2020-01-01T00:00:00+00:00"}
    atomic_write_json(remote.path / "run.json", meta)
    assert store.run_record(remote.run_id).status == "stale"
    assert "no heartbeat for" in store.run_record(remote.run_id).reason
    remote.heartbeat(force=True)
    assert store.run_record(remote.run_id).status == "running"
    remote.mark_finished()
    assert not remote.heartbeat(force=True)  # finished runs get no heartbeats
    assert {r.status for r in store.list_runs()} == {"running", "stale", "finished"}


# ---------------------------------------------------------------------------------------------------- studies
def test_study_lifecycle(store):
    study = store.create_study("notebooks/02_transfer_study.ipynb", "smoke", {"seeds": [0, 1], "steps": 2})
    assert study.executed_notebook_path == study.path / "02_transfer_study.ipynb"
    meta = json.loads((study.path / "study.json").read_text())
    assert meta["status"] == "running" and meta["git_revision"] == "abc" and meta["parameters"]["seeds"] == [0, 1]
    run = store.create_run("transfer", {}, tags=TAGS, study_id=study.study_id)
    store.open_study(study.study_id).add_run(run.run_id)  # idempotent, from a second handle
    assert study.run_ids == [run.run_id] and store.run_record(run.run_id).study_id == study.study_id
    assert [r.run_id for r in store.list_runs(study_id=study.study_id)] == [run.run_id]
    with pytest.raises(WorkbenchError, match="no such run"):
        study.add_run("missing-run")
    # A runner blocked in papermill on another host is alive while one of its runs is.
    silent = json.loads((study.path / "study.json").read_text())
    atomic_write_json(study.path / "study.json", silent | {"host": "elsewhere", "heartbeat": "2020-01-01T00:00:00+00:00"})
    assert store.study_record(study.study_id).status == "running"
    run.mark_finished()
    assert store.study_record(study.study_id).status == "stale"
    study.executed_notebook_path.write_text("{}")
    study.mark_finished()

    failed = store.create_study("notebooks/01_meta_train.ipynb", "smoke", {})
    failed.mark_failed("cell 3 raised ValueError: bad")
    _write(store.studies_dir / "foreign" / "notes.md", "hi")
    _write(store.studies_dir / "newer" / "study.json", json.dumps(meta | {"study_id": "newer", "schema_version": 99}))
    records = {r.study_id: r for r in store.list_studies()}
    assert records[study.study_id].status == "finished" and records[study.study_id].run_ids == (run.run_id,)
    assert records[study.study_id].executed_notebook_exists
    assert records[failed.study_id].status == "failed" and "ValueError" in records[failed.study_id].reason
    assert records["foreign"].status == "corrupt" and "no study.json" in records["foreign"].reason
    assert records["newer"].status == "corrupt" and "newer" in records["newer"].reason
    table = store.studies_table().set_index("study_id")
    assert table.loc[study.study_id, "runs"] == 1 and table.loc[study.study_id, "parameters.steps"] == 2
    with pytest.raises(WorkbenchError, match="corrupt"):
        store.open_study("newer")


# ----------------------------------------------------------------------------------------------- path safety
def test_resolve_refuses_escapes(store, tmp_path):
    run = store.create_run("transfer", {})
    inside = store.resolve(f"runs/{run.run_id}/run.json")
    assert inside == (run.path / "run.json").resolve() and inside.is_file()
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    (store.root / "link-out").symlink_to(secret)
    (store.root / "link-in").symlink_to(run.path, target_is_directory=True)
    assert store.resolve("link-in/config.json") == (run.path / "config.json").resolve()
    for bad, fragment in (
        ("../secret.txt", r"'\.\.'"),
        ("runs/../../secret.txt", r"'\.\.'"),
        (str(secret), "absolute"),
        ("/etc/passwd", "absolute"),
        ("link-out", "symlink"),
        ("a\x00b", "not a valid path"),
    ):
        with pytest.raises(WorkbenchError, match=fragment):
            store.resolve(bad)


# ------------------------------------------------------------------------------------------------ many runs
def test_runs_table_over_many_runs_reads_only_small_files(store, monkeypatch):
    targets = ["cifar10", "omniglot", "mnist", "imagenette"]
    for i in range(200):
        tags = {"target": targets[i % 4], "arch": "resnet20", "method": "metaperturb" if i % 2 else "base", "seed": i % 5}
        run = store.create_run("transfer", {"i": i}, tags=tags)
        if i % 10 == 0:
            run.save_arrays("predictions", confidence=np.zeros(2), probs=np.zeros((2, 2)))
        if i % 3:
            run.mark_finished({"acc": i / 200, "ece": {"bins": 15, "value": 0.01}})
    (store.runs_dir / "junk").mkdir()

    def forbidden(*args, **kwargs):
        raise AssertionError("listing must not read arrays or checkpoints")

    monkeypatch.setattr(np, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    table = store.runs_table()
    assert len(table) == 201 and table["run_id"].is_unique
    assert (table["status"] == "corrupt").sum() == 1
    assert (table["status"] == "finished").sum() == sum(1 for i in range(200) if i % 3)
    assert {"tags.target", "tags.seed", "summary.acc", "summary.ece.value"} <= set(table.columns)
    assert str(table["created"].dtype).startswith("datetime64")
    finished = table[table["status"] == "finished"]
    assert math.isclose(finished["summary.acc"].max(), 199 / 200)
    assert len(store.list_runs(target="cifar10")) == 50
    assert len(store.list_runs("transfer", target=["cifar10", "mnist"], seed="0")) == 20
    assert len(store.runs_table(method="base", include_config=True)) == 100
    assert store.runs_table(kind="meta_train").empty


def test_empty_root_lists_nothing(tmp_path):
    store = RunStore(tmp_path / "does-not-exist")
    assert store.list_runs() == [] and store.list_studies() == []
    assert store.runs_table().empty and "run_id" in store.runs_table().columns
    assert not store.root.exists()  # reading never creates the root
