"""The results layer: what a run writes, how it is read, how runs are aggregated into tables, and what each row is
called. The notebooks (through :mod:`workbench.study`, which re-exports the names they use), the reports
(``scripts/``), the phi explorer and the dashboard (:mod:`workbench.dashboard_data`, ``app/``) all read runs here,
so a run has one label and a table one definition wherever it is shown.

- **Schema**: the run kinds, tag columns, array names and keys (``ARRAY_*``), metric stages and summary keys the
  stages write (``workbench/transfer.py``, ``workbench/meta_train.py``). If a stage renames an array, the fix is here.
- **Labels**: :func:`method_label` is the one row name of a (method, phi) pair, :func:`labels_for` applies it to runs
  with each phi's verdict read from the store (``metaperturb (ours: …id)``, ``metaperturb (ours, did not learn:
  …id)``, ``metaperturb (authors' phi)``, ``metaperturb (untrained control)``; other methods by their name).
- **Readers** of one run, by store (or root) and run id: :func:`run_details`, :func:`metrics`, :func:`reliability`,
  :func:`confidences`, :func:`site_scales`, :func:`robustness`, :func:`meta_site_stats`, :func:`phi_diagnostics`,
  :func:`meta_history`; listings: :func:`runs_frame`, :func:`find_study`, :func:`study_runs`.
- **Tables**: :func:`accuracy_table` (:func:`summarize`) with the difference to Base and its standard error,
  :func:`paired_differences`, :func:`regime_table` (:data:`OVERFIT_GAP`, :data:`UNDERFIT`), :func:`wide_table`,
  :func:`pool_bins` / :func:`reliability_groups`, :func:`robustness_table`, :func:`layer_profile` /
  :func:`scale_data`.

A table takes either kind of frame: a notebook's rows (columns ``test_accuracy``, ``train_eval_accuracy``, ...) or
the dashboard's runs frame (``summary.test_accuracy``, ...); a metric name resolves to whichever column the frame
has (:func:`metric_column`).

Everything goes through :class:`workbench.artifacts.RunStore`, so nothing outside the root is read (every reader of
the store checks that the file it opens resolves inside the root; ``RunStore.resolve`` refuses ``..``, absolute
paths and symlinks leading out), and a corrupt or foreign folder (a file of the wrong schema or types included, e.g.
a tag holding a list) becomes a row with a reason instead of an exception. Listings read the small JSON files of
each run and the store's cached checks of the others (``RunStore.runs_table``); arrays are loaded one run at a time.
No Streamlit here.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .artifacts import RunStore
from .errors import StudyError, WorkbenchError
from .phi_diagnostics import DIAGNOSTICS_RECORD, UNLEARNED_NOTE, trained_by

Source = Union[RunStore, str, os.PathLike]  # a run store, or the root of one

# ============================================================================== the schema the stages write
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
RELIABILITY_KEYS = ("lower", "upper", "count", "confidence", "accuracy")

# metrics.jsonl stages and summary.json keys (flattened by runs_table as "summary.<key>")
STAGE_TRAIN, STAGE_TEST, STAGE_FINAL = "train", "test", "final"
STAGE_META, STAGE_PHI = "meta_train", "phi"
SUMMARY = "summary."
ACCURACY_KEY = "summary.test_accuracy"
ECE_KEY = "summary.test_ece"
NLL_KEY = "summary.test_nll"
TRAIN_EVAL_KEY = "summary.train_eval_accuracy"  # the final network on a fixed set of its training images
SITES_KEY = "summary.sites"          # present when the run recorded site_scales
ROBUST_PREFIX = "summary.robust_"    # robust_<norm>_<eps>: present when the run recorded robustness curves
# the summary values a study's rows carry (study_runs), besides run_id and the tags
STUDY_SUMMARY = ("test_accuracy", "test_nll", "test_ece", "mc_samples", "sites", "mean_scale", "final_train_accuracy",
                 "train_eval_accuracy", "generalization_gap", "test_examples")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


# ==================================================================================================== labels
# One name for every method row, wherever it is shown (notebooks, reports, the dashboard). A MetaPerturb row says
# which phi it used:
#
# - ``metaperturb (authors' phi)``: the released ``perturb_750.pth`` (``phi = official``);
# - ``metaperturb (ours: …<run>)``: a phi meta-trained by the workbench, named by the random suffix that ends its
#   run id (or the end of its file name); ``metaperturb (ours, did not learn: …<run>)`` when that run's diagnostics
#   say its function stayed at the initialisation (:mod:`workbench.phi_diagnostics`), so an untrained phi is never
#   shown silently as ours;
# - ``metaperturb (untrained control)``: ``metaperturb_untrained``, the phi a run started from.
#
# Other methods are shown by their registered name.
OFFICIAL = "official"
LATEST = "latest"                     # the newest finished run or study of its kind
TRANSFER_NOTEBOOK = "02_transfer_study"
CONTROL_METHOD = "metaperturb_untrained"
AUTHORS = "authors' phi"
CONTROL = "untrained control"
PHI_SUFFIXES = (".pt", ".pth")
_TAIL = 4  # characters of a run id kept in a label: its random suffix (as the dashboard's run pickers show it)


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def short_id(run_id: str) -> str:
    """A run id as rows and menus show it: ``…`` and the random suffix that ends it (short ids stay whole)."""
    return run_id if len(run_id) <= _TAIL + 1 else "…" + run_id[-_TAIL:]


def phi_tag(phi: Any) -> Optional[str]:
    """The ``phi`` tag a transfer run writes for a phi spec (:func:`workbench.transfer.resolve_phi`): ``official``
    and run ids as they are, a phi file (``.pt``, ``.pth``) by its stem, a folder holding ``phi.pt`` by its name. A
    row labelled from the spec a grid was given and one labelled from its run's tag so get the same name. Decided
    from the text alone (nothing is looked up on disk: a tag may name anything)."""
    if _missing(phi):
        return None
    text = str(phi)
    if text == OFFICIAL or not ("/" in text or os.sep in text or text.endswith(PHI_SUFFIXES)):
        return text
    path = Path(text)
    return (path.stem if path.suffix in PHI_SUFFIXES else path.name) or text


def method_label(method: Any, phi: Any = None, learned: Optional[bool] = None) -> str:
    """The row name of a run of ``method`` with phi ``phi`` (its tag or spec; ``learned``: that phi's verdict,
    None if unknown)."""
    name = "?" if _missing(method) else str(method)
    if name == CONTROL_METHOD:
        return f"metaperturb ({CONTROL})"
    tag = phi_tag(phi)
    if tag is None:
        return name
    if tag == OFFICIAL:
        return f"{name} ({AUTHORS})"
    tail = short_id(tag)
    if learned is False:
        return f"{name} (ours, {UNLEARNED_NOTE}: {tail})"
    return f"{name} (ours: {tail})"


def phi_verdict(store: Any, phi: Any) -> Optional[dict[str, Any]]:
    """The diagnostics record of the meta-training run a phi tag names (a ``meta_select`` run: its chosen run), or
    None for the authors' phi, a file, or a run that has no record (made before the diagnostics existed)."""
    if _missing(phi) or str(phi) == OFFICIAL:
        return None
    run_dir = store.runs_dir / str(phi)
    if "/" in str(phi) or not (run_dir / "run.json").is_file():
        return None
    try:
        trained = trained_by(store, str(phi))
        if trained is None:
            return None
        # through the store's checked readers: a record that leads outside the root, or a corrupt run, is not read
        run = store.open_run(trained)
        if DIAGNOSTICS_RECORD not in run.list_json():
            return None
        value = run.load_json(DIAGNOSTICS_RECORD)
    except (WorkbenchError, OSError):  # a corrupt run is the store's to report; the label says nothing about it
        return None
    return value if isinstance(value, dict) and isinstance(value.get("learned"), bool) else None


