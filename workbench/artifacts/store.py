"""The artifacts root: :class:`RunStore` creates, opens, resumes, discards and lists runs and studies.

Listing scans ``runs/`` and ``studies/`` and never raises for a bad folder: every file a reader would open is
checked (``validation``) and a failing folder is listed as ``"corrupt"`` with a one-line reason; a running record
whose process is gone or silent is listed as ``"stale"`` (``locks._liveness``). Generated ids are
``<UTC yyyymmdd-hhmmss>-<kind or notebook>-<key tags or profile>-<4 hex>``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import WorkbenchError
from .folders import Run, Study
from .formatting import _iso, _now, _one_line
from .io import _read_json_object, atomic_write_json, to_jsonable
from .layout import ENV_VAR, SCHEMA_VERSION, _inside, default_root, slug
from .locks import _acquire_writer_lock, _liveness, _owner_fields, _refuse_live_writer
from .records import RunRecord, StudyRecord, _flatten
from .validation import (
    FINISHED_ARRAYS,
    _array_file_problem,
    _cached_problem,
    _check_id,
    _check_kind,
    _check_tags,
    _clean_tags,
    _config_problem,
    _folder_problem,
    _metrics_file_problem,
    _run_meta_problem,
    _schema_problem,
    _study_meta_problem,
    _summary_problem,
)

DEFAULT_STALE_AFTER = 900.0  # seconds without a heartbeat before a "running" record is reported as stale

# Tags that make up the readable part of a generated run id, in this order (seed is written as s<seed>).
ID_TAGS = ("source", "target", "arch", "architecture", "model", "method", "seed")

# How each kind is resumed, for the message that sends a run to its own command.
RESUME_COMMANDS = {
    "transfer": ("a transfer run", "workbench transfer --resume"),
    "source": ("a source-training run", "workbench source-train --resume"),
    "meta_train": ("a meta-train run", "workbench meta-train --resume"),
    "meta_select": ("a meta-train selection run", "workbench meta-train --resume"),
}


def _environment_info() -> dict[str, Any]:
    """:func:`workbench.artifacts.environment_info`, looked up in the package on every call, so that replacing the
    package's attribute (as the tests do, to skip the git and nvidia-smi probes) reaches the records written here."""
    return sys.modules[__package__].environment_info()


# ----------------------------------------------------------------------------------------------- RunStore
def _read_folder_meta(folder: Path, root_real: str, entry: Any, meta_file: str,
                      what: str) -> tuple[dict[str, Any] | None, str]:
    """(meta, "") of a run or study folder whose ``meta_file`` reads as a JSON object, else (None, why not: a
    symlink out of the root, a file, a missing or unreadable meta file). Never raises for a bad folder."""
    is_link = entry.is_symlink() if entry is not None else os.path.islink(folder)
    if is_link and not _inside(root_real, folder):
        return None, "a symlink leading outside the artifacts root; not read"
    if not (entry.is_dir() if entry is not None else folder.is_dir()):
        return None, f"a file, not a {what} folder"
    meta_path = folder / meta_file
    if os.path.islink(meta_path) and not _inside(root_real, meta_path):
        return None, f"{meta_file} is a symlink out of the artifacts root; not read"
    return _read_json_object(meta_path, meta_file)


def _new_meta(created: Any, environment: Mapping[str, Any], identity: Mapping[str, Any],
              fields: Mapping[str, Any]) -> dict[str, Any]:
    """The first ``run.json`` / ``study.json`` of a folder: its identity, status running, its own ``fields``, the
    writing process and the environment."""
    stamp = _iso(created)
    return {"schema_version": SCHEMA_VERSION, **identity, "created": stamp, "status": "running", "reason": None,
            "finished": None, **fields, **_owner_fields(), "heartbeat": stamp, "environment": environment}


