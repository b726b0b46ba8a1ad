"""What the store checks before it writes or reads: arguments, and the schema and types of every file.

Writers check ids, names, kinds and tags (``_check_id``, ``_check_name``, ``_check_kind``, ``_check_tags``).
Readers never raise for a bad folder; each check returns a one-line problem ('' when there is none):
``run.json`` / ``study.json`` (``_schema_problem``, ``_run_meta_problem``, ``_study_meta_problem``),
``summary.json`` (``_summary_problem``), the rows of ``metrics.jsonl`` (``_metric_rows``), the members of
``arrays/*.npz`` against :data:`ARRAY_SCHEMAS` (``_npz_problem``, headers only) and the entries of a run folder
(``_folder_problem``: symlinks out of the root, files where folders belong). The checks of the larger files are
cached by file identity, size and mtime (``_cached_problem``, ``_metrics_file_problem``).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import WorkbenchError
from .formatting import _one_line, _parse_iso
from .io import _npy_header, _read_json_object
from .layout import RUN_FILES, RUN_FOLDERS, RUN_STATUSES, SCHEMA_VERSION, _inside

# Arrays of the stages, as readers (the dashboard, notebooks) rely on them: member -> (dtype kinds, ndim or None,
# required). numpy kinds: b bool, i/u integers, f floats, U/S strings.
_NUMBER, _INTEGER, _TEXT, _BOOL = "iuf", "iu", "US", "b"
ARRAY_SCHEMAS: dict[str, dict[str, tuple[str, int | None, bool]]] = {
    "predictions": {"confidence": (_NUMBER, 1, True), "predicted": (_INTEGER, 1, False),
                    "label": (_INTEGER, 1, False), "correct": (_BOOL, 1, False), "probs": (_NUMBER, 2, False)},
    "reliability": {name: (_NUMBER, 1, True) for name in ("lower", "upper", "count", "confidence", "accuracy")},
    "site_scales": {"site_names": (_TEXT, 1, True), "scale": (_NUMBER, 2, True), "channels": (_INTEGER, 1, False),
                    "multiplier_mean": (_NUMBER, 1, False), "multiplier_std": (_NUMBER, 1, False)},
    "robustness": {"norms": (_TEXT, 1, True), "clean_accuracy": (_NUMBER, None, False), "examples": (_INTEGER, 1, False)},
    "site_stats": {"steps": (_INTEGER, 1, True), "scale_mean": (_NUMBER, None, True),
                   "multiplier_mean": (_NUMBER, None, False), "multiplier_std": (_NUMBER, None, False),
                   "site_names": (_TEXT, 1, False), "task_names": (_TEXT, 1, False)},
}
_TRANSFER_ARRAYS = ("predictions", "reliability", "site_scales", "robustness")
# Which of those schemas apply to a run of each kind (arrays of other kinds are only checked to be plain npz files)
ARRAYS_BY_KIND = {"transfer": _TRANSFER_ARRAYS, "source": _TRANSFER_ARRAYS, "meta_train": ("site_stats",)}
# Arrays a finished run of the kind always has; a finished run without one gets a notice.
FINISHED_ARRAYS = {"transfer": ("predictions", "reliability"), "source": ("predictions", "reliability"),
                   "meta_train": ("site_stats",)}
# summary.json keys that readers treat as numbers (null allowed: a non-finite value is written as null), integers
# and strings; ``robust_<norm>_<eps>`` keys are numbers too.
SUMMARY_NUMBERS = ("test_accuracy", "test_nll", "test_ece", "train_eval_accuracy", "train_eval_nll",
                   "generalization_gap", "mean_scale", "heldout_acc_mean", "chance", "chosen_score", "seconds",
                   "seconds_per_step", "phi_norm")
SUMMARY_INTEGERS = ("steps", "mc_samples", "test_examples", "train_examples", "train_eval_examples", "sites")
SUMMARY_STRINGS = ("method", "arch", "target", "chosen_run_id", "phi_path")


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TAG_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


# ------------------------------------------------------------------------------------------------- arguments
def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise WorkbenchError(
            f"{what} {value!r} is not valid; use 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return value


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value.endswith(".tmp"):
        raise WorkbenchError(
            f"{what} name {value!r} is not valid; use letters, digits, '-', '_' or '.' (no slashes), "
            "starting with a letter or digit, e.g. 'last' or 'predictions'"
        )
    return value


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise WorkbenchError(
            f"run kind {kind!r} is not valid; use a lowercase word such as 'meta_train', 'transfer' or 'meta_select'"
        )
    return kind


def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, Any]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise WorkbenchError(f"tags must be a dict of name -> value, got {type(tags).__name__}")
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
            raise WorkbenchError(f"tag name {key!r} is not valid; use a Python identifier such as 'target' or 'seed'")
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise WorkbenchError(
                f"tag {key!r} has a {type(value).__name__} value; tags must be strings, numbers, booleans or None"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise WorkbenchError(f"tag {key!r} is {value}; tags must be finite")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- metadata files
def _schema_problem(meta: dict, label: str) -> str:
    version = meta.get("schema_version")
    if version is None:
        return f"{label} has no schema_version (not written by the workbench run store)"
    if isinstance(version, bool) or not isinstance(version, int):
        return f"{label} has a schema_version of {version!r}, not an integer"
    if version > SCHEMA_VERSION:
        return (
            f"{label} has schema version {version}, newer than this workbench reads ({SCHEMA_VERSION}); "
            "upgrade the workbench to read it"
        )
    if version < 1:
        return f"{label} has unsupported schema version {version} (this workbench reads {SCHEMA_VERSION})"
    return ""


def _run_meta_problem(meta: dict, folder_name: str) -> str:
    if meta.get("run_id") != folder_name:
        return f"run.json names run {meta.get('run_id')!r} but the folder is {folder_name!r} (renamed or copied?)"
    if not isinstance(meta.get("kind"), str):
        return "run.json has no kind"
    if meta.get("status") not in RUN_STATUSES:
        return f"run.json has an unknown status {meta.get('status')!r}"
    if not isinstance(meta.get("created"), str):
        return "run.json has no creation time"
    if not isinstance(meta.get("tags", {}), dict):
        return "run.json tags are not an object"
    if meta.get("study_id") is not None and not isinstance(meta.get("study_id"), str):
        return "run.json study_id is not a string"
    if not _KIND_RE.match(meta["kind"]):
        return f"run.json kind {_one_line(meta['kind'], 60)!r} is not a kind name"
    if _parse_iso(meta["created"]) is None:
        return f"run.json created {_one_line(meta['created'], 60)!r} is not an ISO time"
    for key, value in (meta.get("tags") or {}).items():
        problem = _tag_problem(key, value)
        if problem:
            return problem
    for key, kind, what in (("reason", str, "a string"), ("finished", str, "a time"), ("heartbeat", str, "a time"),
                            ("pid", int, "a process id"), ("pid_start", int, "an integer"), ("host", str, "a host name"),
                            ("environment", dict, "an object")):
        problem = _field_problem(meta, "run.json", key, kind, what)
        if problem:
            return problem
    return ""


def _config_problem(path: Path) -> str:
    config, reason = _read_json_object(path, "config.json")
    return reason if config is None else ""


def _study_meta_problem(meta: dict, folder_name: str) -> str:
    if meta.get("study_id") != folder_name:
        return f"study.json names study {meta.get('study_id')!r} but the folder is {folder_name!r} (renamed or copied?)"
    for key in ("notebook", "profile", "created"):
        if not isinstance(meta.get(key), str):
            return f"study.json has no {key}"
    if meta.get("status") not in RUN_STATUSES:
        return f"study.json has an unknown status {meta.get('status')!r}"
    if not isinstance(meta.get("run_ids", []), list):
        return "study.json run_ids is not a list"
    if not isinstance(meta.get("parameters", {}), dict):
        return "study.json parameters are not an object"
    executed = meta.get("executed_notebook")
    if executed is not None and (not isinstance(executed, str) or not _NAME_RE.match(executed)):
        return f"study.json executed_notebook {executed!r} is not a file name inside the study folder"
    return ""


# ------------------------------------------------------------------------------------------- content checks
def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, list, string, boolean, null or number."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tag_problem(key: Any, value: Any) -> str:
    if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
        return f"run.json has a tag named {key!r}, which is not an identifier"
    if value is None or isinstance(value, (bool, str)) or _finite_number(value):
        return ""
    return (f"run.json tag {key!r} holds a {_json_type(value)} ({_one_line(json.dumps(value), 60)}); a tag is a "
            "string, a finite number, a boolean or null")


def _clean_tags(tags: Any) -> dict[str, Any]:
    """The well-formed tags of a corrupt record (so filters still find it), without the ones that are not."""
    return {k: v for k, v in tags.items() if not _tag_problem(k, v)} if isinstance(tags, dict) else {}


def _field_problem(meta: dict, label: str, key: str, kind: type, what: str) -> str:
    """Why ``meta[key]`` is neither missing, null nor a ``kind`` ('' when it is one of those; bools are no ints)."""
    value = meta.get(key)
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return ""
    return f"{label} {key} is a {_json_type(value)}, not {what}"


def _summary_problem(summary: dict) -> str:
    """Why ``summary.json`` does not fit what readers expect of its known keys ('' when it does)."""
    for key, value in summary.items():
        if key in SUMMARY_NUMBERS or key.startswith("robust_"):
            if value is not None and not _finite_number(value):
                return f"summary.json {key} is a {_json_type(value)}, not a number"
        elif key in SUMMARY_INTEGERS:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"summary.json {key} is a {_json_type(value)}, not an integer"
        elif key in SUMMARY_STRINGS and not isinstance(value, str):
            return f"summary.json {key} is a {_json_type(value)}, not a string"
    return ""


def _metric_row_problem(row: Any) -> str:
    """Why one parsed line of ``metrics.jsonl`` is not a metrics row ('' when it is): an object with an integer
    ``step``, a ``stage`` name, and numbers (or null, for non-finite values) everywhere else."""
    if not isinstance(row, dict):
        return f"holds a JSON {_json_type(row)}, not an object"
    step, stage = row.get("step"), row.get("stage")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step is a {_json_type(step)}, not an integer"
    if not isinstance(stage, str) or not stage:
        return f"stage is a {_json_type(stage)}, not a stage name"
    for key, value in row.items():
        if key not in ("step", "stage") and value is not None and not _finite_number(value):
            return f"{key!r} is a {_json_type(value)}, not a number"
    return ""


def _metric_rows(data: bytes, first_line: int = 1) -> tuple[list[dict], list[int], str]:
    """(rows, numbers of unparseable lines, problem) of ``metrics.jsonl`` content.

    A line that is not JSON is a torn write of a killed process (the last one, without a newline, is cut short and
    not counted); a line that is JSON but not a metrics row is a problem: ``"line N: ..."``.
    """
    lines = data.split(b"\n")
    rows: list[dict] = []
    torn: list[int] = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        number = first_line + index
        try:
            obj = json.loads(raw)
        except ValueError:
            if index < len(lines) - 1:
                torn.append(number)
            continue
        problem = _metric_row_problem(obj)
        if problem:
            return rows, torn, f"metrics.jsonl line {number}: {problem}"
        rows.append(obj)
    return rows, torn, ""


_KIND_WORDS = {_NUMBER: "a number type", _INTEGER: "an integer type", _TEXT: "a string type", _BOOL: "bool"}


def _npz_problem(path: Path, label: str, schema: Mapping[str, tuple[str, int | None, bool]] | None) -> str:
    """Why ``path`` is not an npz file of plain arrays fitting ``schema`` ('' when it is). Reads the zip directory
    and each member's ``.npy`` header, never the array data."""
    members: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    return f"{label} holds {info.filename!r}, which is not an array (not written by the workbench)"
                with archive.open(info) as handle:
                    members[info.filename[:-4]] = _npy_header(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            RuntimeError, SyntaxError) as exc:
        return f"{label} is not a readable npz file ({_one_line(exc, 120)})"
    if not members:
        return f"{label} holds no arrays"
    for name, (_, dtype) in members.items():
        if dtype.hasobject:
            return f"{label} array {name!r} holds Python objects (loading it would need pickle); not read"
    for name, (kinds, ndim, required) in (schema or {}).items():
        if name not in members:
            if required:
                return f"{label} lacks the array {name!r}"
            continue
        shape, dtype = members[name]
        if dtype.kind not in kinds:
            return f"{label} array {name!r} has dtype {dtype}, not {_KIND_WORDS[kinds]}"
        if ndim is not None and len(shape) != ndim:
            return f"{label} array {name!r} has shape {tuple(shape)}, not {ndim}-D"
    return ""


