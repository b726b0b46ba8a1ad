"""Filter a study's figures by target, architecture, method, seed or run: the logic behind the controls of the
reading notebooks (``02_transfer_study``, ``03_calibration_robustness``, ``04_scales``).

Each function takes a study's run frame (``results.study_runs`` / ``study.run_transfer_grid``) and a selection
(``all`` or one value per filter) and returns a plotly figure; with nothing selected it is exactly the figure the
notebook showed before it had controls, so an executed study keeps the same static record. ``workbench.controls``
builds the widgets; a notebook cell only connects the two.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd
import plotly.graph_objects as go

from . import plots
from .artifacts import RunStore
from .errors import WorkbenchError
from .results import reliability_groups, robustness_table, scale_data, short_id, summarize
from .study import StudyError

ALL = "all"


METRICS = {"test_accuracy": "test accuracy", "test_nll": "NLL", "test_ece": "ECE"}
METRIC_TITLES = {"test_ece": "Expected calibration error (lower is better)",
                 "test_nll": "Negative log-likelihood (lower is better)"}
FILTERS = ("target", "arch", "method", "seed", "run")


def metric_choices() -> list[tuple[str, str]]:
    """(label, metric) of the metric control."""
    return [(label, key) for key, label in METRICS.items()]


def run_choices(runs: pd.DataFrame, column: str) -> list[tuple[str, Any]]:
    """(label, value) of the control filtering ``runs`` by ``column`` (target, arch, method, seed, run): "all"
    first, then each value present (methods by their label; runs described by target, arch, method and seed)."""
    if column not in FILTERS:
        raise WorkbenchError(f"cannot filter by {column!r}; filters: {', '.join(FILTERS)}")
    out: list[tuple[str, Any]] = [(ALL, ALL)]
    if runs.empty:
        return out
    if column == "run":
        for row in runs.sort_values(["target", "arch", "label", "seed"]).itertuples():
            out.append((f"{row.target} / {row.arch} / {row.label} / seed {row.seed} ({short_id(row.run_id)})",
                        row.run_id))
        return out
    source = "label" if column == "method" else column
    values = runs[source].dropna().unique().tolist()
    values = sorted(values, key=lambda v: (str(v).lower() != "base", v) if column == "method" else v)
    return out + [(str(v), v) for v in values]


def select_runs(runs: pd.DataFrame, target: Any = ALL, arch: Any = ALL, method: Any = ALL, seed: Any = ALL,
                run: Any = ALL) -> pd.DataFrame:
    """The rows of ``runs`` (a study's run frame) that match the selection; ``all`` (or None) keeps every value.
    ``method`` matches a method name or a label."""
    keep = pd.Series(True, index=runs.index)
    for column, wanted in (("target", target), ("arch", arch), ("run_id", run)):
        if wanted not in (ALL, None):
            keep &= runs[column].astype(str) == str(wanted)
    if seed not in (ALL, None):
        keep &= pd.to_numeric(runs["seed"], errors="coerce") == int(seed)
    if method not in (ALL, None):
        keep &= (runs["method"].astype(str) == str(method)) | (runs["label"].astype(str) == str(method))
    return runs[keep].reset_index(drop=True)


def _describe(selection: Mapping[str, Any]) -> str:
    parts = [f"{k} = {short_id(str(v)) if k == 'run' else v}" for k, v in selection.items() if v not in (ALL, None)]
    return f" ({', '.join(parts)})" if parts else ""


def metric_figure(runs: pd.DataFrame, metric: str = "test_accuracy", title: str | None = None,
                  **selection: Any) -> go.Figure:
    """Mean ± std over the selected runs' seeds of ``metric`` per target, method and architecture
    (``plots.metric_bars`` of ``results.summarize``; with nothing selected, the notebook's static figure)."""
    if metric not in METRICS:
        raise WorkbenchError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    title = title or METRIC_TITLES.get(metric)
    chosen = select_runs(runs, **selection)
    if selection and any(v not in (ALL, None) for v in selection.values()):
        title = (title or f"{METRICS[metric]}: mean ± std over seeds") + _describe(selection)
    if chosen.empty:
        return plots.empty(title or METRICS[metric], "no runs match this selection")
    return plots.metric_bars(summarize(chosen, metric), METRICS[metric], title=title)


def delta_figure(runs: pd.DataFrame, metric: str = "test_accuracy", **selection: Any) -> go.Figure:
    """The difference to Base of the same arch and target over the selected runs (``plots.delta_bars``); Base
    stays in the comparison whatever the method filter (each method is compared with it)."""
    method = selection.pop("method", ALL)
    chosen = select_runs(runs, **selection)
    table = summarize(chosen, metric) if not chosen.empty else pd.DataFrame()
    if method not in (ALL, None) and not table.empty:
        names = set(chosen.loc[(chosen["method"].astype(str) == str(method)) |
                               (chosen["label"].astype(str) == str(method)), "label"].astype(str))
        table = table[table["method"].astype(str).isin(names | {"base"})]
    fig = plots.delta_bars(table, METRICS[metric])
    described = _describe({**selection, "method": method})
    if described:
        fig.update_layout(title_text=fig.layout.title.text + described)
    return fig


def reliability_figure(store: RunStore, runs: pd.DataFrame, **selection: Any) -> go.Figure:
    """Reliability diagrams of the selected runs (bins pooled over their seeds; ``plots.reliability_diagrams``)."""
    fig = plots.reliability_diagrams(reliability_groups(store, select_runs(runs, **selection)))
    if _describe(selection):
        fig.update_layout(title_text=fig.layout.title.text + _describe(selection))
    return fig


def robustness_figure(store: RunStore, runs: pd.DataFrame, robust_target: Optional[str] = None,
                      **selection: Any) -> go.Figure:
    """Accuracy under PGD of the selected runs (``plots.robustness_curves``)."""
    fig = plots.robustness_curves(robustness_table(store, select_runs(runs, **selection), robust_target))
    if _describe(selection):
        fig.update_layout(title_text=fig.layout.title.text + _describe(selection))
    return fig


def _scales(store: RunStore, runs: pd.DataFrame, max_heatmaps: int, selection: Mapping[str, Any]):
    chosen = select_runs(runs, **selection)
    try:
        return scale_data(store, chosen, max_heatmaps) if not chosen.empty else None
    except StudyError:
        return None


def profile_figure(store: RunStore, runs: pd.DataFrame, **selection: Any) -> go.Figure:
    """The mean scale per layer of the selected MetaPerturb runs (``plots.layer_profile``)."""
    data = _scales(store, runs, 0, selection)
    if data is None:
        return plots.empty("Mean perturbation scale per layer", "no selected run recorded scales (only MetaPerturb "
                           "runs do)" + _describe(selection))
    fig = plots.layer_profile(data.profile)
    if _describe(selection):
        fig.update_layout(title_text=fig.layout.title.text + _describe(selection))
    return fig


def heatmap_figure(store: RunStore, runs: pd.DataFrame, max_heatmaps: int = 6, **selection: Any) -> go.Figure:
    """Per-channel scales of the selected MetaPerturb runs, seeds averaged (``plots.scale_heatmaps``)."""
    data = _scales(store, runs, max_heatmaps, selection)
    if data is None:
        return plots.empty("Perturbation scale per layer and channel", "no selected run recorded scales"
                           + _describe(selection))
    fig = plots.scale_heatmaps(data.heatmaps)
    if _describe(selection):
        fig.update_layout(title_text=fig.layout.title.text + _describe(selection))
    return fig


__all__ = ["ALL", "FILTERS", "METRICS", "delta_figure", "heatmap_figure", "metric_choices", "metric_figure",
           "profile_figure", "reliability_figure", "robustness_figure", "run_choices", "select_runs"]
