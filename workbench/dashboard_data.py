"""What the dashboard reads from an artifacts root, as plain functions returning pandas frames and numpy arrays.

This is the only module of the dashboard that knows file, array and metric names: if a stage renames an array,
the fix is here. Everything goes through :class:`workbench.artifacts.RunStore`, so nothing outside the root is
read (every reader of the store checks that the file it opens resolves inside the root; ``RunStore.resolve``
refuses ``..``, absolute paths and symlinks leading out), and a corrupt or foreign folder (a file of the wrong
schema or types included, e.g. a tag holding a list) becomes a row with a reason instead of an exception.

Listings read the small JSON files of each run and the store's cached checks of the others
(``RunStore.runs_table``); arrays are loaded one run at a time, for the runs a page has selected. No Streamlit here: ``app/ui.py`` wraps these functions in
``st.cache_data`` and tests call them directly.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .artifacts import ENV_VAR, RunStore, default_root
from .errors import WorkbenchError
from .labels import labels_for, method_label, phi_verdict

# ------------------------------------------------------------------------------------- names the stages write
KIND_TRANSFER = "transfer"          # workbench/transfer.py (TRANSFER_KIND)
KIND_SOURCE = "source"              # workbench/transfer.py (SOURCE_KIND): plain training on the source set
KIND_META = "meta_train"            # workbench/meta_train.py (RUN_KIND)
KIND_SELECT = "meta_select"         # workbench/meta_train.py (SELECT_KIND)
FILTER_TAGS = ("source", "target", "arch", "method", "seed")
TAG_COLUMNS = FILTER_TAGS + ("phi",)
BASE_METHOD = "base"

# transfer.ARRAY_NAMES
ARRAY_PREDICTIONS = "predictions"   # confidence, predicted, label, correct, probs
ARRAY_RELIABILITY = "reliability"   # lower, upper, count, confidence, accuracy (15 bins)
ARRAY_SITE_SCALES = "site_scales"   # site_names, channels, scale (sites x max channels, NaN-padded),
                                    # multiplier_mean, multiplier_std
ARRAY_ROBUSTNESS = "robustness"     # norms, <norm>_eps, <norm>_accuracy, clean_accuracy
# meta_train.py
ARRAY_META_SITE_STATS = "site_stats"  # steps, scale_mean / multiplier_mean / multiplier_std (steps x tasks x
                                      # sites), site_names, task_names

# metrics.jsonl stages and summary.json keys (flattened by runs_table as "summary.<key>")
STAGE_TRAIN, STAGE_TEST, STAGE_FINAL = "train", "test", "final"
STAGE_META, STAGE_PHI = "meta_train", "phi"
SUMMARY = "summary."
ACCURACY_KEY = "summary.test_accuracy"
ECE_KEY = "summary.test_ece"
NLL_KEY = "summary.test_nll"
SITES_KEY = "summary.sites"          # present when the run recorded site_scales
ROBUST_PREFIX = "summary.robust_"    # robust_<norm>_<eps>: present when the run recorded robustness curves

# The entries a run store root may hold; anything else at the top level is listed as foreign.
ROOT_ENTRIES = {"runs", "studies", "results", "README.md", "provenance.json"}  # provenance: a shipped store's record
SUB_STORES = ("results",)            # curated results shipped with the repository: a run store of their own

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

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


def check_id(text: Any, what: str = "run id") -> str:
    """``text`` if it is a valid run or study id (no slashes, no ``..``), else a one-line WorkbenchError."""
    if not isinstance(text, str) or not _ID_RE.match(text) or ".." in text:
        raise WorkbenchError(
            f"{what} {str(text)[:80]!r} is not valid and was not opened; an id is letters, digits, '-', '_' or '.' "
            "with no path parts (pick one from the table)"
        )
    return text


def open_store(root: str | os.PathLike) -> RunStore:
    return RunStore(root)


# ---------------------------------------------------------------------------------------------- listings
def runs_frame(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run of the store (corrupt ones included, with the store's reason; the store checks every file
    a reader opens, and caches those checks).

    Columns: those of ``RunStore.runs_table`` (run_id, kind, status, reason, notice, created, finished, heartbeat,
    study_id, path, ``tags.*``, ``summary.*``) plus plain tag columns source, target, arch, method, seed, phi
    (None where a run has no such tag) and ``label`` (:func:`workbench.labels.method_label`: which phi a row used,
    and whether our phi learned).
    """
    frame = open_store(root).runs_table()
    for tag in TAG_COLUMNS:
        column = f"tags.{tag}"
        values = [_plain(v) for v in frame[column]] if column in frame else [None] * len(frame)
        frame[tag] = pd.Series(values, index=frame.index, dtype=object)
    frame["label"] = labels_for(open_store(root), frame["method"], frame["phi"])
    return frame


