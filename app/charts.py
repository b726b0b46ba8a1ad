"""Plotly figures of the dashboard, as plain functions of tidy tables (no Streamlit, no file access).

Each function takes the pandas frames built by :mod:`workbench.dashboard_data` and returns a
``plotly.graph_objects.Figure``, so tests (and notebooks) can call them directly.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.Plotly + qualitative.D3
TEMPLATE = "plotly_white"
STATUS_COLORS = {
    "finished": "#2ca02c", "running": "#1f77b4", "failed": "#d62728", "corrupt": "#9467bd", "stale": "#ff7f0e",
}


def _colors(labels: Sequence[str]) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _layout(fig: go.Figure, title: str, height: int = 420, **kwargs) -> go.Figure:
    # The legend sits to the right (plotly reserves the room), where long run labels cannot cover the title.
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0, xanchor="left"), height=height,
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(font=dict(size=11)), **kwargs)
    return fig


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=240)


def status_overview(runs: pd.DataFrame) -> go.Figure:
    """Stacked bars: number of runs per kind, split by status."""
    title = "Runs by kind and status"
    if runs.empty:
        return _empty(title, "no runs")
    counts = runs.assign(kind=runs["kind"].fillna("?")).groupby(["kind", "status"]).size().unstack(fill_value=0)
    fig = go.Figure()
    for status in counts.columns:
        fig.add_bar(x=list(counts.index), y=counts[status].tolist(), name=str(status),
                    marker_color=STATUS_COLORS.get(str(status)))
    fig.update_layout(barmode="stack", xaxis_title="kind", yaxis_title="runs")
    return _layout(fig, title, height=320)


def method_order(methods) -> list[str]:
    """Base first, then alphabetical: the order (and so the colours) of methods in every figure."""
    return sorted({str(m) for m in methods}, key=lambda m: (m.lower() != "base", m))


def accuracy_bars(table: pd.DataFrame, metric_label: str = "accuracy", value: str = "mean",
                  error: str = "std", title: str | None = None, methods: Sequence[str] | None = None) -> go.Figure:
    """Grouped bars: x = target, one bar per method, error bars = ``error``; one row of panels per architecture.

    ``table`` has columns arch, target, method, ``value`` and ``error`` (as from
    :func:`workbench.dashboard_data.accuracy_table`). ``methods`` fixes the order and colours (default: the
    table's methods, Base first), so that related figures colour a method alike.
    """
    title = title or f"{metric_label}: mean and spread over seeds"
    if table.empty:
        return _empty(title, "no finished transfer runs with this metric")
    archs = sorted(table["arch"].astype(str).unique())
    methods = list(methods) if methods is not None else method_order(table["method"])
    colors = _colors(methods)
    fig = make_subplots(rows=len(archs), cols=1, shared_xaxes=False, subplot_titles=archs,
                        vertical_spacing=min(0.12, 0.5 / max(1, len(archs))))
    for row, arch in enumerate(archs, start=1):
        part = table[table["arch"].astype(str) == arch]
        for method in methods:
            sub = part[part["method"].astype(str) == method]
            if sub.empty:
                continue
            fig.add_bar(x=sub["target"].astype(str).tolist(), y=sub[value].tolist(), name=method,
                        legendgroup=method, showlegend=row == 1, marker_color=colors[method],
                        error_y=dict(type="data", array=sub[error].fillna(0).tolist(), visible=True),
                        customdata=np.stack([sub.get("n", pd.Series(0, index=sub.index)).to_numpy()], axis=-1),
                        hovertemplate=f"{method}<br>%{{x}}: %{{y:.4f}} ± %{{error_y.array:.4f}}"
                                      "<br>seeds: %{customdata[0]}<extra></extra>",
                        row=row, col=1)
        fig.update_yaxes(title_text=metric_label, row=row, col=1)
    fig.update_layout(barmode="group")
    return _layout(fig, title, height=max(380, 300 * len(archs)))


def delta_bars(table: pd.DataFrame, metric_label: str = "accuracy") -> go.Figure:
    """Difference to Base per (arch, target), one bar per non-Base method, error bars = its standard error."""
    title = f"{metric_label}: difference to Base (± standard error)"
    if table.empty or "delta_base" not in table or table["delta_base"].notna().sum() == 0:
        return _empty(title, "no Base runs to compare with")
    part = table[table["delta_base"].notna() & (table["method"].astype(str).str.lower() != "base")]
    if part.empty:
        return _empty(title, "only Base runs so far")
    part = part.assign(group=part["arch"].astype(str) + " / " + part["target"].astype(str))
    return accuracy_bars(part.assign(arch="difference to Base", target=part["group"]), f"Δ {metric_label}",
                         value="delta_base", error="delta_base_se", title=title,
                         methods=method_order(table["method"]))


def scale_heatmap(site_names: Sequence[str], matrix: np.ndarray, title: str = "Perturbation scale per channel") -> go.Figure:
    """Heatmap of per-channel scales: one row per site (forward order), one column per channel (NaN = none)."""
    if matrix.size == 0:
        return _empty(title, "this run recorded no scales")
    fig = go.Figure(go.Heatmap(z=matrix, y=[f"{i}: {name}" for i, name in enumerate(site_names)],
                               x=np.arange(matrix.shape[1]), colorscale="Viridis", colorbar=dict(title="scale"),
                               hovertemplate="site %{y}<br>channel %{x}<br>scale %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="site (forward order)")
    fig.update_xaxes(title_text="channel")
    return _layout(fig, title, height=max(320, 26 * len(site_names) + 120))


def layer_profile(profile: pd.DataFrame, color: str = "target") -> go.Figure:
    """Mean scale per layer (the paper's figure): x = site index, one line per ``color`` group, one panel per arch.

    ``profile`` has columns arch, site_index, ``color``, mean, std, n (see
    :func:`workbench.dashboard_data.layer_profile`).
    """
    title = "Mean perturbation scale per layer"
    if profile.empty:
        return _empty(title, "no scales recorded for the selected runs")
    archs = sorted(profile["arch"].astype(str).unique())
    groups = sorted(profile[color].astype(str).unique())
    colors = _colors(groups)
    fig = make_subplots(rows=1, cols=len(archs), subplot_titles=archs, shared_yaxes=True)
    for col, arch in enumerate(archs, start=1):
        part = profile[profile["arch"].astype(str) == arch]
        for group in groups:
            sub = part[part[color].astype(str) == group].sort_values("site_index")
            if sub.empty:
                continue
            fig.add_scatter(x=sub["site_index"].tolist(), y=sub["mean"].tolist(), mode="lines+markers", name=group,
                            legendgroup=group, showlegend=col == 1, line_color=colors[group],
                            error_y=dict(type="data", array=sub["std"].fillna(0).tolist(), visible=True,
                                         thickness=1),
                            text=sub.get("site", sub["site_index"]).astype(str).tolist(),
                            hovertemplate=f"{group}<br>site %{{x}} (%{{text}})<br>mean scale %{{y:.4f}}"
                                          "<extra></extra>", row=1, col=col)
        fig.update_xaxes(title_text="layer (site index)", row=1, col=col)
    fig.update_yaxes(title_text="mean scale", row=1, col=1)
    return _layout(fig, title, height=420)


def series_lines(frame: pd.DataFrame, x: str, y: str, color: str, title: str, y_label: str | None = None,
                 dash: str | None = None, dash_styles: Mapping[str, str] | None = None,
                 log_x: bool = False) -> go.Figure:
    """Generic line chart: one line per ``color`` (and ``dash``) group of a tidy frame.

    ``dash_styles`` maps values of the ``dash`` column to plotly dash names (``solid``, ``dash``, ``dot`` ...);
    values it does not name get the remaining styles in sorted order.
    """
    if frame.empty or y not in frame:
        return _empty(title, "nothing recorded")
    data = frame.dropna(subset=[y])
    if data.empty:
        return _empty(title, "nothing recorded")
    groups = sorted(data[color].astype(str).unique())
    colors = _colors(groups)
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
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
            style = (dash_styles or {}).get(str(style), dashes[k % len(dashes)])
            fig.add_scatter(x=sub[x].tolist(), y=sub[y].tolist(), mode="lines+markers" if len(sub) < 60 else "lines",
                            name=name, line=dict(color=colors[group], dash=style))
    fig.update_xaxes(title_text=x, type="log" if log_x else None)
    fig.update_yaxes(title_text=y_label or y)
    return _layout(fig, title)


def reliability_diagram(bins: Mapping[str, pd.DataFrame], title: str = "Reliability diagram") -> go.Figure:
    """Overlaid reliability curves (accuracy against confidence per bin) with the diagonal of perfect calibration.

    ``bins`` maps a label (a method, a run) to a frame with columns confidence, accuracy, count.
    """
    if not bins:
        return _empty(title, "no reliability bins recorded for the selected runs")
    colors = _colors(list(bins))
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                    line=dict(color="#888", dash="dash"))
    for label, frame in bins.items():
        used = frame[frame["count"] > 0]
        if used.empty:
            continue
        total = float(used["count"].sum())
        sizes = (6 + 18 * np.sqrt(used["count"].to_numpy() / total)).tolist()
        fig.add_scatter(x=used["confidence"].tolist(), y=used["accuracy"].tolist(), mode="lines+markers",
                        name=label, line_color=colors[label], marker=dict(size=sizes),
                        customdata=used["count"].to_numpy(),
                        hovertemplate=f"{label}<br>confidence %{{x:.3f}}<br>accuracy %{{y:.3f}}"
                                      "<br>examples %{customdata}<extra></extra>")
    fig.update_xaxes(title_text="confidence", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    return _layout(fig, title, height=460)


def confidence_histogram(confidences: Mapping[str, np.ndarray] | None = None,
                         bins: Mapping[str, pd.DataFrame] | None = None,
                         title: str = "Confidence of the predictions") -> go.Figure:
    """Overlaid, normalised histograms of the top-class confidence, one per label.

    From per-example confidences where they exist, otherwise from the reliability bins' counts.
    """
    fig = go.Figure()
    labels = list(confidences or {}) + [k for k in (bins or {}) if k not in (confidences or {})]
    if not labels:
        return _empty(title, "no predictions recorded for the selected runs")
    colors = _colors(labels)
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
    return _layout(fig, title, height=380)


def robustness_curves(frame: pd.DataFrame, color: str = "label") -> go.Figure:
    """Accuracy against the attack radius eps, one panel per norm, one line per ``color`` group."""
    title = "Accuracy under PGD attack"
    if frame.empty:
        return _empty(title, "no robustness curves recorded for the selected runs")
    norms = sorted(frame["norm"].astype(str).unique())
    groups = method_order(frame[color])
    colors = _colors(groups)
    fig = make_subplots(rows=1, cols=len(norms), subplot_titles=[f"norm {n}" for n in norms], shared_yaxes=True)
    for col, norm in enumerate(norms, start=1):
        part = frame[frame["norm"].astype(str) == norm]
        for group in groups:
            sub = part[part[color].astype(str) == group].sort_values("eps")
            if sub.empty:
                continue
            err = sub["std"].fillna(0).tolist() if "std" in sub else None
            fig.add_scatter(x=sub["eps"].tolist(), y=sub["accuracy"].tolist(), mode="lines+markers", name=group,
                            legendgroup=group, showlegend=col == 1, line_color=colors[group],
                            error_y=dict(type="data", array=err, visible=True) if err else None, row=1, col=col)
        fig.update_xaxes(title_text="eps", row=1, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    return _layout(fig, title)