def _array_file_problem(path: Path, kind: str | None, name: str) -> str:
    """:func:`_npz_problem` of ``arrays/<name>.npz`` of a run of ``kind`` (its schema, if the kind has one),
    remembered until the file changes."""
    schema = ARRAY_SCHEMAS.get(name) if name in ARRAYS_BY_KIND.get(kind or "", ()) else None
    label = f"arrays/{name}.npz"
    return _cached_problem(path, f"npz:{name if schema else ''}", lambda p: _npz_problem(p, label, schema))


def _folder_problem(folder: Path, root_real: str) -> str:
    """Why the entries of a run folder cannot be opened safely ('' when they can): an entry (or an entry of
    ``arrays/``, ``checkpoints/``, ``records/``) that is a symlink leading outside the root, a folder where a file
    belongs or the reverse, or no ``config.json``."""
    try:
        entries = {entry.name: entry for entry in os.scandir(folder) if not entry.name.startswith(".")}
    except OSError as exc:
        return f"the run folder cannot be read ({_one_line(exc.strerror or exc, 120)})"
    for name, entry in sorted(entries.items()):
        if entry.is_symlink() and not _inside(root_real, entry.path):
            return f"{name} is a symlink leading outside the artifacts root; not read"
    for name in RUN_FILES:
        entry = entries.get(name)
        if entry is not None and not entry.is_file():
            return f"{name} is a folder, not a file" if entry.is_dir() else f"{name} is not a regular file"
    if "config.json" not in entries:
        return "config.json is missing"
    for name, suffix in RUN_FOLDERS.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if not entry.is_dir():
            return f"{name} is a file, not a folder"
        try:
            members = sorted(os.scandir(entry.path), key=lambda e: e.name)
        except OSError as exc:
            return f"{name}/ cannot be read ({_one_line(exc.strerror or exc, 120)})"
        for member in members:
            if member.name.startswith("."):
                continue
            if member.is_symlink() and not _inside(root_real, member.path):
                return f"{name}/{member.name} is a symlink leading outside the artifacts root; not read"
            if member.name.endswith(suffix) and not member.is_file():
                return f"{name}/{member.name} is a folder, not a file"
    return ""


