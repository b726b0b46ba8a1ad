"""What a listing knows about a folder: :class:`RunRecord` and :class:`StudyRecord`.

Both are frozen dataclasses built by :class:`~workbench.artifacts.store.RunStore` from the small JSON files; their
``status`` may say ``"stale"`` (stored as running, but the process is gone or silent) or ``"corrupt"`` (with the
``reason``), and ``row()`` flattens one into a row of ``runs_table`` / ``studies_table``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping


def _flatten(prefix: str, mapping: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in mapping.items():
        column = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            _flatten(column, value, out)
        else:
            out[column] = value



# ----------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True, kw_only=True)
class _FolderRecord:
    """What run and study listings share: when the folder was made and finished, and the liveness of its process
    (``stored_status`` is the status on disk; ``status`` may say stale where that is running)."""

    created: str | None = None
    finished: str | None = None
    stored_status: str | None = None
    heartbeat: str | None = None
    pid: int | None = None
    host: str | None = None
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"

    @staticmethod
    def fields_from(meta: dict) -> dict[str, Any]:
        """The shared fields from a folder's run.json / study.json."""
        environment = meta.get("environment")
        return dict(created=meta["created"], finished=meta.get("finished"), stored_status=meta["status"],
                    heartbeat=meta.get("heartbeat"), pid=meta.get("pid"), host=meta.get("host"),
                    environment=environment if isinstance(environment, dict) else {})


@dataclasses.dataclass(frozen=True)
class RunRecord(_FolderRecord):
    """What a listing knows about one run folder: its small JSON files, and the checks of the others.

    ``status`` is one of running, finished, failed, stale (stored as running but its process is gone or silent)
    and corrupt (see ``reason``). Fields that could not be read are None or empty. ``notice`` says what a readable
    run lacks (a finished run without an array its stage always writes), '' when nothing.
    """

    run_id: str
    path: Path
    status: str
    reason: str = ""
    kind: str | None = None
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)
    study_id: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    notice: str = ""

    def row(self, root: Path) -> dict[str, Any]:
        """One flat row for :meth:`RunStore.runs_table`."""
        row = {
            "run_id": self.run_id,
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "notice": self.notice,
            "created": self.created,
            "finished": self.finished,
            "heartbeat": self.heartbeat,
            "study_id": self.study_id,
            "path": _relative(self.path, root),
        }
        _flatten("tags", self.tags, row)
        _flatten("summary", self.summary, row)
        return row


@dataclasses.dataclass(frozen=True)
class StudyRecord(_FolderRecord):
    """What a listing knows about one study folder (status running, finished, failed, stale or corrupt)."""

    study_id: str
    path: Path
    status: str
    reason: str = ""
    notebook: str | None = None
    profile: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_ids: tuple[str, ...] = ()
    executed_notebook: str | None = None
    executed_notebook_exists: bool = False
    git_revision: str | None = None
    git_dirty: bool | None = None

    def row(self, root: Path) -> dict[str, Any]:
        row = {
            "study_id": self.study_id,
            "status": self.status,
            "reason": self.reason,
            "notebook": self.notebook,
            "profile": self.profile,
            "created": self.created,
            "finished": self.finished,
            "runs": len(self.run_ids),
            "executed_notebook": self.executed_notebook if self.executed_notebook_exists else None,
            "git_revision": self.git_revision,
            "git_dirty": self.git_dirty,
            "path": _relative(self.path, root),
        }
        _flatten("parameters", self.parameters, row)
        return row


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


