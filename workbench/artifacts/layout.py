"""Where the store is and what its folders hold.

The schema version written into every ``run.json`` / ``study.json``, the artifacts root (:func:`default_root`:
flag, ``$WORKBENCH_ARTIFACTS``, the checkout's ``artifacts/`` or ``./artifacts``), the stored statuses, the
entries of a run folder that readers open, the name of the writer lock, what ids look like (:func:`slug`), and the
check that a path resolves inside the root.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

SCHEMA_VERSION = 1
ENV_VAR = "WORKBENCH_ARTIFACTS"

RUN_STATUSES = ("running", "finished", "failed")
REPORTED_STATUSES = ("running", "finished", "failed", "stale", "corrupt")
LOCK_FILE = ".writer.lock"  # held (flock) by the one process writing a run; a dot name, so never listed

# The entries of a run folder that readers open: files, and folders with the suffix of their members.
RUN_FILES = ("run.json", "config.json", "summary.json", "metrics.jsonl")
RUN_FOLDERS = {"arrays": ".npz", "checkpoints": ".pt", "records": ".json"}


# --------------------------------------------------------------------------------------------------- the root
@functools.lru_cache(maxsize=1)
def _checkout_root() -> Path | None:
    """The repository folder when the package runs from a source checkout (editable install), else None."""
    candidate = Path(__file__).resolve().parents[2]  # <checkout>/workbench/artifacts/layout.py
    try:
        text = (candidate / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    if re.search(r"""^name\s*=\s*["']metaperturb-workbench["']""", text, re.MULTILINE):
        return candidate
    return None


def default_root(flag: str | os.PathLike | None = None) -> Path:
    """The artifacts root: ``flag`` if given, else ``$WORKBENCH_ARTIFACTS``, else ``<checkout>/artifacts``
    when running from a source checkout, else ``./artifacts``. Returned as an absolute path (not created)."""
    if flag is not None and str(flag) != "":
        chosen = Path(flag)
    elif os.environ.get(ENV_VAR):
        chosen = Path(os.environ[ENV_VAR])
    elif _checkout_root() is not None:
        chosen = _checkout_root() / "artifacts"
    else:
        chosen = Path.cwd() / "artifacts"
    return chosen.expanduser().resolve()

# ---------------------------------------------------------------------------------------------- ids and paths
def slug(text: str) -> str:
    """``text`` as it may appear inside a run or study id (what generated ids use for their tags)."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def _inside(root_real: str, path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    try:
        return os.path.commonpath([root_real, target]) == root_real
    except ValueError:  # different drives on Windows
        return False