# Content checks of the larger files, by path: (signature, problem). A file is checked again only when its identity,
# size or mtime changed; metrics.jsonl, which only grows while a run writes it, is checked from where it was left.
_CHECKED: "OrderedDict[tuple[str, str], tuple[tuple, str]]" = OrderedDict()
_CHECKED_MAX = 100_000
_CHECKED_LOCK = threading.Lock()


def _signature(path: Path) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _remember(key: tuple[str, str], signature: tuple | None, value: Any) -> None:
    with _CHECKED_LOCK:
        _CHECKED[key] = (signature, value)
        _CHECKED.move_to_end(key)
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)


def _cached_problem(path: Path, what: str, check: Callable[[Path], str]) -> str:
    key, signature = (os.fspath(path), what), _signature(path)
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
    if hit is not None and signature is not None and hit[0] == signature:
        return hit[1]
    problem = check(path)
    _remember(key, signature, problem)
    return problem


def _metrics_file_problem(path: Path) -> str:
    """The first wrong-typed row of ``metrics.jsonl`` as a problem ('' when every row fits); only the complete
    lines appended since the last check are read when the file grew."""
    key, signature = (os.fspath(path), "metrics"), _signature(path)
    if signature is None:
        return ""
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1][2]
    offset, line = 0, 1
    if hit is not None and hit[0] is not None and hit[0][:2] == signature[:2] and not hit[1][2] \
            and signature[2] >= hit[1][0]:
        offset, line = hit[1][0], hit[1][1]  # the same file, grown: check only what was appended
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError as exc:
        return f"metrics.jsonl cannot be read ({_one_line(exc.strerror or exc, 120)})"
    end = data.rfind(b"\n") + 1  # a last line without its newline may still be being written
    _, _, problem = _metric_rows(data[:end], line)
    _remember(key, signature, (offset + end, line + data[:end].count(b"\n"), problem))
    return problem