def phi_learned(store: Any, phis: Iterable[Any]) -> dict[str, Optional[bool]]:
    """``{phi tag: learned}`` for the distinct tags (None where unknown)."""
    out: dict[str, Optional[bool]] = {}
    for phi in phis:
        if _missing(phi) or str(phi) in out:
            continue
        record = phi_verdict(store, phi)
        out[str(phi)] = None if record is None else bool(record["learned"])
    return out


def labels_for(store: Any, methods: Iterable[Any], phis: Iterable[Any]) -> list[str]:
    """The labelling every table and page uses: :func:`method_label` of every (method, phi) pair, each phi's
    verdict read once from ``store`` (phis as tags or specs: :func:`phi_tag`)."""
    methods, tags = list(methods), [phi_tag(p) for p in phis]
    verdicts: Mapping[str, Optional[bool]] = phi_learned(store, tags)
    return [method_label(m, p, None if p is None else verdicts.get(p)) for m, p in zip(methods, tags)]


# ================================================================================================ the store
def open_store(source: Source) -> RunStore:
    """``source`` itself when it is a run store, else the run store at that root."""
    return source if isinstance(source, RunStore) else RunStore(source)


def check_id(text: Any, what: str = "run id") -> str:
    """``text`` if it is a valid run or study id (no slashes, no ``..``), else a one-line WorkbenchError."""
    if not isinstance(text, str) or not _ID_RE.match(text) or ".." in text:
        raise WorkbenchError(
            f"{what} {str(text)[:80]!r} is not valid and was not opened; an id is letters, digits, '-', '_' or '.' "
            "with no path parts (pick one from the table)"
        )
    return text


