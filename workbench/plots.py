"""Plotly figures of the study notebooks, as plain functions of the tidy frames built by :mod:`workbench.study`.

No file access and no computation beyond arranging traces: each function takes a pandas frame (or a dict of them)
and returns a ``plotly.graph_objects.Figure``; an empty input gives a figure that says what is missing.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.Plotly + qualitative.D3
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
TEMPLATE = "plotly_white"


# Methods keep their colour in every figure, whichever subset a figure shows.
METHOD_ORDER = ("base", "dropout", "dropblock", "mixup", "manifold_mixup", "information_dropout", "l2sp", "finetune",
                "finetune_metaperturb", "metaperturb (official)", "metaperturb (ours)")


def _colors(keys: Sequence[Any]) -> dict[str, str]:
    return {str(k): PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


def _method_colors(labels: Sequence[Any]) -> dict[str, str]:
    extra = sorted({str(v) for v in labels} - set(METHOD_ORDER))
    order = list(METHOD_ORDER) + extra
    return {str(v): PALETTE[order.index(str(v)) % len(PALETTE)] for v in labels}


def _method_order(labels: Sequence[Any]) -> list[str]:
    """Base first, then the others alphabetically."""
    return sorted({str(v) for v in labels}, key=lambda m: (m.lower() != "base", m))


def _finish(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, height=height, margin=dict(l=60, r=20, t=70, b=50))
    return fig


def _integer_ticks(fig: go.Figure, count: int) -> None:
    """Site indices are whole numbers: one tick per site while they fit."""
    if count <= 40:
        fig.update_xaxes(tickmode="linear", tick0=0, dtick=1 if count <= 20 else 2)


def empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, title, height=220)


# ------------------------------------------------------------------------------------------- meta-training
def meta_curves(curves: pd.DataFrame) -> go.Figure:
    """Meta-training: train and held-out loss (left) and accuracy (right), means over tasks, against the step."""
    title = "Meta-training curves (mean over tasks)"
    if curves.empty:
        return empty(title, "no metrics logged")
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy"])
    for col, kind in ((1, "loss"), (2, "acc")):
        for split, color in (("train", PALETTE[0]), ("heldout", PALETTE[1])):
            column = f"{split}_{kind}_mean"
            if column in curves:
                fig.add_scatter(x=curves["step"], y=curves[column], mode="lines+markers", name=split,
                                line_color=color, legendgroup=split, showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text="meta step", row=1, col=col)
    return _finish(fig, title)


def scale_history(sites: pd.DataFrame) -> go.Figure:
    """Meta-training: the mean perturbation scale of every site (layer) against the step."""
    title = "Perturbation scale per layer during meta-training (mean over tasks)"
    if sites.empty:
        return empty(title, "no site statistics logged")
    fig = go.Figure()
    names = sites.drop_duplicates("site_index").sort_values("site_index")
    colors = [f"hsl({int(240 * i / max(1, len(names) - 1))},70%,45%)" for i in range(len(names))]
    for (index, site), color in zip(names[["site_index", "site"]].itertuples(index=False), colors):
        part = sites[sites["site_index"] == index].sort_values("step")
        fig.add_scatter(x=part["step"], y=part["scale"], mode="lines", name=f"{index}: {site}", line_color=color)
    fig.update_xaxes(title_text="meta step")
    fig.update_yaxes(title_text="mean scale")
    return _finish(fig, title, height=460)


def scale_by_layer(final: pd.DataFrame, title: str = "Learned scale per layer (last logged step)") -> go.Figure:
    """Meta-training: the learned mean scale of each site in forward order, error bars = spread over tasks, and
    the standard deviation of the multiplicative noise (right axis)."""
    if final.empty:
        return empty(title, "no site statistics logged")
    final = final.sort_values("site_index")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=final["site_index"], y=final["scale"], mode="lines+markers", name="mean scale",
                    error_y=dict(type="data", array=final["scale_std"].fillna(0), visible=True),
                    text=final["site"], hovertemplate="site %{x} (%{text})<br>scale %{y:.4f}<extra></extra>")
    if "multiplier_std" in final:
        fig.add_scatter(x=final["site_index"], y=final["multiplier_std"], mode="lines+markers",
                        name="std of the noise multiplier", line=dict(dash="dot"), secondary_y=True)
    fig.update_xaxes(title_text="layer (site index, forward order)")
    _integer_ticks(fig, len(final))
    fig.update_yaxes(title_text="mean scale", secondary_y=False)
    fig.update_yaxes(title_text="multiplier std", secondary_y=True)
    return _finish(fig, title)


# ------------------------------------------------------------------------------------------------ accuracy
def metric_bars(table: pd.DataFrame, metric: str = "accuracy", value: str = "mean", error: str = "std",
                title: str | None = None) -> go.Figure:
    """Grouped bars per target, one bar per method, error bars = ``error``, one panel per architecture.

    ``table``: columns arch, target, method, ``value``, ``error`` (as :func:`workbench.study.summarize` gives).
    """
    title = title or f"{metric}: mean ± std over seeds"
    if table.empty:
        return empty(title, "no finished runs")
    archs = sorted(table["arch"].astype(str).unique())
    methods = _method_order(table["method"])
    colors = _method_colors(methods)
    fig = make_subplots(rows=len(archs), cols=1, subplot_titles=archs, vertical_spacing=0.5 / max(2, len(archs)))
    for row, arch in enumerate(archs, start=1):
        part = table[table["arch"].astype(str) == arch]
        for method in methods:
            sub = part[part["method"].astype(str) == method]
            if sub.empty:
                continue
            fig.add_bar(x=sub["target"].astype(str), y=sub[value], name=method, legendgroup=method,
                        showlegend=row == 1, marker_color=colors[method],
                        error_y=dict(type="data", array=sub[error].fillna(0), visible=True), row=row, col=1)
        fig.update_yaxes(title_text=metric, row=row, col=1)
    fig.update_layout(barmode="group")
    return _finish(fig, title, height=max(380, 300 * len(archs)))


def delta_bars(table: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """The difference to Base of the same arch and target, error bars = its standard error."""
    title = f"{metric}: difference to Base (± standard error)"
    if table.empty or "delta_base" not in table or table["delta_base"].notna().sum() == 0:
        return empty(title, "no Base runs to compare with")
    part = table[table["delta_base"].notna()]
    part = part.assign(target=part["target"].astype(str))
    fig = metric_bars(part, f"Δ {metric}", value="delta_base", error="delta_base_se", title=title)
    fig.add_hline(y=0, line_color="#555", line_width=1)
    return fig


# --------------------------------------------------------------------------------------------- calibration
def reliability_diagrams(groups: Mapping[str, Mapping[str, pd.DataFrame]], columns: int = 2) -> go.Figure:
    """One reliability diagram per group (``"arch / target"``), methods overlaid (bins pooled over seeds)."""
    title = "Reliability diagrams (accuracy against confidence; the diagonal is perfect calibration)"
    if not groups:
        return empty(title, "no reliability bins recorded")
    names = list(groups)
    cols = min(columns, len(names))
    rows = (len(names) + cols - 1) // cols
    methods = _method_order([m for g in groups.values() for m in g])
    colors = _method_colors(methods)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=0.35 / max(1, rows))
    for i, name in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#999", dash="dash"), showlegend=False,
                        hoverinfo="skip", row=r, col=c)
        for method in methods:
            bins = groups[name].get(method)
            if bins is None:
                continue
            used = bins[bins["count"] > 0]
            if used.empty:
                continue
            sizes = 5 + 14 * np.sqrt(used["count"].to_numpy() / used["count"].sum())
            fig.add_scatter(x=used["confidence"], y=used["accuracy"], mode="lines+markers", name=method,
                            legendgroup=method, showlegend=method not in [t.name for t in fig.data],
                            line_color=colors[method], marker=dict(size=sizes), customdata=used["count"],
                            hovertemplate=f"{method}<br>confidence %{{x:.3f}}<br>accuracy %{{y:.3f}}"
                                          "<br>examples %{customdata}<extra></extra>", row=r, col=c)
        fig.update_xaxes(range=[0, 1], title_text="confidence", row=r, col=c)
        fig.update_yaxes(range=[0, 1.02], title_text="accuracy" if c == 1 else None, row=r, col=c)
    return _finish(fig, title, height=max(420, 380 * rows))


def robustness_curves(table: pd.DataFrame) -> go.Figure:
    """Accuracy under PGD against the radius eps (0 = clean), one panel per (arch, target, norm), one line per
    method, error bars = std over seeds."""
    title = "Accuracy under PGD attack (mean ± std over seeds)"
    if table.empty:
        return empty(title, "no robustness curves recorded: set robust_targets in the transfer study")
    panels = table[["arch", "target", "norm"]].drop_duplicates().sort_values(["arch", "target", "norm"])
    keys = [tuple(p) for p in panels.itertuples(index=False)]
    methods = _method_order(table["label"])
    colors = _method_colors(methods)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[f"{a} / {t} / {n}" for a, t, n in keys],
                        shared_yaxes=True)
    for col, (arch, target, norm) in enumerate(keys, start=1):
        part = table[(table["arch"] == arch) & (table["target"] == target) & (table["norm"] == norm)]
        for method in methods:
            sub = part[part["label"].astype(str) == method].sort_values("eps")
            if sub.empty:
                continue
            fig.add_scatter(x=sub["eps"], y=sub["mean"], mode="lines+markers", name=method, legendgroup=method,
                            showlegend=col == 1, line_color=colors[method],
                            error_y=dict(type="data", array=sub["std"].fillna(0), visible=True), row=1, col=col)
        fig.update_xaxes(title_text=f"eps ({norm})", row=1, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    return _finish(fig, title)


# ------------------------------------------------------------------------------------------------- scales
def layer_profile(profile: pd.DataFrame) -> go.Figure:
    """The paper's figure: mean perturbation scale per layer (site index), one panel per architecture, one colour
    per target, one dash per phi; error bars = std over seeds."""
    title = "Mean perturbation scale per layer across targets"
    if profile.empty:
        return empty(title, "no scales recorded")
    archs = sorted(profile["arch"].astype(str).unique())
    targets = sorted(profile["target"].astype(str).unique())
    labels = sorted(profile["label"].astype(str).unique())
    colors = _colors(targets)
    fig = make_subplots(rows=1, cols=len(archs), subplot_titles=archs, shared_yaxes=True)
    for col, arch in enumerate(archs, start=1):
        for target in targets:
            for k, label in enumerate(labels):
                sub = profile[(profile["arch"].astype(str) == arch) & (profile["target"].astype(str) == target)
                              & (profile["label"].astype(str) == label)].sort_values("site_index")
                if sub.empty:
                    continue
                name = target if len(labels) == 1 else f"{target} · {label}"
                fig.add_scatter(x=sub["site_index"], y=sub["mean"], mode="lines+markers", name=name,
                                legendgroup=name, showlegend=name not in [t.name for t in fig.data],
                                line=dict(color=colors[target], dash=DASHES[k % len(DASHES)]),
                                error_y=dict(type="data", array=sub["std"].fillna(0), visible=True, thickness=1),
                                text=sub["site"], hovertemplate=f"{name}<br>site %{{x}} (%{{text}})"
                                                                "<br>mean scale %{y:.4f}<extra></extra>",
                                row=1, col=col)
        fig.update_xaxes(title_text="layer (site index)", row=1, col=col)
    _integer_ticks(fig, int(profile["site_index"].max()) + 1)
    fig.update_yaxes(title_text="mean scale", row=1, col=1)
    return _finish(fig, title, height=440)


def scale_heatmaps(heatmaps: Sequence[tuple[str, Sequence[str], np.ndarray]]) -> go.Figure:
    """Per-channel scales, one heatmap per (arch, target, phi): rows = sites in forward order, columns =
    channels (blank where a site has fewer channels). Each heatmap has its own colour scale (phis differ in
    level; :func:`layer_profile` compares levels), so the pattern over layers and channels stays visible."""
    title = "Perturbation scale per layer and channel (each panel on its own colour scale)"
    if not heatmaps:
        return empty(title, "no scales recorded")
    rows = len(heatmaps)
    spacing = min(0.12, 0.6 / rows)
    fig = make_subplots(rows=rows, cols=1, subplot_titles=[t for t, _, _ in heatmaps], vertical_spacing=spacing)
    for row, (_, names, matrix) in enumerate(heatmaps, start=1):
        domain = fig.get_subplot(row, 1).yaxis.domain
        fig.add_trace(go.Heatmap(z=matrix, y=[f"{i}: {n}" for i, n in enumerate(names)], x=np.arange(matrix.shape[1]),
                                 colorscale="Viridis", colorbar=dict(title="scale", y=(domain[0] + domain[1]) / 2,
                                                                     len=domain[1] - domain[0], thickness=14),
                                 hovertemplate="%{y}<br>channel %{x}<br>scale %{z:.4f}<extra></extra>"),
                      row=row, col=1)
        fig.update_yaxes(autorange="reversed", row=row, col=1)
    fig.update_xaxes(title_text="channel", row=rows, col=1)
    sites = sum(len(n) for _, n, _ in heatmaps)
    return _finish(fig, title, height=max(360, 20 * sites + 110 * rows + 80))


__all__ = ["delta_bars", "empty", "layer_profile", "meta_curves", "metric_bars", "reliability_diagrams",
           "robustness_curves", "scale_by_layer", "scale_heatmaps", "scale_history"]
