"""A run's or a study's folder, opened to write it or read it: :class:`Run` and :class:`Study`.

Both keep their identity and status in a metadata file (``run.json`` / ``study.json``) that every update re-reads
and rewrites under the folder lock, so several processes (a study runner and the notebook kernel it executes) can
update it. :class:`_MetadataFolder` holds what they share: reading and updating that file, the heartbeat, setting
the record running again, finished or failed. :class:`Run` adds the one-writer lock, metrics, summary, records,
arrays and checkpoints; :class:`Study` its list of runs and the checks before it is reopened.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..errors import WorkbenchError
from .formatting import _exception_line, _iso, _now, _one_line
from .io import _dumps, _read_json_object, atomic_savez, atomic_torch_save, atomic_write_json, atomic_write_text
from .layout import _inside
from .locks import _acquire_writer_lock, _folder_lock, _owner_fields
from .records import RunRecord, StudyRecord
from .validation import _array_file_problem, _check_id, _check_name, _metric_rows, _summary_problem

if TYPE_CHECKING:  # only for annotations: the store imports this module
    from .store import RunStore

HEARTBEAT_INTERVAL = 30.0  # Run.heartbeat() writes at most this often unless forced
METRIC_RESERVED = ("step", "stage", "wall_time")


def _metric_value(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "numel"):  # torch tensor
        if value.numel() != 1:
            raise WorkbenchError(f"metric {name!r} is a tensor with {value.numel()} elements; log a single number")
        value = value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WorkbenchError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------- the shared base
class _MetadataFolder:
    """A folder whose identity and status live in one metadata file (``meta_file``): what :class:`Run` and
    :class:`Study` share.

    Every change re-reads the file under the folder lock and writes it back atomically, so concurrent updates from
    other processes are kept. Subclasses name their file, the noun of their messages, and an example reason for
    :meth:`mark_failed`.
    """

    meta_file = ""  # "run.json" / "study.json"
    noun = ""  # "run" / "study", as messages name the folder
    failure_example = ""  # what mark_failed's message suggests as a reason
    heartbeat_interval = 0.0  # heartbeat() writes at most this often (seconds) unless forced

    def __init__(self, store: "RunStore", path: Path, meta: dict):
        self.store = store
        self.path = path
        self._meta = meta
        self._last_heartbeat = time.monotonic()

    @property
    def status(self) -> str:
        """The stored status, read from disk now: running, finished or failed."""
        return self._read_meta()["status"]

    # metadata --------------------------------------------------------------------------------------------
    def _meta_path(self) -> Path:
        """The metadata file, as it is read."""
        return self.path / self.meta_file

    def _read_meta(self) -> dict:
        meta, reason = _read_json_object(self._meta_path(), self.meta_file)
        if meta is None:
            raise WorkbenchError(f"{self.noun} {self.path.name} is corrupt: {reason}")
        return meta

    def _update(self, change: Callable[[dict], None]) -> dict:
        """Re-read the metadata file under the folder lock, apply ``change`` to it and write it back atomically."""
        with _folder_lock(self.path):
            meta = self._read_meta()
            change(meta)
            atomic_write_json(self.path / self.meta_file, meta, nonfinite="error")
        self._meta = meta
        return meta

    def _update_meta(self, **changes: Any) -> dict:
        return self._update(lambda meta: meta.update(changes))

    # status ----------------------------------------------------------------------------------------------
    def heartbeat(self, force: bool = False) -> bool:
        """Record that the process is alive. Writes at most once every ``heartbeat_interval`` seconds unless
        ``force``: 30 s for a run, whose :meth:`Run.log_metrics` calls it, so a loop that logs needs nothing else;
        every call for a study. Only a running record gets heartbeats. Returns whether it wrote."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_interval:
            return False
        self._last_heartbeat = now
        with _folder_lock(self.path):
            meta = self._read_meta()
            if meta.get("status") != "running":
                return False
            meta["heartbeat"] = _iso(_now())
            atomic_write_json(self.path / self.meta_file, meta, nonfinite="error")
        self._meta = meta
        return True

    def _set_running(self) -> None:
        """Set the record back to running, owned by this process (pid, host, process start time)."""
        now = _iso(_now())
        self._update_meta(status="running", reason=None, finished=None, heartbeat=now, **_owner_fields())
        self._last_heartbeat = time.monotonic()

    def mark_finished(self) -> None:
        """Set the status to finished."""
        now = _iso(_now())
        self._update_meta(status="finished", reason=None, finished=now, heartbeat=now)

    def mark_failed(self, reason: str) -> None:
        """Set the status to failed with a one-line ``reason`` (whitespace collapsed, at most 500 characters)."""
        line = _one_line(reason) if reason is not None else ""
        if not line:
            raise WorkbenchError(f"mark_failed needs a reason, e.g. {self.failure_example}")
        now = _iso(_now())
        self._update_meta(status="failed", reason=line, finished=now, heartbeat=now)