def _plain(value: Any) -> Any:
    """A tag value as written: None for missing, 0 rather than 0.0 (pandas turns int columns with gaps to float)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


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
    values = list(dict.fromkeys(_plain(v) for v in runs[column].tolist()
                                if isinstance(v, (str, bool, int, float, np.generic)) and not pd.isna(v)))
    return sorted(values, key=lambda v: (0, float(v), "") if _is_number(v) else (1, 0.0, str(v)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def finished(runs: pd.DataFrame, kind: str = KIND_TRANSFER) -> pd.DataFrame:
    return runs[(runs["kind"] == kind) & (runs["status"] == "finished")]


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Numeric ``summary.*`` columns (candidates for the accuracy page's metric)."""
    out = []
    for column in runs.columns:
        if column.startswith(SUMMARY) and pd.api.types.is_numeric_dtype(runs[column]) \
                and not pd.api.types.is_bool_dtype(runs[column]) and runs[column].notna().any():
            out.append(column)
    return out


# ----------------------------------------------------------------------------------------- aggregations
def accuracy_table(runs: pd.DataFrame, metric: str = ACCURACY_KEY,
                   by: Sequence[str] = ("arch", "target", "label")) -> pd.DataFrame:
    """Mean, sample standard deviation and count of ``metric`` over seeds, per (arch, target, method label),
    with the difference to Base of the same arch and target and its standard error
    (``sqrt(sd^2/n + sd_base^2/n_base)``; a single seed counts as spread 0).

    Columns: arch, target, method, mean, std, n, seeds, delta_base, delta_base_se.
    """
    columns = ["arch", "target", "method", "mean", "std", "n", "seeds", "delta_base", "delta_base_se"]
    if runs.empty or metric not in runs:
        return pd.DataFrame(columns=columns)
    data = runs[list(dict.fromkeys([*by, "seed", "method", metric]))].copy()
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    data = data.dropna(subset=[metric])
    if data.empty:
        return pd.DataFrame(columns=columns)
    for column in by:
        data[column] = data[column].map(lambda v: "?" if v is None else str(v))
    grouped = data.groupby(list(by), sort=True)
    table = grouped[metric].agg(["mean", "std", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    table = table.rename(columns={"count": "n", by[-1]: "method"})
    seeds = grouped["seed"].agg(lambda s: ", ".join(str(v) for v in sorted(s.dropna().unique(), key=str)))
    table["seeds"] = seeds.to_numpy()
    is_base = grouped["method"].agg(lambda s: bool((s.astype(str).str.lower() == BASE_METHOD).all())).to_numpy()
    base = table[is_base].set_index(["arch", "target"])
    base = base[~base.index.duplicated()]
    deltas, ses = [], []
    for row in table.itertuples():
        key = (row.arch, row.target)
        if key in base.index and not is_base[row.Index]:
            b = base.loc[key]
            deltas.append(row.mean - b["mean"])
            ses.append(math.sqrt(row.std ** 2 / row.n + b["std"] ** 2 / b["n"]))
        else:
            deltas.append(np.nan)
            ses.append(np.nan)
    table["delta_base"] = deltas
    table["delta_base_se"] = ses
    return table[columns]


def wide_table(table: pd.DataFrame, value: str = "mean", error: str = "std", digits: int = 4) -> pd.DataFrame:
    """Methods x (arch, target) as ``mean ± std`` strings, for reading at a glance."""
    if table.empty:
        return pd.DataFrame()
    cells = table.assign(cell=[f"{m:.{digits}f} ± {s:.{digits}f}" if pd.notna(m) else ""
                               for m, s in zip(table[value], table[error])])
    wide = cells.pivot_table(index="method", columns=["arch", "target"], values="cell", aggfunc="first")
    wide.columns = [f"{a} / {t}" for a, t in wide.columns]
    return wide.fillna("")


OVERFIT_GAP = 0.05  # Base's train-test accuracy gap below which a cell is marked underfit
UNDERFIT = "underfit: a regularizer cannot help here"


def regime_table(runs: pd.DataFrame, train: str = SUMMARY + "train_eval_accuracy", test: str = ACCURACY_KEY,
                 method: str = BASE_METHOD) -> pd.DataFrame:
    """Whether Base overfits each (arch, target): its final network's accuracy on its training images (``train``,
    the transfer run's fixed training-set evaluation), on the test split (``test``), and the gap, means over seeds.
    ``regime`` marks a gap below :data:`OVERFIT_GAP` as underfit; runs made before the training-set evaluation
    existed give NaN and ``unknown``. Columns: arch, target, seeds, train_accuracy, test_accuracy, gap, regime."""
    columns = ["arch", "target", "seeds", "train_accuracy", "test_accuracy", "gap", "regime"]
    if runs.empty or test not in runs:
        return pd.DataFrame(columns=columns)
    base = runs[runs["method"].astype(str) == method]
    if base.empty:
        return pd.DataFrame(columns=columns)
    base = base.assign(train_value=pd.to_numeric(base[train], errors="coerce") if train in base else np.nan,
                       test_value=pd.to_numeric(base[test], errors="coerce"))
    table = base.groupby(["arch", "target"], sort=True).agg(
        seeds=("seed", "count"), train_accuracy=("train_value", "mean"), test_accuracy=("test_value", "mean"))
    table = table.reset_index()
    table["gap"] = table["train_accuracy"] - table["test_accuracy"]
    table["regime"] = ["unknown" if gap != gap else "overfits" if gap >= OVERFIT_GAP else UNDERFIT
                       for gap in table["gap"]]
    return table[columns]


def pool_bins(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Reliability bins of several runs (e.g. seeds) pooled: counts summed, confidence and accuracy averaged
    with the counts as weights. All frames must use the same bin edges."""
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return pd.DataFrame(columns=["lower", "upper", "count", "confidence", "accuracy"])
    first = frames[0]
    for other in frames[1:]:
        if len(other) != len(first) or not np.allclose(other["lower"], first["lower"]):
            raise WorkbenchError("these runs use different calibration bins and cannot be pooled; compare them one by one")
    count = sum(f["count"].to_numpy(dtype=float) for f in frames)
    conf = sum(f["count"].to_numpy(dtype=float) * f["confidence"].to_numpy(dtype=float) for f in frames)
    acc = sum(f["count"].to_numpy(dtype=float) * f["accuracy"].to_numpy(dtype=float) for f in frames)
    safe = np.maximum(count, 1.0)
    return pd.DataFrame({"lower": first["lower"].to_numpy(), "upper": first["upper"].to_numpy(), "count": count,
                         "confidence": np.where(count > 0, conf / safe, 0.0),
                         "accuracy": np.where(count > 0, acc / safe, 0.0)})


def ece(bins: pd.DataFrame) -> float:
    """Expected calibration error of reliability bins: sum of |accuracy - confidence| weighted by bin share."""
    count = bins["count"].to_numpy(dtype=float)
    total = count.sum()
    if total == 0:
        return float("nan")
    gap = np.abs(bins["accuracy"].to_numpy(dtype=float) - bins["confidence"].to_numpy(dtype=float))
    return float(np.sum(count / total * gap))


def layer_profile(items: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], color: str = "target") -> pd.DataFrame:
    """The paper's per-layer figure: per run the mean scale of each site over its channels, then mean and
    standard deviation over runs per (arch, ``color``, site index).

    ``items`` pairs a run row (arch, target, label ...) with its :func:`site_scales` result.
    """
    rows = []
    for run, scales in items:
        matrix = scales["scale"]
        names = scales["site_names"]
        with np.errstate(all="ignore"):
            means = np.nanmean(matrix, axis=1) if matrix.size else np.zeros(0)
        for index, (name, value) in enumerate(zip(names, means)):
            if np.isfinite(value):
                rows.append({"arch": str(run.get("arch")), color: str(run.get(color)), "site_index": index,
                             "site": str(name), "run_id": run.get("run_id"), "value": float(value)})
    columns = ["arch", color, "site_index", "site", "mean", "std", "n"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    out = frame.groupby(["arch", color, "site_index"], sort=True).agg(
        site=("site", "first"), mean=("value", "mean"), std=("value", "std"), n=("value", "count")).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out[columns]


# ----------------------------------------------------------------------------------------- one run's data
def _open(root: str | os.PathLike, run_id: str):
    return open_store(root).open_run(check_id(run_id))


@dataclass
class RunDetails:
    run_id: str
    kind: str
    status: str
    reason: str
    tags: dict[str, Any]
    study_id: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    arrays: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    path: str = ""
    notice: str = ""


def run_details(root: str | os.PathLike, run_id: str) -> RunDetails:
    """Config, tags, summary and the names of the arrays, records and checkpoints of one run."""
    store = open_store(root)
    record = store.run_record(check_id(run_id))
    if record.status == "corrupt":
        raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
    run = store.open_run(run_id)
    return RunDetails(run_id=run_id, kind=run.kind, status=record.status, reason=record.reason or "",
                      tags=run.tags, study_id=run.study_id, config=dict(run.config), summary=run.summary,
                      arrays=run.list_arrays(), records=run.list_json(), checkpoints=run.list_checkpoints(),
                      path=f"runs/{run_id}", notice=record.notice)


def metrics(root: str | os.PathLike, run_id: str) -> pd.DataFrame:
    """``metrics.jsonl`` of one run as a frame (columns step, stage, wall_time and the logged values)."""
    rows = _open(root, run_id).read_metrics()
    if not rows:
        return pd.DataFrame(columns=["step", "stage", "wall_time"])
    return pd.DataFrame(rows)


def _arrays(root: str | os.PathLike, run_id: str, name: str) -> dict[str, np.ndarray] | None:
    """The arrays ``name`` of a run, None if it has none; the store checks the file (inside the root, a plain npz
    file fitting its schema) and says why in a WorkbenchError when it does not fit."""
    run = _open(root, run_id)
    if not run.has_arrays(name):
        return None
    return run.load_arrays(name)


def _need(arrays: Mapping[str, np.ndarray], keys: Sequence[str], what: str, run_id: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise WorkbenchError(f"run {run_id}: arrays/{what}.npz lacks {missing}; it was written by another version")


def reliability(root: str | os.PathLike, run_id: str) -> pd.DataFrame | None:
    """Reliability bins (lower, upper, count, confidence, accuracy) of a transfer run, None if not recorded."""
    arrays = _arrays(root, run_id, ARRAY_RELIABILITY)
    if arrays is None:
        return None
    keys = ("lower", "upper", "count", "confidence", "accuracy")
    _need(arrays, keys, ARRAY_RELIABILITY, run_id)
    return pd.DataFrame({k: np.asarray(arrays[k]).reshape(-1) for k in keys})


def confidences(root: str | os.PathLike, run_id: str) -> np.ndarray | None:
    """Per-example top-class confidence of the final prediction, None if not recorded."""
    arrays = _arrays(root, run_id, ARRAY_PREDICTIONS)
    if arrays is None:
        return None
    _need(arrays, ("confidence",), ARRAY_PREDICTIONS, run_id)
    return np.asarray(arrays["confidence"], dtype=np.float32).reshape(-1)


def site_scales(root: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    """Per-site per-channel scales of a MetaPerturb run: site_names (list), channels, scale (sites x max
    channels, NaN-padded), multiplier_mean and multiplier_std (per site). None if not recorded."""
    arrays = _arrays(root, run_id, ARRAY_SITE_SCALES)
    if arrays is None:
        return None
    _need(arrays, ("site_names", "scale"), ARRAY_SITE_SCALES, run_id)
    scale = np.asarray(arrays["scale"], dtype=np.float64)
    if scale.ndim != 2:
        raise WorkbenchError(f"run {run_id}: arrays/site_scales.npz scale has shape {scale.shape}, not sites x channels")
    names = [str(n) for n in np.asarray(arrays["site_names"]).reshape(-1)]
    nan = np.full(len(names), np.nan)
    return {
        "site_names": names,
        "channels": np.asarray(arrays.get("channels", np.sum(np.isfinite(scale), axis=1))).reshape(-1),
        "scale": scale,
        "multiplier_mean": np.asarray(arrays.get("multiplier_mean", nan), dtype=np.float64).reshape(-1),
        "multiplier_std": np.asarray(arrays.get("multiplier_std", nan), dtype=np.float64).reshape(-1),
    }


def robustness(root: str | os.PathLike, run_id: str) -> pd.DataFrame | None:
    """Accuracy under PGD per norm and eps (the clean accuracy as eps 0), None if not recorded."""
    arrays = _arrays(root, run_id, ARRAY_ROBUSTNESS)
    if arrays is None:
        return None
    _need(arrays, ("norms",), ARRAY_ROBUSTNESS, run_id)
    clean = arrays.get("clean_accuracy")
    rows = []
    for norm in np.asarray(arrays["norms"]).reshape(-1).tolist():
        norm = str(norm)
        _need(arrays, (f"{norm}_eps", f"{norm}_accuracy"), ARRAY_ROBUSTNESS, run_id)
        eps = np.asarray(arrays[f"{norm}_eps"], dtype=float).reshape(-1)
        acc = np.asarray(arrays[f"{norm}_accuracy"], dtype=float).reshape(-1)
        if clean is not None and not np.any(eps == 0):
            rows.append({"norm": norm, "eps": 0.0, "accuracy": float(np.asarray(clean).reshape(-1)[0])})
        rows.extend({"norm": norm, "eps": float(e), "accuracy": float(a)} for e, a in zip(eps, acc))
    return pd.DataFrame(rows, columns=["norm", "eps", "accuracy"])


def phi_diagnostics(root: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """Whether a meta-training run's phi learned: ``{"learned", "message", "chance", "record"}``. ``learned`` and
    ``record`` (``records/phi_diagnostics.json``) are None for runs made before the diagnostics existed, or for a
    selection run whose chosen run has none."""
    store = open_store(root)
    record = store.run_record(check_id(run_id))
    if record.status == "corrupt":
        raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
    found = phi_verdict(store, run_id)
    chance = record.summary.get("chance") if isinstance(record.summary, dict) else None
    return {"learned": None if found is None else bool(found["learned"]),
            "message": found["message"] if found else "no diagnostics recorded (a run made before they existed): "
                                                      "whether phi learned is unknown",
            "chance": chance if isinstance(chance, (int, float)) else None, "record": found}


def meta_site_stats(root: str | os.PathLike, run_id: str) -> pd.DataFrame | None:
    """Per-site statistics of phi over meta-training, averaged over tasks: step, site_index, site, scale_mean,
    multiplier_mean, multiplier_std (the noise statistics). None if not recorded."""
    arrays = _arrays(root, run_id, ARRAY_META_SITE_STATS)
    if arrays is None:
        return None
    _need(arrays, ("steps", "scale_mean"), ARRAY_META_SITE_STATS, run_id)
    steps = np.asarray(arrays["steps"]).reshape(-1)
    values = {}
    for key in ("scale_mean", "multiplier_mean", "multiplier_std"):
        if key not in arrays:
            continue
        data = np.asarray(arrays[key], dtype=np.float64)
        if data.ndim == 3:  # steps x tasks x sites: the dashboard shows the mean over tasks
            data = np.nanmean(data, axis=1)
        if data.ndim != 2 or data.shape[0] != len(steps):
            raise WorkbenchError(f"run {run_id}: arrays/site_stats.npz {key} has shape {data.shape}; expected "
                                 f"({len(steps)}, tasks, sites)")
        values[key] = data
    sites = values["scale_mean"].shape[1]
    names = [str(n) for n in np.asarray(arrays.get("site_names", [f"site{i}" for i in range(sites)])).reshape(-1)]
    if len(names) != sites:
        names = [f"site{i}" for i in range(sites)]
    frame = pd.DataFrame({
        "step": np.repeat(steps, sites),
        "site_index": np.tile(np.arange(sites), len(steps)),
        "site": np.tile(np.asarray(names, dtype=object), len(steps)),
    })
    for key, data in values.items():
        frame[key] = data.reshape(-1)
    return frame


__all__ = [
    "ACCURACY_KEY", "ECE_KEY", "HOW_TO", "HOW_TO_COMMANDS", "PAGE_NEEDS", "RunDetails", "accuracy_table", "check_id", "confidences",
    "ece", "executed_notebook", "filter_runs", "finished", "foreign_entries", "layer_profile", "meta_site_stats",
    "method_label", "metric_columns", "metrics", "options", "phi_diagnostics", "pool_bins", "regime_table", "reliability", "resolve_root",
    "robustness", "run_details", "runs_frame", "site_scales", "store_roots", "studies_frame", "wide_table",
]