def tag_value(value: Any) -> Any:
    """A tag value as written: None for missing, 0 rather than 0.0 (pandas turns int columns with gaps to float)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def runs_frame(source: Source) -> pd.DataFrame:
    """One row per run of the store (corrupt ones included, with the store's reason; the store checks every file
    a reader opens, and caches those checks).

    Columns: those of ``RunStore.runs_table`` (run_id, kind, status, reason, notice, created, finished, heartbeat,
    study_id, path, ``tags.*``, ``summary.*``) plus plain tag columns source, target, arch, method, seed, phi
    (None where a run has no such tag) and ``label`` (:func:`labels_for`: which phi a row used, and whether our phi
    learned).
    """
    store = open_store(source)
    frame = store.runs_table()
    for tag in TAG_COLUMNS:
        column = f"tags.{tag}"
        values = [tag_value(v) for v in frame[column]] if column in frame else [None] * len(frame)
        frame[tag] = pd.Series(values, index=frame.index, dtype=object)
    frame["label"] = labels_for(store, frame["method"], frame["phi"])
    return frame


def finished(runs: pd.DataFrame, kind: str = KIND_TRANSFER) -> pd.DataFrame:
    """The finished runs of ``kind`` among the rows of :func:`runs_frame`."""
    return runs[(runs["kind"] == kind) & (runs["status"] == "finished")]


def metric_column(runs: pd.DataFrame, metric: str) -> str:
    """The column of ``runs`` that holds summary value ``metric``: ``metric`` itself when the frame has it, else its
    other spelling (``test_accuracy`` in a notebook's rows, ``summary.test_accuracy`` in :func:`runs_frame`); the
    name as given when the frame has neither."""
    if metric in runs:
        return metric
    other = metric[len(SUMMARY):] if metric.startswith(SUMMARY) else SUMMARY + metric
    return other if other in runs else metric


# ============================================================================================ one run's data
def _open(source: Source, run_id: str):
    return open_store(source).open_run(check_id(run_id))


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


def run_details(source: Source, run_id: str) -> RunDetails:
    """Config, tags, summary and the names of the arrays, records and checkpoints of one run."""
    store = open_store(source)
    record = store.run_record(check_id(run_id))
    if record.status == "corrupt":
        raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
    run = store.open_run(run_id)
    return RunDetails(run_id=run_id, kind=run.kind, status=record.status, reason=record.reason or "",
                      tags=run.tags, study_id=run.study_id, config=dict(run.config), summary=run.summary,
                      arrays=run.list_arrays(), records=run.list_json(), checkpoints=run.list_checkpoints(),
                      path=f"runs/{run_id}", notice=record.notice)


def metrics(source: Source, run_id: str) -> pd.DataFrame:
    """``metrics.jsonl`` of one run as a frame (columns step, stage, wall_time and the logged values)."""
    rows = _open(source, run_id).read_metrics()
    if not rows:
        return pd.DataFrame(columns=["step", "stage", "wall_time"])
    return pd.DataFrame(rows)


def _arrays(source: Source, run_id: str, name: str) -> dict[str, np.ndarray] | None:
    """The arrays ``name`` of a run, None if it has none; the store checks the file (inside the root, a plain npz
    file fitting its schema) and says why in a WorkbenchError when it does not fit."""
    run = _open(source, run_id)
    if not run.has_arrays(name):
        return None
    return run.load_arrays(name)


def _need(arrays: Mapping[str, np.ndarray], keys: Sequence[str], what: str, run_id: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise WorkbenchError(f"run {run_id}: arrays/{what}.npz lacks {missing}; it was written by another version")


def reliability(source: Source, run_id: str) -> pd.DataFrame | None:
    """Reliability bins (lower, upper, count, confidence, accuracy) of a transfer run, None if not recorded."""
    arrays = _arrays(source, run_id, ARRAY_RELIABILITY)
    if arrays is None:
        return None
    _need(arrays, RELIABILITY_KEYS, ARRAY_RELIABILITY, run_id)
    return pd.DataFrame({k: np.asarray(arrays[k]).reshape(-1) for k in RELIABILITY_KEYS})


def confidences(source: Source, run_id: str) -> np.ndarray | None:
    """Per-example top-class confidence of the final prediction, None if not recorded."""
    arrays = _arrays(source, run_id, ARRAY_PREDICTIONS)
    if arrays is None:
        return None
    _need(arrays, ("confidence",), ARRAY_PREDICTIONS, run_id)
    return np.asarray(arrays["confidence"], dtype=np.float32).reshape(-1)


def site_scales(source: Source, run_id: str) -> dict[str, Any] | None:
    """Per-site per-channel scales of a MetaPerturb run: site_names (list), channels, scale (sites x max
    channels, NaN-padded), multiplier_mean and multiplier_std (per site). None if not recorded."""
    arrays = _arrays(source, run_id, ARRAY_SITE_SCALES)
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


def robustness(source: Source, run_id: str) -> pd.DataFrame | None:
    """Accuracy under PGD per norm and eps (the clean accuracy as eps 0), None if not recorded."""
    arrays = _arrays(source, run_id, ARRAY_ROBUSTNESS)
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


def phi_diagnostics(source: Source, run_id: str) -> dict[str, Any]:
    """Whether a meta-training run's phi learned: ``{"learned", "message", "chance", "record"}``. ``learned`` and
    ``record`` (``records/phi_diagnostics.json``) are None for runs made before the diagnostics existed, or for a
    selection run whose chosen run has none."""
    store = open_store(source)
    record = store.run_record(check_id(run_id))
    if record.status == "corrupt":
        raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
    found = phi_verdict(store, run_id)
    chance = record.summary.get("chance") if isinstance(record.summary, dict) else None
    return {"learned": None if found is None else bool(found["learned"]),
            "message": found["message"] if found else "no diagnostics recorded (a run made before they existed): "
                                                      "whether phi learned is unknown",
            "chance": chance if isinstance(chance, (int, float)) else None, "record": found}


def meta_site_stats(source: Source, run_id: str) -> pd.DataFrame | None:
    """Per-site statistics of phi over meta-training, averaged over tasks: step, site_index, site, scale_mean,
    multiplier_mean, multiplier_std (the noise statistics). None if not recorded."""
    arrays = _arrays(source, run_id, ARRAY_META_SITE_STATS)
    if arrays is None:
        return None
    _need(arrays, ("steps", "scale_mean"), ARRAY_META_SITE_STATS, run_id)
    steps = np.asarray(arrays["steps"]).reshape(-1)
    values = {}
    for key in ("scale_mean", "multiplier_mean", "multiplier_std"):
        if key not in arrays:
            continue
        data = np.asarray(arrays[key], dtype=np.float64)
        if data.ndim == 3:  # steps x tasks x sites: the mean over tasks
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


# ==================================================================================== 01: a meta-training run
@dataclass
class MetaHistory:
    """What ``01_meta_train`` shows: the run's curves and the per-site scales phi produced during training."""

    run_id: str
    curves: Any  # DataFrame: step, train/heldout loss and accuracy (means over tasks), phi's norm, gradient norm,
                 # gradient agreement over tasks, distances from the initialisation and the authors' phi
    sites: Any   # DataFrame: step, site_index, site, scale (mean over tasks), scale_std (over tasks), multiplier_std
    selection: Optional[dict[str, Any]] = None
    diagnostics: Optional[dict[str, Any]] = None  # records/phi_diagnostics.json (None for runs made before it)
    chance: Optional[float] = None  # accuracy of guessing on the tasks

    @property
    def learned(self) -> Optional[bool]:
        return None if self.diagnostics is None else bool(self.diagnostics["learned"])

    @property
    def status(self) -> str:
        """``learned``, ``did not learn`` or ``not diagnosed``."""
        return {True: "learned", False: UNLEARNED_NOTE, None: "not diagnosed"}[self.learned]

    @property
    def verdict(self) -> str:
        """One line: learned or not, by how much, and what the task networks reached against chance."""
        if self.diagnostics is None:
            return "no diagnostics recorded for this run (made before they existed): whether phi learned is unknown"
        return self.diagnostics["message"]

    def probe_sites(self):
        """The diagnostics probe per site: scale (final, initial, authors'), channel spread, multiplier statistics."""
        return pd.DataFrame(self.diagnostics["sites"] if self.diagnostics else [])

    def final_sites(self):
        """The learned scale per layer at the last logged step (mean and spread over tasks)."""
        if self.sites.empty:
            return self.sites
        return self.sites[self.sites["step"] == self.sites["step"].max()].reset_index(drop=True)


def describe_meta(result: Any) -> str:
    """One paragraph on a meta-training result: where phi is and how good the task networks got."""
    s = result.summary
    lines = [f"phi: {result.phi_path}"]
    if result.selection_run_id:
        lines.append(f"selection run {result.selection_run_id} chose run {result.run_id}: {s.get('reason')}")
    else:
        lines.append(f"run {result.run_id}: {s.get('steps')} meta steps in {s.get('seconds', float('nan')):.0f} s; "
                     f"mean held-out accuracy of the final task networks {s.get('heldout_acc_mean', float('nan')):.4f}"
                     + (f" (chance {s['chance']:.4f})" if isinstance(s.get("chance"), float) else ""))
    verdict = s.get("phi_verdict") if not result.selection_run_id else None
    if verdict:
        lines.append(("phi " if s.get("phi_learned") else "WARNING: phi ") + verdict)
    return "\n".join(lines)


def meta_history(store: RunStore, result: Any) -> MetaHistory:
    """Curves and per-site scale statistics of a meta-training result (the chosen run when several were made)."""
    run = store.open_run(result.run_id)
    curves = pd.DataFrame(run.read_metrics(STAGE_PHI))
    sites = pd.DataFrame(columns=["step", "site_index", "site", "scale", "scale_std", "multiplier_std"])
    arrays = _arrays(store, run.run_id, ARRAY_META_SITE_STATS)
    if arrays is not None:
        _need(arrays, ("steps", "scale_mean", "multiplier_std", "site_names"), ARRAY_META_SITE_STATS, run.run_id)
        steps = np.asarray(arrays["steps"])
        scale = np.asarray(arrays["scale_mean"], dtype=np.float64)        # steps x tasks x sites
        mult_std = np.asarray(arrays["multiplier_std"], dtype=np.float64)
        names = [str(n) for n in np.asarray(arrays["site_names"]).reshape(-1)]
        rows = []
        for i, step in enumerate(steps):
            for j, site in enumerate(names):
                rows.append({"step": int(step), "site_index": j, "site": site,
                             "scale": float(np.nanmean(scale[i, :, j])), "scale_std": float(np.nanstd(scale[i, :, j])),
                             "multiplier_std": float(np.nanmean(mult_std[i, :, j]))})
        sites = pd.DataFrame(rows, columns=sites.columns)
    diagnostics = phi_verdict(store, run.run_id)
    chance = run.summary.get("chance")
    return MetaHistory(result.run_id, curves, sites, selection=getattr(result, "selection", None),
                       diagnostics=diagnostics, chance=chance if isinstance(chance, (int, float)) else None)


# ====================================================================================== a study and its runs
def find_study(store: RunStore, spec: str, notebook: Optional[str] = None):
    """A finished study of ``notebook`` (default: the transfer study, ``02_transfer_study``): ``latest`` (the
    newest) or a study id. Returns its :class:`~workbench.artifacts.StudyRecord`."""
    notebook = notebook or TRANSFER_NOTEBOOK
    produce = (f"run `workbench study run {notebook} --profile demo` (or the notebook in JupyterLab) first, "
               f"or pass source_study=<study id> (see `workbench study list`)")
    if spec == LATEST:
        found = [r for r in store.list_studies() if r.status == "finished" and r.notebook
                 and Path(r.notebook).stem == notebook]
        if not found:
            raise StudyError(f"no finished {notebook} study under {store.root}; {produce}")
        return max(found, key=lambda r: (r.finished or r.created or "", r.study_id))
    record = store.study_record(spec)
    if record.status == "corrupt":
        raise StudyError(f"study {spec!r} cannot be read under {store.root} ({record.reason}); {produce}")
    if record.status != "finished":
        raise StudyError(f"study {spec} is {record.status}, not finished; its results may be incomplete. {produce}")
    return record


def study_runs(store: RunStore, study: Any, targets: Sequence[str] = (), archs: Sequence[str] = (),
               methods: Sequence[str] = ()) -> pd.DataFrame:
    """The finished transfer runs of a study as a frame (run_id, target, arch, seed, method, phi, label and the
    summary metrics), filtered by target, arch and method name or label (empty filters keep all)."""
    records = [r for r in store.list_runs(kind=KIND_TRANSFER, study_id=study.study_id) if r.status == "finished"]
    if not records:
        raise StudyError(f"study {study.study_id} has no finished transfer runs; pick another source_study "
                           "(`workbench study list`)")
    names = labels_for(store, [r.tags.get("method") for r in records], [r.tags.get("phi") for r in records])
    rows = []
    for r, label in zip(records, names):
        summary = r.summary
        method, phi = str(r.tags.get("method")), r.tags.get("phi")
        rows.append({"run_id": r.run_id, "target": str(r.tags.get("target")), "arch": str(r.tags.get("arch")),
                     "seed": r.tags.get("seed"), "method": method, "phi": phi, "label": label,
                     **{k: summary.get(k) for k in STUDY_SUMMARY}})
    frame = pd.DataFrame(rows)
    for column, wanted in (("target", targets), ("arch", archs)):
        if wanted:
            frame = frame[frame[column].isin(list(wanted))]
    if methods:
        frame = frame[frame["method"].isin(list(methods)) | frame["label"].isin(list(methods))]
    if frame.empty:
        raise StudyError(f"no runs of study {study.study_id} are left after filtering by targets={list(targets)}, "
                           f"archs={list(archs)}, methods={list(methods)}")
    return frame.reset_index(drop=True)


# ================================================================================================== tables
def accuracy_table(runs: pd.DataFrame, metric: str = ACCURACY_KEY,
                   by: Sequence[str] = ("arch", "target", "label")) -> pd.DataFrame:
    """Mean, sample standard deviation and count of ``metric`` over seeds, per (arch, target, method label),
    with the difference to Base of the same arch and target and its standard error
    (``sqrt(sd^2/n + sd_base^2/n_base)``; a single seed counts as spread 0).

    Columns: arch, target, method, mean, std, n, seeds, delta_base, delta_base_se.
    """
    columns = ["arch", "target", "method", "mean", "std", "n", "seeds", "delta_base", "delta_base_se"]
    metric = metric_column(runs, metric)
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


def summarize(runs: Any, metric: str = "test_accuracy") -> pd.DataFrame:
    """Mean, standard deviation and count of ``metric`` over seeds per (arch, target, method label), with the
    difference to Base of the same arch and target and its standard error (:func:`accuracy_table`)."""
    return accuracy_table(runs, metric=metric, by=("arch", "target", "label"))


def wide_table(table: pd.DataFrame, value: str = "mean", error: str = "std", digits: int = 4) -> pd.DataFrame:
    """Methods x (arch, target) as ``mean ± std`` strings, for reading at a glance."""
    if table.empty:
        return pd.DataFrame()
    cells = table.assign(cell=[f"{m:.{digits}f} ± {s:.{digits}f}" if pd.notna(m) else ""
                               for m, s in zip(table[value], table[error])])
    wide = cells.pivot_table(index="method", columns=["arch", "target"], values="cell", aggfunc="first")
    wide.columns = [f"{a} / {t}" for a, t in wide.columns]
    return wide.fillna("")


def wide(table: Any, digits: int = 4) -> pd.DataFrame:
    """Methods x (arch / target) as ``mean ± std`` strings (:func:`wide_table`)."""
    return wide_table(table, digits=digits)


def paired_differences(runs: Any, metric: str = "test_accuracy", reference: str = BASE_METHOD) -> pd.DataFrame:
    """Per (arch, target, label): the mean over seeds of ``metric`` minus the same seed's ``reference`` run (a
    method name or label), the standard error of that mean (sd / sqrt(n)), n pairs, and whether it is more than
    two standard errors from 0. Pairs share the network initialisation and the batches, so the seed-to-seed
    spread they have in common cancels."""
    columns = ["arch", "target", "label", "reference", "mean_diff", "se", "n", "beyond_2se"]
    metric = metric_column(runs, metric)
    if runs.empty or metric not in runs:
        return pd.DataFrame(columns=columns)
    data = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce"))
    is_ref = (data["method"].astype(str) == reference) | (data["label"].astype(str) == reference)
    ref = data[is_ref].set_index(["arch", "target", "seed"])["value"]
    ref = ref[~ref.index.duplicated()]
    rows = []
    for (arch, target, label), part in data[~is_ref].groupby(["arch", "target", "label"], sort=True):
        diffs = [row.value - ref[(arch, target, row.seed)] for row in part.itertuples()
                 if (arch, target, row.seed) in ref.index]
        diffs = [d for d in diffs if d == d]
        if not diffs:
            continue
        n = len(diffs)
        mean = float(sum(diffs) / n)
        se = float(pd.Series(diffs).std() / n ** 0.5) if n > 1 else float("nan")
        rows.append({"arch": arch, "target": target, "label": label, "reference": reference, "mean_diff": mean,
                     "se": se, "n": n, "beyond_2se": bool(n > 1 and abs(mean) > 2 * se)})
    return pd.DataFrame(rows, columns=columns)


OVERFIT_GAP = 0.05  # Base's train-test accuracy gap below which a cell is marked underfit
UNDERFIT = "underfit: a regularizer cannot help here"


def regime_table(runs: pd.DataFrame, method: str = BASE_METHOD, train: str = TRAIN_EVAL_KEY,
                 test: str = ACCURACY_KEY) -> pd.DataFrame:
    """Whether Base overfits each (arch, target): its final network's accuracy on its training images (``train``,
    the transfer run's fixed training-set evaluation), on the test split (``test``), and the gap, means over seeds.
    ``regime`` marks a gap below :data:`OVERFIT_GAP` as underfit; runs made before the training-set evaluation
    existed give NaN and ``unknown``. Columns: arch, target, seeds, train_accuracy, test_accuracy, gap, regime.
    ``train`` and ``test`` resolve to the frame's spelling (:func:`metric_column`)."""
    columns = ["arch", "target", "seeds", "train_accuracy", "test_accuracy", "gap", "regime"]
    train, test = metric_column(runs, train), metric_column(runs, test)
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
        return pd.DataFrame(columns=list(RELIABILITY_KEYS))
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


def reliability_groups(store: Source, runs: Any) -> dict[str, dict[str, Any]]:
    """``{"arch / target": {label: pooled reliability bins}}``: each method's bins pooled over its seeds."""
    groups: dict[str, dict[str, Any]] = {}
    for (arch, target, label), part in runs.groupby(["arch", "target", "label"], sort=True):
        frames = [bins for bins in (reliability(store, run_id) for run_id in part["run_id"]) if bins is not None]
        if frames:
            groups.setdefault(f"{arch} / {target}", {})[label] = pool_bins(frames)
    return groups


def robustness_table(store: Source, runs: Any, target: Optional[str] = None) -> pd.DataFrame:
    """Accuracy under PGD per (arch, target, label, norm, eps): mean, std and count over seeds, from the runs'
    ``arrays/robustness.npz`` (:func:`robustness`: clean accuracy at eps 0). Empty if no run recorded curves."""
    rows = []
    chosen = runs if target is None else runs[runs["target"] == target]
    for row in chosen.itertuples():
        curves = robustness(store, row.run_id)
        if curves is None:
            continue
        rows.extend({"arch": row.arch, "target": row.target, "label": row.label, "seed": row.seed, "norm": norm,
                     "eps": eps, "accuracy": accuracy} for norm, eps, accuracy in curves.itertuples(index=False))
    columns = ["arch", "target", "label", "norm", "eps", "mean", "std", "n"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows).drop_duplicates(["arch", "target", "label", "seed", "norm", "eps"])
    out = frame.groupby(["arch", "target", "label", "norm", "eps"], sort=True)["accuracy"].agg(
        ["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    out["std"] = out["std"].fillna(0.0)
    return out[columns]


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


@dataclass
class ScaleData:
    """Per-site per-channel scales of a study's MetaPerturb runs."""

    profile: Any    # DataFrame: arch, target, label, site_index, site, mean, std (over seeds), n, multiplier_std
    heatmaps: list  # [(title, site names, sites x channels matrix averaged over seeds)]


def scale_data(store: Source, runs: Any, max_heatmaps: int = 6) -> ScaleData:
    """Read ``arrays/site_scales.npz`` of every run that has one (:func:`site_scales`); the per-layer profile is the
    mean scale over a site's channels, then mean and spread over seeds (the paper's figure)."""
    rows, matrices = [], {}
    for row in runs.itertuples():
        found = site_scales(store, row.run_id)
        if found is None:
            continue
        scale, names, mult_std = found["scale"], found["site_names"], found["multiplier_std"]
        key = (row.arch, row.target, row.label)
        matrices.setdefault(key, (names, []))[1].append(scale)
        with np.errstate(all="ignore"):
            means = np.nanmean(scale, axis=1)
        for i, (name, value) in enumerate(zip(names, means)):
            rows.append({"arch": row.arch, "target": row.target, "label": row.label, "seed": row.seed,
                         "site_index": i, "site": name, "value": float(value), "multiplier_std": float(mult_std[i])})
    columns = ["arch", "target", "label", "site_index", "site", "mean", "std", "n", "multiplier_std"]
    if not rows:
        raise StudyError("none of the selected runs recorded perturbation scales (only MetaPerturb runs do); "
                           "include metaperturb in the transfer study's methods")
    frame = pd.DataFrame(rows)
    profile = frame.groupby(["arch", "target", "label", "site_index"], sort=True).agg(
        site=("site", "first"), mean=("value", "mean"), std=("value", "std"), n=("value", "count"),
        multiplier_std=("multiplier_std", "mean")).reset_index()
    profile["std"] = profile["std"].fillna(0.0)
    heatmaps = []
    for (arch, target, label), (names, stack) in sorted(matrices.items())[:max_heatmaps]:
        with np.errstate(all="ignore"):
            mean = np.nanmean(np.stack(stack), axis=0)
        heatmaps.append((f"{arch} / {target} / {label} ({len(stack)} seed{'s' if len(stack) != 1 else ''})",
                         names, mean))
    return ScaleData(profile[columns], heatmaps)


__all__ = [
    "ACCURACY_KEY", "ARRAY_META_SITE_STATS", "ARRAY_PREDICTIONS", "ARRAY_RELIABILITY", "ARRAY_ROBUSTNESS",
    "ARRAY_SITE_SCALES", "AUTHORS", "BASE_METHOD", "CONTROL", "CONTROL_METHOD", "ECE_KEY", "FILTER_TAGS",
    "KIND_META", "KIND_SELECT", "KIND_SOURCE", "KIND_TRANSFER", "MetaHistory", "NLL_KEY", "OFFICIAL", "OVERFIT_GAP",
    "RELIABILITY_KEYS", "ROBUST_PREFIX", "RunDetails", "SITES_KEY", "STAGE_FINAL", "STAGE_META", "STAGE_PHI",
    "STAGE_TEST", "STAGE_TRAIN", "SUMMARY", "ScaleData", "TAG_COLUMNS", "TRAIN_EVAL_KEY", "UNDERFIT",
    "accuracy_table", "check_id", "confidences", "describe_meta", "ece", "find_study", "finished", "labels_for",
    "layer_profile", "meta_history", "meta_site_stats", "method_label", "metric_column", "metrics", "open_store",
    "paired_differences", "phi_diagnostics", "phi_learned", "phi_tag", "phi_verdict", "pool_bins", "regime_table",
    "reliability", "reliability_groups", "robustness", "robustness_table", "run_details", "runs_frame", "scale_data",
    "short_id", "site_scales", "study_runs", "summarize", "tag_value", "wide", "wide_table",
]
