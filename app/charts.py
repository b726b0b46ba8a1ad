"""Plotly figures of the dashboard, as plain functions of tidy tables (no Streamlit, no file access).

Each function takes the pandas frames built by :mod:`workbench.results` and returns a
``plotly.graph_objects.Figure``, so tests can call them directly. The figures the notebooks draw too, and the
shared helpers (colours, method order, placeholder, layout), live in :mod:`workbench.plots`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.plots import (DASHES, delta_bars, empty, finish_layout, label_colors, layer_profile, method_colors,
                             method_order, reliability_diagram, robustness_curves, scale_heatmap)
from workbench.plots import metric_bars as accuracy_bars

STATUS_COLORS = {
    "finished": "#2ca02c", "running": "#1f77b4", "failed": "#d62728", "corrupt": "#9467bd", "stale": "#ff7f0e",
}


def status_overview(runs: pd.DataFrame) -> go.Figure:
    """Stacked bars: number of runs per kind, split by status."""
    title = "Runs by kind and status"
    if runs.empty:
        return empty(title, "no runs")
    counts = runs.assign(kind=runs["kind"].fillna("?")).groupby(["kind", "status"]).size().unstack(fill_value=0)
    fig = go.Figure()
    for status in counts.columns:
        fig.add_bar(x=list(counts.index), y=counts[status].tolist(), name=str(status),
                    marker_color=STATUS_COLORS.get(str(status)))
    fig.update_layout(barmode="stack", xaxis_title="kind", yaxis_title="runs")
    return finish_layout(fig, title, height=320)


def series_lines(frame: pd.DataFrame, x: str, y: str, color: str, title: str, y_label: str | None = None,
                 dash: str | None = None, dash_styles: Mapping[str, str] | None = None,
                 log_x: bool = False) -> go.Figure:
    """Generic line chart: one line per ``color`` (and ``dash``) group of a tidy frame.

    ``dash_styles`` maps values of the ``dash`` column to plotly dash names (``solid``, ``dash``, ``dot`` ...);
    values it does not name get the remaining styles in sorted order.
    """
    if frame.empty or y not in frame:
        return empty(title, "nothing recorded")
    data = frame.dropna(subset=[y])
    if data.empty:
        return empty(title, "nothing recorded")
    groups = sorted(data[color].astype(str).unique())
    colors = label_colors(groups)
    styles = sorted(data[dash].astype(str).unique()) if dash else [None]
    fig = go.Figure()
    for group in groups:
        for k, style in enumerate(styles):
            sub = data[data[color].astype(str) == group]
            if dash:
                sub = sub[sub[dash].astype(str) == style]
            if sub.empty:
                continue
            sub = sub.sort_values(x)
            name = group if not dash or len(styles) == 1 else f"{group} · {style}"
            style = (dash_styles or {}).get(str(style), DASHES[k % len(DASHES)])
            fig.add_scatter(x=sub[x].tolist(), y=sub[y].tolist(), mode="lines+markers" if len(sub) < 60 else "lines",
                            name=name, line=dict(color=colors[group], dash=style))
    fig.update_xaxes(title_text=x, type="log" if log_x else None)
    fig.update_yaxes(title_text=y_label or y)
    return finish_layout(fig, title)


def confidence_histogram(confidences: Mapping[str, np.ndarray] | None = None,
                         bins: Mapping[str, pd.DataFrame] | None = None,
                         title: str = "Confidence of the predictions") -> go.Figure:
    """Overlaid, normalised histograms of the top-class confidence, one per label.

    From per-example confidences where they exist, otherwise from the reliability bins' counts.
    """
    fig = go.Figure()
    labels = list(confidences or {}) + [k for k in (bins or {}) if k not in (confidences or {})]
    if not labels:
        return empty(title, "no predictions recorded for the selected runs")
    colors = method_colors(labels)
    for label in labels:
        if confidences and label in confidences:
            values = np.asarray(confidences[label], dtype=float)
            fig.add_histogram(x=values, name=label, histnorm="probability", opacity=0.55,
                              xbins=dict(start=0, end=1.0001, size=1 / 20), marker_color=colors[label])
        else:
            frame = bins[label]
            total = max(float(frame["count"].sum()), 1.0)
            fig.add_bar(x=frame["confidence"].tolist(), y=(frame["count"] / total).tolist(), name=label,
                        opacity=0.55, marker_color=colors[label])
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="confidence", range=[0, 1])
    fig.update_yaxes(title_text="fraction of examples")
    return finish_layout(fig, title, height=380)


__all__ = ["accuracy_bars", "confidence_histogram", "delta_bars", "layer_profile", "method_order",
           "reliability_diagram", "robustness_curves", "scale_heatmap", "series_lines", "status_overview"]
