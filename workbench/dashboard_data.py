"""What the dashboard needs beyond the results layer: the artifacts root and its stores, the listings of studies
and foreign entries, the filters of the sidebar, what each page needs and the how-to text.

Runs are read, aggregated and labelled by :mod:`workbench.results` (the schema of the arrays a run writes, the
readers of one run, the tables, the one labelling of methods and phis), the same functions the notebooks and
reports use; those called through this module are re-exported here. Everything goes through
:class:`workbench.artifacts.RunStore`, so nothing outside the root is read, and a corrupt or foreign folder becomes
a row with a reason instead of an exception. No Streamlit here: ``app/ui.py`` wraps these functions in
``st.cache_data`` and tests call them directly.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .artifacts import ENV_VAR, RunStore, default_root
from .errors import WorkbenchError
from .results import (  # noqa: F401  (re-exported: the dashboard's readers and tables live there)
    ACCURACY_KEY, KIND_TRANSFER, OVERFIT_GAP, SUMMARY, UNDERFIT, RunDetails, accuracy_table, check_id, confidences,
    ece, finished, layer_profile, meta_site_stats, open_store, phi_diagnostics, pool_bins, regime_table, reliability,
    robustness, run_details, runs_frame, site_scales, tag_value, wide_table,
)

# The entries a run store root may hold; anything else at the top level is listed as foreign.
ROOT_ENTRIES = {"runs", "studies", "results", "README.md", "provenance.json"}  # provenance: a shipped store's record
SUB_STORES = ("results",)            # curated results shipped with the repository: a run store of their own

HOW_TO_COMMANDS = """\
```bash
make demo                                   # the demo study: meta-train phi, transfer it, open this dashboard
workbench meta-train                        # meta-train phi on the offline Tiny ImageNet tasks
workbench transfer --set target=cifar10 --set per_class=200 --set method=metaperturb --set phi=official
workbench transfer --set target=cifar10 --set per_class=200 --set method=base
workbench study run notebooks/02_transfer_study.ipynb --profile smoke   # a grid of targets x methods x seeds
workbench dashboard --artifacts DIR         # look at another artifacts root
```
"""
HOW_TO = (
    "No runs in this artifacts root yet. Produce some with the workbench (the commands of the README and "
    "`artifacts/README.md`; the layout is described there), then press **Reload data**:\n\n" + HOW_TO_COMMANDS
)

PAGE_NEEDS = {
    "runs": "any run or study",
    "accuracy": "finished `transfer` runs (several methods, including `base`, and seeds)",
    "scales": "finished `transfer` runs with `method=metaperturb` (they record `arrays/site_scales.npz`), or "
              "`meta_train` runs (they record `arrays/site_stats.npz`)",
    "calibration": "finished `transfer` runs (they record `arrays/reliability.npz` and `arrays/predictions.npz`)",
    "curves": "`transfer` or `meta_train` runs (curves in `metrics.jsonl`); for robustness, transfer runs with "
              "`--set robust_norms=[linf]`",
}


# ------------------------------------------------------------------------------------------------ the root
def resolve_root(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The artifacts root: ``--artifacts DIR`` among the script arguments, else ``$WORKBENCH_ARTIFACTS``, else
    :func:`workbench.artifacts.default_root`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--artifacts", default=None)
    known, _ = parser.parse_known_args(list(argv or []))
    environ = os.environ if environ is None else environ
    if known.artifacts:
        return Path(known.artifacts).expanduser().resolve()
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR]).expanduser().resolve()
    return default_root()


def store_roots(root: str | os.PathLike) -> dict[str, Path]:
    """The run stores to offer: the root itself and its shipped ``results/`` store when that holds runs."""
    root = Path(root)
    stores = {"artifacts": root}
    for name in SUB_STORES:
        sub = root / name
        if (sub / "runs").is_dir() or (sub / "studies").is_dir():
            try:
                stores[name] = RunStore(root).resolve(name)
            except WorkbenchError:
                continue
    return stores


# ---------------------------------------------------------------------------------------------- listings
def foreign_entries(root: str | os.PathLike) -> pd.DataFrame:
    """Top-level entries of the root that are not part of the run store layout (listed, never read)."""
    rows = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return pd.DataFrame(columns=["entry", "reason"])
    for entry in entries:
        if entry.name.startswith(".") or entry.name in ROOT_ENTRIES:
            continue
        kind = "folder" if entry.is_dir(follow_symlinks=False) else "symlink" if entry.is_symlink() else "file"
        rows.append({"entry": entry.name, "reason": f"foreign {kind}: not part of the run store layout; ignored"})
    return pd.DataFrame(rows, columns=["entry", "reason"])


def studies_frame(root: str | os.PathLike) -> pd.DataFrame:
    """One row per study (corrupt ones included): study_id, status, reason, notebook, profile, created,
    finished, runs, run_ids, executed_notebook (path relative to the root, None until written), parameters."""
    store = open_store(root)
    rows = []
    for record in store.list_studies():
        executed = None
        if record.executed_notebook and record.executed_notebook_exists:
            executed = f"studies/{record.study_id}/{record.executed_notebook}"
        rows.append({
            "study_id": record.study_id, "status": record.status, "reason": record.reason,
            "notebook": record.notebook, "profile": record.profile, "created": record.created,
            "finished": record.finished, "runs": len(record.run_ids), "run_ids": list(record.run_ids),
            "executed_notebook": executed, "parameters": dict(record.parameters),
            "git_revision": record.git_revision,
        })
    columns = ["study_id", "status", "reason", "notebook", "profile", "created", "finished", "runs", "run_ids",
               "executed_notebook", "parameters", "git_revision"]
    return pd.DataFrame(rows, columns=columns)


def executed_notebook(root: str | os.PathLike, relative: str) -> bytes:
    """The bytes of an executed notebook, by its path relative to the root (refused outside the root)."""
    if not isinstance(relative, str) or not relative.startswith("studies/") or not relative.endswith(".ipynb"):
        raise WorkbenchError(f"{str(relative)[:80]!r} is not an executed notebook of a study; refused")
    path = open_store(root).resolve(relative)
    if not path.is_file():
        raise WorkbenchError(f"{relative} does not exist (the study may still be running)")
    return path.read_bytes()


def filter_runs(runs: pd.DataFrame, **wanted: Iterable[Any]) -> pd.DataFrame:
    """Rows whose column value is among ``wanted[column]`` (compared as strings); an empty selection keeps all."""
    mask = pd.Series(True, index=runs.index)
    for column, values in wanted.items():
        values = [str(v) for v in (values or [])]
        if not values or column not in runs:
            continue
        mask &= runs[column].map(lambda v: str(v) in values if v is not None else False)
    return runs[mask]


def options(runs: pd.DataFrame, column: str) -> list[Any]:
    """Distinct non-missing values of a column, numbers sorted numerically. Only plain values (strings, numbers,
    booleans) are offered: the store lists a run whose tag holds anything else as corrupt, without that tag."""
    if column not in runs:
        return []
    values = list(dict.fromkeys(tag_value(v) for v in runs[column].tolist()
                                if isinstance(v, (str, bool, int, float, np.generic)) and not pd.isna(v)))
    return sorted(values, key=lambda v: (0, float(v), "") if _is_number(v) else (1, 0.0, str(v)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Numeric ``summary.*`` columns (candidates for the accuracy page's metric)."""
    out = []
    for column in runs.columns:
        if column.startswith(SUMMARY) and pd.api.types.is_numeric_dtype(runs[column]) \
                and not pd.api.types.is_bool_dtype(runs[column]) and runs[column].notna().any():
            out.append(column)
    return out


__all__ = [  # the dashboard's own names, then those re-exported from workbench.results
    "HOW_TO", "HOW_TO_COMMANDS", "PAGE_NEEDS", "ROOT_ENTRIES", "SUB_STORES", "executed_notebook", "filter_runs",
    "foreign_entries", "metric_columns", "options", "resolve_root", "store_roots", "studies_frame",
    "ACCURACY_KEY", "KIND_TRANSFER", "OVERFIT_GAP", "UNDERFIT", "RunDetails", "accuracy_table", "check_id",
    "confidences", "ece", "finished", "layer_profile", "meta_site_stats", "phi_diagnostics", "pool_bins",
    "regime_table", "reliability", "robustness", "run_details", "runs_frame", "site_scales", "wide_table",
]