# ---------------------------------------------------------------------------------------------------- Run
class Run(_MetadataFolder):
    """One run folder, opened for writing (by the process doing the work) or reading.

    Create with :meth:`RunStore.create_run` (usable as ``with store.create_run(...) as run:``) or open with
    :meth:`RunStore.open_run`.
    """

    meta_file = "run.json"
    noun = "run"
    failure_example = "the exception's message"
    heartbeat_interval = HEARTBEAT_INTERVAL

    def __init__(self, store: "RunStore", path: Path, meta: dict, config: dict):
        super().__init__(store, path, meta)
        self.config: dict[str, Any] = config
        self._metrics_tail_checked = False
        self._lock_fd: int | None = None

    # identity ------------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._meta["run_id"]

    @property
    def kind(self) -> str:
        return self._meta["kind"]

    @property
    def tags(self) -> dict[str, Any]:
        return dict(self._meta.get("tags") or {})

    @property
    def study_id(self) -> str | None:
        return self._meta.get("study_id")

    @property
    def created(self) -> str:
        return self._meta["created"]

    @property
    def environment(self) -> dict[str, Any]:
        return dict(self._meta.get("environment") or {})

    @property
    def reason(self) -> str | None:
        return self._read_meta().get("reason")

    def record(self) -> RunRecord:
        """A fresh :class:`RunRecord` (with the derived running/stale status)."""
        return self.store.run_record(self.run_id)

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, kind={self.kind!r}, path='{self.path}')"

    # one writer --------------------------------------------------------------------------------------------
    @property
    def holds_lock(self) -> bool:
        """Whether this handle holds the run's writer lock (:meth:`acquire_lock`)."""
        return self._lock_fd is not None

    def acquire_lock(self) -> None:
        """Become the run's one writer: take the exclusive lock on ``.writer.lock`` (WorkbenchError naming the pid
        and host of the process that holds it). :meth:`RunStore.create_run` and :meth:`RunStore.resume_run` take
        it; :meth:`mark_finished`, :meth:`mark_failed`, :meth:`release_lock` and the death of the process drop it."""
        if self._lock_fd is None:
            self._lock_fd = _acquire_writer_lock(self.path, self.run_id)

    def release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder's name left behind for the next writer's rivals to read
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release_lock()

    # path safety -----------------------------------------------------------------------------------------
    def _checked(self, relative: str) -> Path:
        """``self.path / relative`` after checking that it resolves inside the artifacts root."""
        path = self.path / relative
        if not _inside(os.path.realpath(self.store.root), path):
            raise WorkbenchError(
                f"run {self.path.name} is corrupt: {relative} leads outside the artifacts root (a symlink); not read"
            )
        return path

    def _meta_path(self) -> Path:
        return self._checked(self.meta_file)

    # status ----------------------------------------------------------------------------------------------
    def mark_running(self) -> None:
        """Set the run back to running in this process (resuming a failed or stale run from its checkpoint); takes
        the writer lock first (refused while another process holds it)."""
        self.acquire_lock()
        self._set_running()

    def mark_finished(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write ``summary`` (if given), set the status to finished and release the writer lock."""
        if summary is not None:
            self.write_summary(summary)
        super().mark_finished()
        self.release_lock()

    def mark_failed(self, reason: str) -> None:
        """Set the status to failed with a one-line ``reason`` (whitespace collapsed, at most 500 characters) and
        release the writer lock."""
        super().mark_failed(reason)
        self.release_lock()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            status = self.status
        except WorkbenchError:
            self.release_lock()
            return False
        if status == "running":
            if exc is None:
                self.mark_finished()
            else:
                self.mark_failed(_exception_line(exc))
        self.release_lock()
        return False  # never swallow the exception

    # metrics ---------------------------------------------------------------------------------------------
    def log_metrics(self, step: int, stage: str, **values: Any) -> None:
        """Append ``{"step", "stage", "wall_time", **values}`` as one line of ``metrics.jsonl``.

        ``values`` are numbers (Python, numpy, or one-element tensors); NaN and +-inf are written as null so a
        diverged loss is still logged. Anything else (strings, lists, multi-element tensors) is refused.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise WorkbenchError(f"metrics step must be an integer, got {type(step).__name__} {step!r}")
        if not isinstance(stage, str) or not stage:
            raise WorkbenchError(f"metrics stage must be a non-empty string such as 'train' or 'test', got {stage!r}")
        line: dict[str, Any] = {"step": int(step), "stage": stage, "wall_time": round(time.time(), 3)}
        for name, value in values.items():
            if name in METRIC_RESERVED:
                raise WorkbenchError(f"metric name {name!r} is reserved ({', '.join(METRIC_RESERVED)}); rename it")
            line[name] = _metric_value(name, value)
        text = json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n"
        path = self.path / "metrics.jsonl"
        if not self._metrics_tail_checked:
            self._terminate_torn_line(path)
            self._metrics_tail_checked = True
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)  # one write per line: a killed process leaves at most the last line torn
        self.heartbeat()

    @staticmethod
    def _terminate_torn_line(path: Path) -> None:
        """A process killed mid-line leaves a fragment without newline; end it so new lines stay parseable."""
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    return
                handle.seek(-1, os.SEEK_END)
                last = handle.read(1)
        except FileNotFoundError:
            return
        if last != b"\n":
            with open(path, "ab") as handle:
                handle.write(b"\n")

    def truncate_metrics(self, after_step: int, drop_stages: tuple[str, ...] = ()) -> None:
        """Drop metric lines of steps after ``after_step`` (written by a process that stopped past its last
        checkpoint), and every line of ``drop_stages`` (those of a final phase that is run again), atomically, so a
        resumed run does not log those steps twice."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        rows = [row for row in self.read_metrics()
                if int(row.get("step", 0)) <= after_step and row.get("stage") not in drop_stages]
        atomic_write_text(path, "".join(json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n" for row in rows))

    def read_metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        """All metric lines (of one ``stage`` if given), in file order.

        A torn last line (a process killed while writing) is skipped silently; an unreadable line elsewhere (a
        torn line from an earlier, resumed process) is skipped with a RuntimeWarning. A line that is JSON but not a
        metrics row (an integer ``step``, a ``stage`` name, numbers or null) makes the run corrupt: WorkbenchError.
        """
        try:
            data = self._checked("metrics.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        except IsADirectoryError:
            raise WorkbenchError(f"run {self.run_id} is corrupt: metrics.jsonl is a folder, not a file") from None
        rows, torn, problem = _metric_rows(data)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        if torn:
            warnings.warn(
                f"{self.path / 'metrics.jsonl'}: skipped {len(torn)} unreadable line(s) (first: {torn[:5]}); "
                "they are torn writes of a killed process",
                RuntimeWarning,
                stacklevel=2,
            )
        return rows if stage is None else [row for row in rows if row.get("stage") == stage]

    def metrics_table(self, stage: str | None = None):
        """:meth:`read_metrics` as a pandas DataFrame (columns step, stage, wall_time and the value names)."""
        import pandas as pd

        rows = self.read_metrics(stage)
        return pd.DataFrame(rows, columns=None if rows else list(METRIC_RESERVED))

    # summary and records ---------------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Replace ``summary.json`` with ``summary`` (small, mostly scalar final metrics; NaN/inf -> null)."""
        if not isinstance(summary, Mapping):
            raise WorkbenchError(f"summary must be a dict of metric name -> value, got {type(summary).__name__}")
        atomic_write_text(self._checked("summary.json"), _dumps(summary, nonfinite="null", where="summary"))

    @property
    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json``, or {} before one was written."""
        path = self._checked("summary.json")
        if not path.exists():
            return {}
        obj, reason = _read_json_object(path, "summary.json")
        if obj is None:
            raise WorkbenchError(f"run {self.run_id}: {reason}")
        problem = _summary_problem(obj)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        return obj

    def save_json(self, name: str, obj: Any) -> Path:
        """Store a small extra record as ``records/<name>.json`` (e.g. the task split, a selection reason)."""
        _check_name(name, "record")
        path = self._checked(f"records/{name}.json")
        return atomic_write_text(path, _dumps(obj, nonfinite="null", where=name))

    def load_json(self, name: str) -> Any:
        _check_name(name, "record")
        path = self._checked(f"records/{name}.json")
        try:
            return json.loads(path.read_bytes())
        except IsADirectoryError:
            raise WorkbenchError(f"run {self.run_id} is corrupt: records/{name}.json is a folder, not a file") from None
        except FileNotFoundError:
            raise WorkbenchError(
                f"run {self.run_id} has no record {name!r}; it has: {', '.join(self.list_json()) or 'none'}"
            ) from None
        except ValueError as exc:
            raise WorkbenchError(f"run {self.run_id}: records/{name}.json is not valid JSON ({_one_line(exc, 120)})") from None

    def list_json(self) -> list[str]:
        return self._list("records", ".json")

    # arrays and checkpoints ------------------------------------------------------------------------------
    def _list(self, folder: str, suffix: str) -> list[str]:
        directory = self._checked(folder)
        if not directory.is_dir():
            return []
        return sorted(p.name[: -len(suffix)] for p in directory.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))

    def save_arrays(self, name: str, /, **arrays: Any) -> Path:
        """Store named arrays (numpy or tensors, moved to the CPU; bfloat16 becomes float32) as
        ``arrays/<name>.npz`` atomically, replacing an earlier file of that name; returns the path."""
        _check_name(name, "array file")
        return atomic_savez(self._checked(f"arrays/{name}.npz"), **arrays)

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        """The arrays saved under ``name`` (loaded with ``allow_pickle=False``), after checking the file's members
        against the schema of the run's kind (:data:`ARRAY_SCHEMAS`); WorkbenchError if they do not fit."""
        _check_name(name, "array file")
        path = self._checked(f"arrays/{name}.npz")
        if not path.is_file():
            raise WorkbenchError(
                f"run {self.run_id} has no arrays {name!r}; it has: {', '.join(self.list_arrays()) or 'none'}"
            )
        problem = _array_file_problem(path, self.kind, name)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise WorkbenchError(f"run {self.run_id}: arrays/{name}.npz cannot be read ({_one_line(exc, 160)})") from None

    def list_arrays(self) -> list[str]:
        return self._list("arrays", ".npz")

    def has_arrays(self, name: str) -> bool:
        return self._checked(f"arrays/{_check_name(name, 'array file')}.npz").is_file()

    def save_checkpoint(self, state: Mapping[str, Any], name: str = "last") -> Path:
        """``torch.save`` ``state`` to ``checkpoints/<name>.pt`` atomically. The state may hold only what
        ``weights_only=True`` loading accepts (tensors, numbers, strings, lists, dicts ...); anything else is
        refused here, naming the entry, rather than at load time."""
        _check_name(name, "checkpoint")
        if not isinstance(state, Mapping):
            raise WorkbenchError(f"checkpoint state must be a dict, got {type(state).__name__}")
        return atomic_torch_save(state, self._checked(f"checkpoints/{name}.pt"))

    def load_checkpoint(self, name: str = "last", map_location: Any = "cpu") -> dict[str, Any]:
        """Load ``checkpoints/<name>.pt`` with ``weights_only=True`` onto ``map_location``."""
        import torch

        _check_name(name, "checkpoint")
        path = self._checked(f"checkpoints/{name}.pt")
        if not path.is_file():
            raise WorkbenchError(
                f"run {self.run_id} has no checkpoint {name!r}; it has: {', '.join(self.list_checkpoints()) or 'none'}"
            )
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # pickle errors, truncated zip, refused globals: one line, no deep traceback
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise WorkbenchError(
                f"run {self.run_id}: checkpoint {name!r} cannot be loaded with weights_only=True ({_one_line(first, 200)})"
            ) from None

    def has_checkpoint(self, name: str = "last") -> bool:
        return self._checked(f"checkpoints/{_check_name(name, 'checkpoint')}.pt").is_file()

    def list_checkpoints(self) -> list[str]:
        return self._list("checkpoints", ".pt")


