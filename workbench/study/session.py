"""A notebook's link to its study: the store its runs go into, the study record, the report it saves."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..artifacts import RunStore, Study
from ..config import Config
from .configs import INTERACTIVE_PROFILE, PROGRESS_ENV, REPORT_KIND, STUDY_ENV


class StudyRunStore(RunStore):
    """A run store whose new runs belong to one study (``create_run`` defaults ``study_id`` to it)."""

    def __init__(self, root: str | os.PathLike | None, study_id: str, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.study_id = study_id

    def create_run(self, kind, config, tags=None, run_id=None, study_id=None):
        return super().create_run(kind, config, tags=tags, run_id=run_id, study_id=study_id or self.study_id)


@dataclass
class StudySession:
    """A notebook's link to its study: the store to write runs into and the study record.

    Under ``workbench study run`` the runner owns the study (it marks it finished or failed after saving the
    executed notebook); in JupyterLab the session creates a study of profile ``interactive`` and
    :meth:`finish` marks it finished.
    """

    notebook: str
    store: StudyRunStore
    study: Study
    managed: bool

    @property
    def study_id(self) -> str:
        return self.study.study_id

    def finish(self) -> None:
        """End of the notebook: an interactive study is marked finished (the runner does its own)."""
        runs = len(self.study.run_ids)
        if not self.managed:
            self.study.mark_finished()
        print(f"study {self.study_id} ({self.notebook}): {runs} run(s) under {self.store.root}")


def _use_text_progress() -> None:
    """Plain tqdm bars (stderr text) instead of widgets: the runner streams them to its console."""
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm = tqdm.std.tqdm
    tqdm.auto.trange = tqdm.std.trange


def open_session(notebook: str, config: Config) -> StudySession:
    """Open the study a notebook writes into (see :class:`StudySession`) and set up progress and plotting."""
    root = getattr(config, "artifacts_root", None)
    study_id = os.environ.get(STUDY_ENV)
    if os.environ.get(PROGRESS_ENV) == "text":
        _use_text_progress()
    with contextlib.suppress(ImportError):
        import plotly.io as pio

        # The figure's JSON only: JupyterLab and VS Code render it offline; no 4 MB of plotly.js per notebook.
        pio.renderers.default = os.environ.get("WORKBENCH_PLOTLY_RENDERER", "plotly_mimetype")
    if study_id:
        store = StudyRunStore(root, study_id)
        study = store.open_study(study_id)
        managed = True
    else:
        plain = RunStore(root)
        study = plain.create_study(f"notebooks/{notebook}.ipynb", INTERACTIVE_PROFILE, config.to_dict())
        store = StudyRunStore(root, study.study_id)
        managed = False
    print(f"study {study.study_id} ({'run by workbench study run' if managed else 'interactive'}); "
          f"artifacts {store.root}")
    return StudySession(notebook, store, study, managed)


def save_report(session: StudySession, name: str, tables: Mapping[str, Any], info: Mapping[str, Any] | None = None,
                arrays: Mapping[str, Mapping[str, Any]] | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """Store what a notebook computed as a run of kind ``study_report`` linked to its study.

    tables: name -> pandas DataFrame (saved as ``records/<name>.json``, a list of row objects);
    info: saved as ``records/info.json``; arrays: name -> dict of arrays (``arrays/<name>.npz``).
    Returns the run id.
    """
    run = session.store.create_run(REPORT_KIND, {"notebook": session.notebook, **dict(info or {})},
                                   tags={"notebook": session.notebook, **dict(tags or {})})
    with run:
        for key, frame in tables.items():
            run.save_json(key, json.loads(frame.to_json(orient="records")))
        if info:
            run.save_json("info", info)
        for key, values in (arrays or {}).items():
            run.save_arrays(key, **values)
        run.mark_finished({"tables": sorted(tables), "arrays": sorted(arrays or {}),
                           "rows": {k: int(len(v)) for k, v in tables.items()}})
    return run.run_id
