"""Executing study notebooks headless with papermill: validate every notebook's parameters, run each as a study
(or continue an interrupted one), keep the executed notebook in the study folder."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from ..artifacts import RunStore, Study, atomic_write_text, default_root
from ..artifacts.formatting import _exception_line
from ..config import Config
from ..errors import WorkbenchError
from .configs import ARTIFACTS_ENV, KERNEL_START_TIMEOUT, PROGRESS_ENV, REPO, STUDY_ENV, load_profile, notebook_config_class, resolve_notebook


@dataclass
class PreparedStudy:
    """A notebook with validated parameters, ready to execute."""

    path: Path
    name: str
    config_class: type[Config]
    config: Config
    profile: str

    @property
    def parameters(self) -> dict[str, Any]:
        return self.config.to_dict()


@dataclass
class StudyOutcome:
    notebook: str
    study_id: str
    status: str
    executed_notebook: Path
    seconds: float
    reason: Optional[str] = None


def prepare_studies(notebooks: Sequence[str | os.PathLike], profile: str | os.PathLike,
                    overrides: Mapping[str, Any] | None = None) -> list[PreparedStudy]:
    """Resolve the notebooks and validate each one's parameters (profile entry + overrides) against its config.

    An override ``key`` applies to every notebook whose config has that field (``notebook.key`` to one
    notebook only); a key no notebook knows is refused. Nothing is written.
    """
    if not notebooks:
        raise WorkbenchError("name at least one notebook, e.g. `workbench study run 02_transfer_study --profile demo`")
    paths = [resolve_notebook(n) for n in notebooks]
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"a notebook is named twice: {names}")
    classes = [notebook_config_class(p) for p in paths]
    per_notebook: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in (overrides or {}).items():
        prefix, dot, field_name = key.rpartition(".")
        if dot:
            target = next((n for n in names if n == prefix or n.split("_", 1)[0] == prefix), None)
            if target is None:
                raise WorkbenchError(f"parameter {key!r}: {prefix!r} is not one of the notebooks run ({', '.join(names)})")
            per_notebook[target][field_name] = value
            continue
        hits = [n for n, cls in zip(names, classes) if key in cls.field_names()]
        if not hits and len(names) == 1:
            hits = names  # its config refuses it below, with the same message a notebook shows
        if not hits:
            raise WorkbenchError(f"unknown parameter(s) [{key!r}]: not a field of any notebook's config here "
                                 f"({'; '.join(f'{n}: {c.__name__}' for n, c in zip(names, classes))})")
        for n in hits:
            per_notebook[n][key] = value
    profile_name = Path(str(profile)).stem if str(profile).endswith((".yaml", ".yml")) else str(profile)
    prepared = []
    for path, name, cls in zip(paths, names, classes):
        values = {**load_profile(profile, name), **per_notebook[name]}
        try:
            config = cls.from_dict(values)
        except WorkbenchError as exc:
            raise WorkbenchError(f"{name}: {exc}") from None
        prepared.append(PreparedStudy(path, name, cls, config, profile_name))
    return prepared


def _kernel_manager_class():
    """A kernel manager that starts ipykernel with this interpreter, whatever python the kernelspec names."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class CurrentPythonKernelManager(AsyncKernelManager):
        @default("transport_encryption")
        def _encrypt_when_possible(self) -> str:  # CurveZMQ keys where the kernel supports them
            return "auto" if zmq.has("curve") else "disabled"

        def _kernel_supports_curve_encryption(self) -> bool:
            # an ipykernel spec runs this interpreter's ipykernel (below), whatever the kernelspec declares
            argv = list(getattr(self.kernel_spec, "argv", None) or [])
            return any("ipykernel" in part for part in argv[1:3]) or super()._kernel_supports_curve_encryption()

        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            if any("ipykernel" in part for part in cmd[1:3]):
                cmd[0] = sys.executable
            return cmd

    return CurrentPythonKernelManager


