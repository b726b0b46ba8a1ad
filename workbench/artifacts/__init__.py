"""The run store: one folder per run under an artifacts root, written atomically, read defensively.

Every stage writes through this package (meta-training, transfer, studies) and every reader goes through it
(notebooks, the dashboard). The layout and the file formats are documented in ``artifacts/README.md``::

    <root>/runs/<run_id>/run.json          identity, status, heartbeat, environment (schema_version 1)
                         config.json       the stage's typed config
                         metrics.jsonl     one JSON object per line: {"step", "stage", "wall_time", values...}
                         summary.json      final scalar metrics
                         arrays/<name>.npz checkpoints/<name>.pt records/<name>.json
    <root>/studies/<study_id>/study.json   a papermill study: notebook, profile, parameters, run ids
                              <notebook>.ipynb  the executed notebook

Guarantees:

* every file except ``metrics.jsonl`` is written to a temporary file in the same folder, fsynced and renamed
  over the target (``os.replace``), so a reader sees the old or the new file, never half of one;
* ``metrics.jsonl`` is appended one whole line per call; a reader skips the torn last line of a killed process;
* listing never raises for a bad folder: a run is reported with status ``"corrupt"`` and a one-line reason when
  any file a reader would open fails its schema (``run.json``, ``summary.json``, ``config.json``, the rows of
  ``metrics.jsonl``, ``arrays/*.npz``: types included, e.g. a tag holding a list), leads outside the root, or is a
  file where a folder belongs (or the reverse); a ``"running"`` record whose process is gone is reported as
  ``"stale"``; a finished run that lacks an array its stage always writes keeps its status and says so in
  :attr:`RunRecord.notice`. The content checks of the larger files (metrics rows, npz headers; never array data)
  are cached by file identity, size and mtime, so listing again costs a ``stat`` per file;
* nothing is read outside the root: every reader checks that the file it opens resolves inside it
  (:meth:`RunStore.resolve` refuses ``..``, absolute paths and symlinks out);
* one writer per run: the process that creates or resumes a run holds an exclusive ``flock`` on
  ``<run>/.writer.lock`` until it marks the run finished or failed (or dies: the OS drops the lock), and
  :meth:`RunStore.resume_run` refuses a run another process holds, naming its pid and host.

In a distributed job only rank 0 should create the run and write to it.

The parts:

* ``layout``: the schema version, the root (:func:`default_root`), file and lock names, ids (:func:`slug`);
* ``formatting``: UTC timestamps and one-line messages;
* ``io``: atomic writes (JSON, text, npz, torch checkpoints) and the JSON / npy-header readers;
* ``environment``: :func:`environment_info`, what a run records about where it ran;
* ``locks``: the folder lock, a run's writer lock, and whether a record's process is alive;
* ``validation``: the argument checks of the writers and the schema and type checks of the readers (cached);
* ``records``: :class:`RunRecord` and :class:`StudyRecord`, what a listing knows about a folder;
* ``folders``: :class:`Run` and :class:`Study` on their shared base (metadata file, heartbeat, status changes);
* ``store``: :class:`RunStore`, which creates, opens, resumes, discards and lists runs and studies.

The names below are re-exported here (import them from ``workbench.artifacts``); ``_read_umask`` and
``_checkout_root`` too, for the tests. :func:`environment_info` is looked
up here each time a run or study is created, so replacing ``workbench.artifacts.environment_info`` takes effect.
"""
from __future__ import annotations

from .environment import environment_info
from .folders import HEARTBEAT_INTERVAL, METRIC_RESERVED, Run, Study
from .formatting import MAX_REASON_CHARS
from .io import (
    _read_umask,
    atomic_savez,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_weights_only,
    to_jsonable,
)
from .layout import (
    ENV_VAR,
    LOCK_FILE,
    REPORTED_STATUSES,
    RUN_FILES,
    RUN_FOLDERS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    _checkout_root,
    default_root,
    slug,
)
from .records import RunRecord, StudyRecord
from .store import DEFAULT_STALE_AFTER, ID_TAGS, RESUME_COMMANDS, RunStore
from .validation import (
    ARRAY_SCHEMAS,
    ARRAYS_BY_KIND,
    FINISHED_ARRAYS,
    SUMMARY_INTEGERS,
    SUMMARY_NUMBERS,
    SUMMARY_STRINGS,
)

__all__ = [
    "SCHEMA_VERSION",
    "ENV_VAR",
    "default_root",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_savez",
    "to_jsonable",
    "check_weights_only",
    "environment_info",
    "RunStore",
    "Run",
    "RunRecord",
    "Study",
    "StudyRecord",
    "slug",
]