# -------------------------------------------------------------------------------------------------- Study
class Study(_MetadataFolder):
    """One papermill study folder. Create with :meth:`RunStore.create_study`, open with :meth:`RunStore.open_study`.

    Every update re-reads ``study.json`` under a lock, so the study runner and the notebook kernel it executes
    can both add runs.
    """

    meta_file = "study.json"
    noun = "study"
    failure_example = "the failing cell's error"
    heartbeat_interval = 0.0  # every heartbeat() writes

    @property
    def study_id(self) -> str:
        return self._meta["study_id"]

    @property
    def notebook(self) -> str:
        return self._meta["notebook"]

    @property
    def profile(self) -> str:
        return self._meta["profile"]

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self._meta.get("parameters") or {})

    @property
    def executed_notebook_path(self) -> Path:
        """Where the executed notebook is (to be) saved: ``studies/<study_id>/<notebook file name>``."""
        return self.path / self._meta["executed_notebook"]

    @property
    def run_ids(self) -> list[str]:
        return list(self._read_meta().get("run_ids") or [])

    def record(self) -> StudyRecord:
        return self.store.study_record(self.study_id)

    def runs(self) -> list[RunRecord]:
        """Records of the study's runs, in the order they were added."""
        return [self.store.run_record(run_id) for run_id in self.run_ids]

    def __repr__(self) -> str:
        return f"Study({self.study_id!r}, notebook={self.notebook!r}, profile={self.profile!r})"

    def add_run(self, run_id: str) -> None:
        """Link an existing run to this study (idempotent)."""
        _check_id(run_id, "run id")
        if not (self.store.runs_dir / run_id / "run.json").is_file():
            raise WorkbenchError(f"cannot add run {run_id!r} to study {self.study_id}: no such run under {self.store.runs_dir}")

        def change(meta: dict) -> None:
            ids = list(meta.get("run_ids") or [])
            if run_id not in ids:
                ids.append(run_id)
            meta["run_ids"] = ids
            if meta.get("status") == "running":
                meta["heartbeat"] = _iso(_now())

        self._update(change)

    def reopen(self) -> None:
        """Set a failed, interrupted or stale study back to running in this process, to run its notebook again
        (``workbench study resume``). Refused when it finished, or while the process that runs it is alive."""
        record = self.record()
        if record.status == "finished":
            raise WorkbenchError(f"study {self.study_id} is finished; there is nothing to resume (a new study runs "
                                 f"the notebook again: `workbench study run {Path(self.notebook).stem} --profile "
                                 f"{self.profile}`)")
        if record.status == "running":
            meta = self._read_meta()
            raise WorkbenchError(f"study {self.study_id} is running in process {meta.get('pid')} on host "
                                 f"{meta.get('host')}; wait for it to end (or stop it), then resume")
        if record.status == "corrupt":
            raise WorkbenchError(f"study {self.study_id} is corrupt: {record.reason}")
        self._set_running()