@contextlib.contextmanager
def _environment(values: Mapping[str, Optional[str]]) -> Iterator[None]:
    def apply(settings: Mapping[str, Optional[str]]) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {key: os.environ.get(key) for key in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


_ANSI_MOVES = re.compile(r"\x1b\[[0-9;]*[ABCDEFGHJKSTfmnsu]")


def _screen_text(text: str) -> str:
    """What a terminal would show of streamed text: carriage returns overwrite, cursor moves dropped, cleared
    (blank) lines removed; so progress bars keep their last state instead of every update."""
    lines = []
    for line in _ANSI_MOVES.sub("", text).split("\n"):
        parts = line.split("\r")
        shown = next((p for p in reversed(parts) if p), "")
        if shown.strip() or not parts[:-1]:
            lines.append(shown.rstrip() if len(parts) > 1 else shown)
    return "\n".join(lines)


def tidy_outputs(nb: Any) -> Any:
    """Merge consecutive stream outputs of a cell (papermill keeps every message) and reduce them to their
    screen text (:func:`_screen_text`). Returns the notebook, changed in place."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        merged: list = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == out.get("name")):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _screen_text(out["text"])
        cell["outputs"] = [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]
    return nb


def _failure_reason(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        count = getattr(exc, "exec_count", None)
        where = f"cell [{count}]" if count else f"cell {getattr(exc, 'cell_index', '?')}"
        return f"{where} raised {ename}: {evalue}"
    return _exception_line(exc)


def execute_study(prepared: PreparedStudy, store: RunStore, stream: bool = True,
                  study: Optional[Study] = None) -> StudyOutcome:
    """Create the study record (or continue ``study``, reopened), execute the notebook with papermill, save it into
    the study folder, and mark the study finished or failed (the executed notebook keeps the failing cell's
    error)."""
    import nbformat
    import papermill

    parameters = prepared.parameters
    if study is None:
        study = store.create_study(os.path.relpath(prepared.path, REPO) if _inside_repo(prepared.path)
                                   else str(prepared.path), prepared.profile, parameters)
    final = study.executed_notebook_path
    partial = final.with_name(f".{final.stem}.partial.ipynb")
    env = {STUDY_ENV: study.study_id, ARTIFACTS_ENV: str(store.root),
           PROGRESS_ENV: "text" if stream else "off", "TQDM_MININTERVAL": "1" if stream else None,
           "TQDM_DISABLE": None if stream else "1"}
    started = time.perf_counter()
    print(f"== {prepared.name}: study {study.study_id} (profile {prepared.profile})", file=sys.stderr, flush=True)
    reason = None
    partial.unlink(missing_ok=True)  # a killed session's leftover is not this execution's notebook
    try:
        with _environment(env):
            papermill.execute_notebook(
                str(prepared.path), str(partial), parameters=parameters, cwd=str(prepared.path.parent),
                progress_bar=False, log_output=False, stdout_file=sys.stdout if stream else None,
                stderr_file=sys.stderr if stream else None, start_timeout=KERNEL_START_TIMEOUT,
                kernel_manager_class=_kernel_manager_class(), request_save_on_cell_execute=True)
    except KeyboardInterrupt:
        reason = "interrupted (Ctrl-C)"
        raise
    except Exception as exc:  # PapermillExecutionError: a cell failed; anything else: the kernel or papermill
        reason = _failure_reason(exc)
    finally:
        text = None
        if not partial.is_file():  # the kernel never ran a cell: keep the notebook with the reason on top
            nb = nbformat.read(str(prepared.path), as_version=4)
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"**This study failed before any cell ran:** "
                                                             f"{reason or 'interrupted'}"))
            text = nbformat.writes(nb)
        else:
            with contextlib.suppress(Exception):  # tidying is cosmetic; never lose the notebook over it
                text = nbformat.writes(tidy_outputs(nbformat.read(str(partial), as_version=4)))
        if text is None:
            os.replace(partial, final)
        else:
            atomic_write_text(final, text)
            partial.unlink(missing_ok=True)
        if reason is None:
            study.mark_finished()
        else:
            study.mark_failed(reason)
    seconds = time.perf_counter() - started
    status = "failed" if reason else "finished"
    print(f"== {prepared.name}: study {study.study_id} {status} in {seconds:.0f} s; executed notebook {final}"
          + (f"\n   {reason}" if reason else ""), file=sys.stderr, flush=True)
    return StudyOutcome(prepared.name, study.study_id, status, final, seconds, reason)


def _inside_repo(path: Path) -> bool:
    try:
        path.resolve().relative_to(REPO)
        return True
    except ValueError:
        return False


def run_studies(notebooks: Sequence[str | os.PathLike], profile: str | os.PathLike,
                overrides: Mapping[str, Any] | None = None, artifacts: str | os.PathLike | None = None,
                stream: bool = True) -> list[StudyOutcome]:
    """Validate all, then execute the notebooks one after another (each its own study) until one fails."""
    prepared = prepare_studies(notebooks, profile, overrides)
    roots = {p.name: p.config.artifacts_root for p in prepared if getattr(p.config, "artifacts_root", None)}
    root = default_root(artifacts if artifacts is not None else next(iter(roots.values()), None))
    for name, value in roots.items():
        if default_root(value) != root:
            raise WorkbenchError(f"{name}: artifacts_root={value} differs from the artifacts root {root} of this "
                                 "command; drop the parameter or pass the same --artifacts")
    store = RunStore(root)
    outcomes = []
    for item in prepared:
        outcome = execute_study(item, store, stream=stream)
        outcomes.append(outcome)
        if outcome.status != "finished":
            break
    return outcomes


def resume_study(study_id: str, artifacts: str | os.PathLike | None = None,
                 execution: Mapping[str, Any] | None = None, stream: bool = True) -> StudyOutcome:
    """Run an interrupted or failed study's notebook again, in the same study and with the same parameters: the
    grid cells it finished are kept, the others resumed or started again. ``execution`` may change where cells
    run (workers, executor, ray_address, retries), nothing else."""
    from ..fanout import EXECUTION_FIELDS

    store = RunStore(artifacts)
    study = store.open_study(study_id)
    path = Path(study.notebook)
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        raise WorkbenchError(f"study {study_id} ran {study.notebook}, which is not here any more; it cannot be resumed")
    cls = notebook_config_class(path)
    changes = dict(execution or {})
    wrong = sorted(set(changes) - set(EXECUTION_FIELDS))
    if wrong:
        raise WorkbenchError(f"a resumed study keeps its parameters; only {', '.join(EXECUTION_FIELDS)} may change "
                             f"(got {', '.join(wrong)})")
    unknown = sorted(k for k in changes if k not in cls.field_names())
    if unknown:
        raise WorkbenchError(f"{path.stem} has no parameter {', '.join(unknown)}: its cells do not fan out")
    try:
        config = cls.from_dict({**study.parameters, **changes})
    except WorkbenchError as exc:
        raise WorkbenchError(f"study {study_id}: {exc}") from None
    study.reopen()
    prepared = PreparedStudy(path, path.stem, cls, config, study.profile)
    return execute_study(prepared, store, stream=stream, study=study)