class RunStore:
    """The artifacts root: creates, opens and lists runs and studies.

    ``RunStore()`` uses :func:`default_root`. Nothing is created until something is written, and nothing is
    cached: every listing reads the small JSON files again (callers cache with their own TTL).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, stale_after: float = DEFAULT_STALE_AFTER):
        self.root = default_root(root)
        self.stale_after = float(stale_after)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def studies_dir(self) -> Path:
        return self.root / "studies"

    def __repr__(self) -> str:
        return f"RunStore('{self.root}')"

    # path safety -----------------------------------------------------------------------------------------
    def resolve(self, relative: str | os.PathLike) -> Path:
        """The absolute path of ``relative`` inside the root. Refuses absolute paths, any ``..`` component and
        anything that resolves outside the root through a symlink (WorkbenchError)."""
        if not isinstance(relative, (str, os.PathLike)):
            raise WorkbenchError(f"artifact path must be a string, got {type(relative).__name__}")
        text = os.fspath(relative)
        if not isinstance(text, str) or "\x00" in text:
            raise WorkbenchError(f"artifact path {relative!r} is not a valid path")
        candidate = Path(text)
        if candidate.is_absolute() or candidate.anchor or text.startswith(("/", "\\")):
            raise WorkbenchError(f"artifact path {text!r} is absolute; give a path relative to the artifacts root")
        if ".." in candidate.parts or ".." in text.replace("\\", "/").split("/"):
            raise WorkbenchError(f"artifact path {text!r} contains '..'; give a path inside the artifacts root")
        root_real = os.path.realpath(self.root)
        target = os.path.realpath(os.path.join(root_real, text))
        if not _inside(root_real, target):
            raise WorkbenchError(f"artifact path {text!r} leads outside the artifacts root through a symlink; refused")
        return Path(target)

    def _checked_folder(self, folder: Path, what: str) -> None:
        if folder.exists() and not _inside(os.path.realpath(self.root), folder):
            raise WorkbenchError(f"{folder} leads outside the artifacts root {self.root} (a symlink?); refusing to use it")

    def _root_problem(self) -> str:
        """Why the root cannot hold a store ('' when it can, or does not exist yet)."""
        if os.path.lexists(self.root) and not self.root.is_dir():
            return (f"the artifacts root {self.root} is a file, not a folder; pass --artifacts DIR (or set "
                    f"${ENV_VAR}) naming a folder")
        return ""

    def _new_folder(self, parent: Path, folder_id: str | None, what: str, fresh_id: Callable[[Any], str],
                    taken_fix: str) -> tuple[str, Path, Any]:
        """(id, folder, creation time) of a new run or study under ``parent``: ``folder_id``'s folder (refused when
        it exists, with ``taken_fix``), else the first free id ``fresh_id(created)`` draws. ``mkdir`` is the claim:
        two writers never share a folder."""
        if folder_id is not None:
            _check_id(folder_id, f"{what} id")
        self._make_folder(parent, parent.name)
        created = _now()
        if folder_id is not None:
            try:
                (parent / folder_id).mkdir()
            except FileExistsError:
                raise WorkbenchError(f"{what} id {folder_id!r} already exists under {parent}; {taken_fix}") from None
            return folder_id, parent / folder_id, created
        for _ in range(100):
            folder_id = fresh_id(created)
            try:
                (parent / folder_id).mkdir()
                return folder_id, parent / folder_id, created
            except FileExistsError:
                continue
        # 65536 random suffixes per second: never reached in practice
        raise WorkbenchError(f"could not find a free {what} id under {parent}; pass {what}_id explicitly")

    def _make_folder(self, folder: Path, what: str) -> None:
        """Create ``folder`` (the ``runs`` or ``studies`` folder) if needed; one-line WorkbenchError when the root
        or the folder is a file, or it cannot be made."""
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        if os.path.lexists(folder) and not folder.is_dir():
            raise WorkbenchError(f"{folder} is a file, not a folder, so this artifacts root cannot hold {what}; move "
                                 "the file away or pass --artifacts DIR naming another root")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkbenchError(f"cannot create {folder} ({_one_line(exc.strerror or exc, 120)}); pass --artifacts "
                                 "DIR naming a folder you can write") from None
        self._checked_folder(folder, what)

    # runs ------------------------------------------------------------------------------------------------
    def create_run(
        self,
        kind: str,
        config: Mapping[str, Any] | Any,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        study_id: str | None = None,
    ) -> Run:
        """Create ``runs/<run_id>/`` with ``config.json`` and ``run.json`` (status running) and return the Run.

        Without ``run_id`` a readable unique one is generated: ``<UTC yyyymmdd-hhmmss>-<kind>-<key tags>-<4 hex>``,
        the key tags being source, target, arch/architecture/model, method and seed (``s<seed>``) when present.
        A given ``run_id`` that already exists is refused. ``config`` is a dict or a stage config (``to_dict()``);
        it must be JSON-serialisable with finite numbers. ``study_id`` links the run to an existing study (the
        run is added to the study's run list).
        """
        kind = _check_kind(kind)
        tags = _check_tags(tags)
        if isinstance(config, Mapping) or callable(getattr(config, "to_dict", None)):
            config_json = to_jsonable(config, nonfinite="error", where="config")
        else:
            raise WorkbenchError(f"config must be a dict or a stage config, got {type(config).__name__}")
        study = self.open_study(study_id) if study_id is not None else None
        run_id, path, created = self._new_folder(self.runs_dir, run_id, "run",
                                                 lambda created: _make_run_id(kind, tags, created),
                                                 "choose another run_id or omit it to get a fresh one")
        meta = _new_meta(created, _environment_info(), {"run_id": run_id, "kind": kind},
                         {"tags": tags, "study_id": study_id})
        # run.json last: a folder without it is a creation that did not complete, and is listed as such.
        run = Run(self, path, meta, config_json)
        try:
            run.acquire_lock()  # this process is the run's one writer until it marks it finished or failed
            atomic_write_json(path / "config.json", config_json, nonfinite="error")
            atomic_write_json(path / "run.json", meta, nonfinite="error")
        except BaseException:
            run.release_lock()
            shutil.rmtree(path, ignore_errors=True)  # the folder was made by this call and holds nothing else
            raise
        if study is not None:
            study.add_run(run_id)
        return run

    def open_run(self, run_id: str) -> Run:
        """Open an existing run (WorkbenchError if it does not exist or is corrupt)."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not os.path.lexists(folder):
            raise WorkbenchError(f"no run {run_id!r} under {self.runs_dir}; RunStore.list_runs() shows the existing ones")
        record, meta = self._scan_run(folder, run_id, os.path.realpath(self.root), time.time(), with_summary=True)
        if record.status == "corrupt":
            raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
        config, reason = _read_json_object(folder / "config.json", "config.json")
        if config is None:
            raise WorkbenchError(f"run {run_id} is corrupt: {reason}")
        return Run(self, folder, meta, config)

    def resume_run(self, run_id: str, kinds: tuple[str, ...] | str, what: str | None = None) -> Run:
        """Open ``run_id`` to write it again, as its one writer: its kind must be among ``kinds`` (else
        WorkbenchError naming the command that resumes it; ``what`` names the wanted kind, e.g. "a transfer run"),
        and no other process may hold its writer lock, nor be alive as its recorded writer (else WorkbenchError
        naming that process's pid and host). The returned Run holds the lock; marking it finished or failed, or
        :meth:`Run.release_lock`, releases it."""
        self.check_resume_kind(run_id, kinds, what)
        run = self.open_run(run_id)
        run.acquire_lock()
        try:
            _refuse_live_writer(run_id, run._read_meta())
        except BaseException:
            run.release_lock()
            raise
        return run

    def discard_run(self, run_id: str) -> None:
        """Delete an unfinished run that no live process writes: a study's grid cell cut short before its first
        checkpoint, made again under the same id. Refused for a finished run and while another process holds it."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not _inside(os.path.realpath(self.root), folder) or os.path.islink(folder) or not folder.is_dir():
            raise WorkbenchError(f"cannot discard run {run_id!r}: no such run folder under {self.runs_dir}")
        fd = _acquire_writer_lock(folder, run_id)  # refused, naming the holder, while a writer has it
        try:
            meta, _ = _read_json_object(folder / "run.json", "run.json")
            if meta and meta.get("status") == "finished":
                raise WorkbenchError(f"run {run_id} is finished; it is kept, not discarded")
            if meta:
                _refuse_live_writer(run_id, meta)
            shutil.rmtree(folder)
        finally:
            if fd is not None:
                os.close(fd)

    def check_resume_kind(self, run_id: str, kinds: tuple[str, ...] | str, what: str | None = None) -> RunRecord:
        """The record of ``run_id`` when it can be resumed as one of ``kinds``; WorkbenchError otherwise (no such
        run, corrupt, or another kind: "RUN is a transfer run, not a meta-train run; resume it with `workbench
        transfer --resume RUN`")."""
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        _check_id(run_id, "run id")
        if not os.path.lexists(self.runs_dir / run_id):
            raise WorkbenchError(f"no run {run_id!r} under {self.runs_dir}; RunStore.list_runs() shows the existing ones")
        record = self.run_record(run_id)
        if record.status == "corrupt":
            raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
        if record.kind not in kinds:
            wanted = what or RESUME_COMMANDS.get(kinds[0], (f"a {kinds[0]} run", ""))[0]
            found, command = RESUME_COMMANDS.get(record.kind, (f"a {record.kind} run", ""))
            advice = f"resume it with `{command} {run_id}`" if command else "it cannot be resumed"
            raise WorkbenchError(f"{run_id} is {found}, not {wanted}; {advice}")
        return record

    def run_record(self, run_id: str) -> RunRecord:
        """The record of one run; a missing folder is reported as corrupt, never raised."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not os.path.lexists(folder):
            return RunRecord(run_id, folder, "corrupt", "no such run folder")
        return self._scan_run(folder, run_id, os.path.realpath(self.root), time.time(), with_summary=True)[0]

    def list_runs(self, kind: str | None = None, *, study_id: str | None = None, **tag_filters: Any) -> list[RunRecord]:
        """Records of all runs, oldest first (corrupt ones included when no filter is given).

        ``kind``, ``study_id`` and ``tag=value`` filters select runs; a filter value may be a list/tuple/set of
        accepted values, and values also match by their string form (``seed="0"`` matches seed 0). Reads
        ``run.json``, ``summary.json`` and ``config.json`` of each run that passes the filters and checks its other
        files (``metrics.jsonl`` rows, ``arrays/*.npz`` headers, symlinks, entry types; never array data or
        checkpoints), remembering those checks until a file changes.
        """
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        root_real = os.path.realpath(self.root)
        runs_dir = self.runs_dir
        if os.path.lexists(runs_dir) and not runs_dir.is_dir():
            return [RunRecord("runs", runs_dir, "corrupt", "the runs folder is a file, not a folder; not read")]
        if not runs_dir.is_dir():
            return []
        if not _inside(root_real, runs_dir):
            return [RunRecord("runs", runs_dir, "corrupt", "the runs folder leads outside the artifacts root; not read")]
        now = time.time()
        filtered = kind is not None or study_id is not None or bool(tag_filters)
        records = []
        for entry in sorted(os.scandir(runs_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            record, _ = self._scan_run(Path(entry.path), entry.name, root_real, now, with_summary=False, entry=entry)
            if filtered and not _matches(record, kind, study_id, tag_filters):
                continue
            record = self._check_contents(self._attach_summary(record), root_real)
            records.append(record)
        records.sort(key=lambda r: (r.created or "", r.run_id))
        return records

    def runs_table(self, kind: str | None = None, *, include_config: bool = False, study_id: str | None = None, **tag_filters: Any):
        """A pandas DataFrame with one row per run (same filters as :meth:`list_runs`).

        Columns: run_id, kind, status, reason, created, finished, heartbeat (UTC timestamps), study_id, path
        (relative to the root), then ``tags.<name>`` and ``summary.<metric>`` (nested dicts flattened with dots),
        and ``config.<field>`` with ``include_config=True`` (one more small file per run).
        """
        import pandas as pd

        records = self.list_runs(kind, study_id=study_id, **tag_filters)
        rows = []
        for record in records:
            row = record.row(self.root)
            if include_config and record.ok:
                config, _ = _read_json_object(record.path / "config.json", "config.json")
                _flatten("config", config or {}, row)
            rows.append(row)
        fixed = ["run_id", "kind", "status", "reason", "created", "finished", "heartbeat", "study_id", "path"]
        extra = sorted({key for row in rows for key in row} - set(fixed))
        frame = pd.DataFrame(rows, columns=fixed + extra)
        for column in ("created", "finished", "heartbeat"):
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
        return frame

    def _attach_summary(self, record: RunRecord) -> RunRecord:
        if record.status == "corrupt":
            return record
        path = record.path / "summary.json"
        if not os.path.lexists(path):
            return record
        if not _inside(os.path.realpath(self.root), path):
            return dataclasses.replace(record, status="corrupt", reason="summary.json is a symlink out of the artifacts root")
        summary, reason = _read_json_object(path, "summary.json")
        if summary is None:
            return dataclasses.replace(record, status="corrupt", reason=reason)
        reason = _summary_problem(summary)
        if reason:
            return dataclasses.replace(record, status="corrupt", reason=reason)
        return dataclasses.replace(record, summary=summary)

    def _check_contents(self, record: RunRecord, root_real: str) -> RunRecord:
        """``record`` made corrupt when a file a reader opens fails its check (a symlink out of the root, a file
        where a folder belongs or the reverse, config.json not an object, a metrics row or an npz file of the
        wrong schema), or given a notice when a finished run lacks an array its stage always writes."""
        if record.status == "corrupt":
            return record
        folder = record.path
        problem = _folder_problem(folder, root_real)
        if not problem:
            problem = _cached_problem(folder / "config.json", "config", _config_problem)
        if not problem and (folder / "metrics.jsonl").exists():
            problem = _metrics_file_problem(folder / "metrics.jsonl")
        arrays = folder / "arrays"
        try:
            names = sorted(entry.name[:-4] for entry in os.scandir(arrays)
                           if entry.name.endswith(".npz") and not entry.name.startswith(".")) if not problem else []
        except FileNotFoundError:
            names = []
        except OSError as exc:
            problem = f"arrays/ cannot be read ({_one_line(exc.strerror or exc, 120)})"
            names = []
        for name in names:
            problem = problem or _array_file_problem(arrays / f"{name}.npz", record.kind, name)
        if problem:
            return dataclasses.replace(record, status="corrupt", reason=problem)
        missing = [name for name in FINISHED_ARRAYS.get(record.kind or "", ()) if name not in names]
        if record.stored_status == "finished" and missing:
            listed = ", ".join(f"arrays/{name}.npz" for name in missing)
            one = len(missing) == 1
            return dataclasses.replace(record, notice=(
                f"{listed} {'is' if one else 'are'} missing although the run finished; the plots that need "
                f"{'it' if one else 'them'} leave this run out"))
        return record

    def _scan_run(self, folder: Path, name: str, root_real: str, now: float, *, with_summary: bool, entry=None):
        """(RunRecord, meta or None) for one entry of runs/. Never raises for a bad folder."""
        corrupt = functools.partial(RunRecord, name, folder, "corrupt")
        meta, reason = _read_folder_meta(folder, root_real, entry, "run.json", "run")
        if meta is None:
            if reason == "run.json is missing":
                reason = (
                    "run.json is missing (run creation was interrupted)" if (folder / "config.json").exists()
                    else "not a run folder: no run.json"
                )
            return corrupt(reason), None
        reason = _schema_problem(meta, "run.json")
        if reason:
            return corrupt(reason), None
        reason = _run_meta_problem(meta, name)
        if reason:  # readable under this schema: keep what it says, so filters can still find it
            return corrupt(
                reason,
                kind=meta.get("kind") if isinstance(meta.get("kind"), str) else None,
                created=meta.get("created") if isinstance(meta.get("created"), str) else None,
                tags=_clean_tags(meta.get("tags")),
            ), None
        status, reason = meta["status"], meta.get("reason") or ""
        if status == "running":
            status, reason, _ = _liveness(meta, now, self.stale_after)
        record = RunRecord(
            run_id=name,
            path=folder,
            status=status,
            reason=reason,
            kind=meta["kind"],
            tags=dict(meta.get("tags") or {}),
            study_id=meta.get("study_id"),
            **RunRecord.fields_from(meta),
        )
        if with_summary:
            record = self._check_contents(self._attach_summary(record), root_real)
        return record, meta

    # studies ---------------------------------------------------------------------------------------------
    def create_study(self, notebook: str, profile: str, parameters: Mapping[str, Any], study_id: str | None = None) -> Study:
        """Create ``studies/<study_id>/study.json`` (status running) for executing ``notebook`` with ``profile``.

        The executed notebook belongs at :attr:`Study.executed_notebook_path` (the notebook's file name inside
        the study folder). Runs created with ``study_id=`` are added to the study automatically.
        """
        if not isinstance(notebook, (str, os.PathLike)) or not str(notebook).strip():
            raise WorkbenchError(f"study notebook must be a notebook path such as 'notebooks/01_meta_train.ipynb', got {notebook!r}")
        notebook = os.fspath(notebook)
        if not isinstance(profile, str) or not profile.strip():
            raise WorkbenchError(f"study profile must be a profile name such as 'smoke', got {profile!r}")
        if not isinstance(parameters, Mapping):
            raise WorkbenchError(f"study parameters must be a dict, got {type(parameters).__name__}")
        parameters_json = to_jsonable(parameters, nonfinite="error", where="parameters")
        executed = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(notebook).name).lstrip("._-") or "study.ipynb"
        study_id, path, created = self._new_folder(self.studies_dir, study_id, "study",
                                                   lambda created: _make_study_id(notebook, profile, created),
                                                   "choose another or omit it")
        environment = _environment_info()
        meta = _new_meta(created, environment, {"study_id": study_id, "notebook": notebook, "profile": profile,
                                                "parameters": parameters_json},
                         {"run_ids": [], "executed_notebook": executed, "git_revision": environment.get("git_revision"),
                          "git_dirty": environment.get("git_dirty")})
        atomic_write_json(path / "study.json", meta, nonfinite="error")
        return Study(self, path, meta)

    def open_study(self, study_id: str) -> Study:
        """Open an existing study (WorkbenchError if it does not exist or is corrupt)."""
        _check_id(study_id, "study id")
        folder = self.studies_dir / study_id
        if not os.path.lexists(folder):
            raise WorkbenchError(
                f"no study {study_id!r} under {self.studies_dir}; RunStore.list_studies() shows the existing ones"
            )
        record, meta = self._scan_study(folder, study_id, os.path.realpath(self.root), time.time())
        if record.status == "corrupt":
            raise WorkbenchError(f"study {study_id} is corrupt: {record.reason}")
        return Study(self, folder, meta)

    def study_record(self, study_id: str) -> StudyRecord:
        _check_id(study_id, "study id")
        folder = self.studies_dir / study_id
        if not os.path.lexists(folder):
            return StudyRecord(study_id, folder, "corrupt", "no such study folder")
        return self._scan_study(folder, study_id, os.path.realpath(self.root), time.time())[0]

    def list_studies(self) -> list[StudyRecord]:
        """Records of all studies, oldest first, corrupt ones included with their reason."""
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        root_real = os.path.realpath(self.root)
        if os.path.lexists(self.studies_dir) and not self.studies_dir.is_dir():
            return [StudyRecord("studies", self.studies_dir, "corrupt", "the studies folder is a file, not a folder; not read")]
        if not self.studies_dir.is_dir():
            return []
        if not _inside(root_real, self.studies_dir):
            return [StudyRecord("studies", self.studies_dir, "corrupt", "the studies folder leads outside the artifacts root; not read")]
        now = time.time()
        records = [
            self._scan_study(Path(entry.path), entry.name, root_real, now, entry=entry)[0]
            for entry in sorted(os.scandir(self.studies_dir), key=lambda e: e.name)
            if not entry.name.startswith(".")
        ]
        records.sort(key=lambda r: (r.created or "", r.study_id))
        return records

    def studies_table(self):
        """A pandas DataFrame with one row per study: study_id, status, reason, notebook, profile, created,
        finished, runs (count), executed_notebook (relative to the study folder, None until written),
        git_revision, git_dirty, path, and ``parameters.<name>``."""
        import pandas as pd

        rows = [record.row(self.root) for record in self.list_studies()]
        fixed = [
            "study_id", "status", "reason", "notebook", "profile", "created", "finished", "runs",
            "executed_notebook", "git_revision", "git_dirty", "path",
        ]
        extra = sorted({key for row in rows for key in row} - set(fixed))
        frame = pd.DataFrame(rows, columns=fixed + extra)
        for column in ("created", "finished"):
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
        return frame

    def _scan_study(self, folder: Path, name: str, root_real: str, now: float, entry=None):
        corrupt = functools.partial(StudyRecord, name, folder, "corrupt")
        meta, reason = _read_folder_meta(folder, root_real, entry, "study.json", "study")
        if meta is None:
            return corrupt("not a study folder: no study.json" if reason == "study.json is missing" else reason), None
        reason = _schema_problem(meta, "study.json") or _study_meta_problem(meta, name)
        if reason:
            return corrupt(reason), None
        status, reason = meta["status"], meta.get("reason") or ""
        if status == "running":
            status, reason, cause = _liveness(meta, now, self.stale_after)
            if status == "stale" and cause == "heartbeat":
                # A study is alive while any of its runs is: the runner is blocked inside papermill meanwhile.
                for run_id in meta.get("run_ids") or []:
                    run = self.run_record(run_id)
                    if run.status == "running":
                        status, reason = "running", f"run {run_id} is running"
                        break
        executed = meta.get("executed_notebook")
        record = StudyRecord(
            study_id=name,
            path=folder,
            status=status,
            reason=reason,
            notebook=meta["notebook"],
            profile=meta["profile"],
            parameters=dict(meta.get("parameters") or {}),
            run_ids=tuple(meta.get("run_ids") or ()),
            executed_notebook=executed,
            executed_notebook_exists=bool(executed) and (folder / executed).is_file(),
            git_revision=meta.get("git_revision"),
            git_dirty=meta.get("git_dirty"),
            **StudyRecord.fields_from(meta),
        )
        return record, meta


def _matches(record: RunRecord, kind: str | None, study_id: str | None, tag_filters: Mapping[str, Any]) -> bool:
    if kind is not None and record.kind != kind:
        return False
    if study_id is not None and record.study_id != study_id:
        return False
    for key, wanted in tag_filters.items():
        if key not in record.tags:
            return False
        options = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else (wanted,)
        value = record.tags[key]
        if not any(value == option or str(value) == str(option) for option in options):
            return False
    return True


def _make_run_id(kind: str, tags: Mapping[str, Any], created: _dt.datetime) -> str:
    parts = [created.strftime("%Y%m%d-%H%M%S"), slug(kind)]
    for key in ID_TAGS:
        value = tags.get(key)
        if value is None or value == "" or isinstance(value, bool):
            continue
        value_slug = slug(str(value))[:24].strip("-")
        if value_slug:
            parts.append(f"s{value_slug}" if key == "seed" else value_slug)
    readable = "-".join(parts)[:110].rstrip("-")
    return f"{readable}-{secrets.token_hex(2)}"


def _make_study_id(notebook: str, profile: str, created: _dt.datetime) -> str:
    stem = slug(Path(notebook).stem)[:40].strip("-") or "study"
    profile_slug = slug(profile)[:24].strip("-")
    parts = [created.strftime("%Y%m%d-%H%M%S"), stem] + ([profile_slug] if profile_slug else [])
    return f"{'-'.join(parts)}-{secrets.token_hex(2)}"
