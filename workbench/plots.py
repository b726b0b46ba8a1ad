"""Plotly figures of the study notebooks and the dashboard, as plain functions of tidy frames (those built by
:mod:`workbench.study` and :mod:`workbench.dashboard_data`).

No file access and no computation beyond arranging traces: each function takes a pandas frame (or a dict of them)
and returns a ``plotly.graph_objects.Figure``; an empty input gives a figure that says what is missing. The
helpers (colours, method order, placeholder, layout) are shared with the dashboard's own charts in ``app/charts.py``.
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
                "finetune_metaperturb", "metaperturb (authors' phi)", "metaperturb (untrained control)")


def label_colors(labels: Sequence[Any]) -> dict[str, str]:
    """One palette colour per label, in the given order."""
    return {str(k): PALETTE[i % len(PALETTE)] for i, k in enumerate(labels)}


def method_colors(labels: Sequence[Any]) -> dict[str, str]:
    """The fixed colour of each method label (:data:`METHOD_ORDER` first, unknown labels alphabetically after)."""
    extra = sorted({str(v) for v in labels} - set(METHOD_ORDER))
    order = list(METHOD_ORDER) + extra
    return {str(v): PALETTE[order.index(str(v)) % len(PALETTE)] for v in labels}


def method_order(labels: Sequence[Any]) -> list[str]:
    """Base first, then the others alphabetically: the order of methods in every figure."""
    return sorted({str(v) for v in labels}, key=lambda m: (m.lower() != "base", m))


def finish_layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    # The legend sits to the right (plotly reserves the room), where long run labels cannot cover the title.
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0, xanchor="left"), height=height,
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(font=dict(size=11)))
    return fig


def empty(title: str, message: str) -> go.Figure:
    """A placeholder figure that says what is missing."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return finish_layout(fig, title, height=240)


def _integer_ticks(fig: go.Figure, count: int) -> None:
    """Site indices are whole numbers: one tick per site while they fit."""
    if count <= 40:
        fig.update_xaxes(tickmode="linear", tick0=0, dtick=1 if count <= 20 else 2)


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
    return finish_layout(fig, title)


def meta_diagnostics(curves: pd.DataFrame, chance: float | None = None, verdict: str | None = None) -> go.Figure:
    """Meta-training diagnostics against the step: the task networks' accuracy against chance; phi's distance from
    its initialisation and from the authors' phi; the meta-gradient's norm and how much the tasks agree on it
    (mean pairwise cosine); the spread of the scale over sites and over channels. ``verdict`` goes in the title."""
    title = "Did phi learn?" + (f" {verdict}" if verdict else "")
    if curves.empty:
        return empty(title, "no metrics logged")
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, subplot_titles=[
        "task networks' accuracy (dotted: chance)", "phi's distance from", "meta-gradient",
        "scale spread (0: the same scale everywhere)"])

    def line(column: str, name: str, color: str, row: int, col: int, dash: str = "solid") -> None:
        if column in curves and curves[column].notna().any():
            fig.add_scatter(x=curves["step"], y=curves[column], mode="lines", name=name, line=dict(color=color, dash=dash),
                            row=row, col=col)

    line("train_acc_mean", "train accuracy", PALETTE[0], 1, 1)
    line("heldout_acc_mean", "held-out accuracy", PALETTE[1], 1, 1)
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="gray", row=1, col=1)
    line("dist_init", "from its initialisation", PALETTE[2], 1, 2)
    line("dist_official", "from the authors' phi", PALETTE[3], 1, 2)
    line("grad_norm", "norm of the mean over tasks", PALETTE[4], 2, 1)
    line("task_grad_norm", "mean norm per task", PALETTE[5], 2, 1, "dash")
    line("grad_cosine", "agreement (mean pairwise cosine)", PALETTE[6], 2, 1, "dot")
    line("scale_site_range", "range over sites", PALETTE[7], 2, 2)
    line("scale_channel_std", "std over channels", PALETTE[8], 2, 2, "dash")
    for row in (1, 2):
        for col in (1, 2):
            fig.update_xaxes(title_text="meta step", row=row, col=col)
    return finish_layout(fig, title, height=640)


def probe_scales(sites: pd.DataFrame, title: str = "phi's scale per site on a fresh network") -> go.Figure:
    """The diagnostics probe: mean scale per site of the final phi, of its initialisation and of the authors' phi."""
    if sites.empty:
        return empty(title, "no diagnostics recorded")
    fig = go.Figure()
    for column, name, dash in (("scale", "final phi", "solid"), ("scale_init", "initial phi", "dot"),
                               ("scale_official", "authors' phi", "dash")):
        if column in sites:
            fig.add_scatter(x=list(range(len(sites))), y=sites[column], mode="lines+markers", name=name,
                            line=dict(dash=dash), text=sites["site"])
    fig.update_xaxes(title_text="site (forward order)")
    fig.update_yaxes(title_text="mean scale s")
    _integer_ticks(fig, len(sites))
    return finish_layout(fig, title)


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
    return finish_layout(fig, title, height=460)


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
    return finish_layout(fig, title)


# ------------------------------------------------------------------------------------------------ accuracy
def metric_bars(table: pd.DataFrame, metric: str = "accuracy", value: str = "mean", error: str = "std",
                title: str | None = None) -> go.Figure:
    """Grouped bars per target, one bar per method (Base first), error bars = ``error``, one panel per
    architecture; the hover gives the number of seeds where ``table`` has a column n.

    ``table``: columns arch, target, method, ``value``, ``error`` (as :func:`workbench.study.summarize` and
    :func:`workbench.dashboard_data.accuracy_table` give).
    """
    title = title or f"{metric}: mean ± std over seeds"
    if table.empty:
        return empty(title, "no finished runs")
    archs = sorted(table["arch"].astype(str).unique())
    methods = method_order(table["method"])
    colors = method_colors(methods)
    fig = make_subplots(rows=len(archs), cols=1, subplot_titles=archs, vertical_spacing=min(0.12, 0.5 / len(archs)))
    for row, arch in enumerate(archs, start=1):
        part = table[table["arch"].astype(str) == arch]
        for method in methods:
            sub = part[part["method"].astype(str) == method]
            if sub.empty:
                continue
            fig.add_bar(x=sub["target"].astype(str).tolist(), y=sub[value].tolist(), name=method, legendgroup=method,
                        showlegend=row == 1, marker_color=colors[method],
                        error_y=dict(type="data", array=sub[error].fillna(0).tolist(), visible=True),
                        customdata=sub["n"].tolist() if "n" in sub else ["?"] * len(sub),
                        hovertemplate=f"{method}<br>%{{x}}: %{{y:.4f}} ± %{{error_y.array:.4f}}"
                                      "<br>seeds: %{customdata}<extra></extra>", row=row, col=1)
        fig.update_yaxes(title_text=metric, row=row, col=1)
    fig.update_layout(barmode="group")
    return finish_layout(fig, title, height=max(380, 300 * len(archs)))


def delta_bars(table: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """The difference to Base of the same arch and target, one bar per other method, error bars = its standard
    error (Base rows have no difference: their delta_base is missing)."""
    title = f"{metric}: difference to Base (± standard error)"
    if table.empty or "delta_base" not in table or table["delta_base"].notna().sum() == 0:
        return empty(title, "no Base runs to compare with")
    fig = metric_bars(table[table["delta_base"].notna()], f"Δ {metric}", value="delta_base", error="delta_base_se",
                      title=title)
    fig.add_hline(y=0, line_color="#555", line_width=1)
    return fig


# --------------------------------------------------------------------------------------------- calibration
def _add_reliability(fig: go.Figure, bins: Mapping[str, pd.DataFrame], colors: Mapping[str, str], shown: set[str],
                     **cell: int) -> None:
    """Draw the diagonal and one curve per label into one panel (``cell``: its row and col in a grid), marker area
    growing with the examples in a bin; ``shown`` collects the names already in the legend."""
    diagonal = "perfect calibration"
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name=diagonal, line=dict(color="#999", dash="dash"),
                    legendgroup=diagonal, showlegend=diagonal not in shown, hoverinfo="skip", **cell)
    shown.add(diagonal)
    for label, frame in bins.items():
        used = frame[frame["count"] > 0]
        if used.empty:
            continue
        sizes = (5 + 14 * np.sqrt(used["count"].to_numpy() / used["count"].sum())).tolist()
        fig.add_scatter(x=used["confidence"].tolist(), y=used["accuracy"].tolist(), mode="lines+markers", name=label,
                        legendgroup=label, showlegend=label not in shown, line_color=colors[label],
                        marker=dict(size=sizes), customdata=used["count"].to_numpy(),
                        hovertemplate=f"{label}<br>confidence %{{x:.3f}}<br>accuracy %{{y:.3f}}"
                                      "<br>examples %{customdata}<extra></extra>", **cell)
        shown.add(label)
    fig.update_xaxes(range=[0, 1], title_text="confidence", **cell)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy" if cell.get("col", 1) == 1 else None, **cell)


def reliability_diagram(bins: Mapping[str, pd.DataFrame], title: str = "Reliability diagram") -> go.Figure:
    """Overlaid reliability curves (accuracy against confidence per bin) with the diagonal of perfect calibration.

    ``bins`` maps a method label to a frame with columns confidence, accuracy, count.
    """
    if not bins:
        return empty(title, "no reliability bins recorded")
    fig = go.Figure()
    _add_reliability(fig, bins, method_colors(list(bins)), set())
    return finish_layout(fig, title, height=460)


def reliability_diagrams(groups: Mapping[str, Mapping[str, pd.DataFrame]], columns: int = 2) -> go.Figure:
    """One reliability diagram per group (``"arch / target"``), methods overlaid (bins pooled over seeds)."""
    title = "Reliability diagrams (accuracy against confidence; the diagonal is perfect calibration)"
    if not groups:
        return empty(title, "no reliability bins recorded")
    names = list(groups)
    cols = min(columns, len(names))
    rows = (len(names) + cols - 1) // cols
    methods = method_order([m for g in groups.values() for m in g])
    colors = method_colors(methods)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=0.35 / max(1, rows))
    shown: set[str] = set()
    for i, name in enumerate(names):
        bins = {method: groups[name][method] for method in methods if method in groups[name]}
        _add_reliability(fig, bins, colors, shown, row=i // cols + 1, col=i % cols + 1)
    return finish_layout(fig, title, height=max(420, 380 * rows))


def robustness_curves(table: pd.DataFrame) -> go.Figure:
    """Accuracy under PGD against the radius eps (0 = clean), one panel per (arch, target, norm), one line per
    method label, error bars = std over seeds.

    ``table``: columns arch, target, norm, label, eps, mean, std (as :func:`workbench.study.robustness_table`
    gives).
    """
    title = "Accuracy under PGD attack (mean ± std over seeds)"
    if table.empty:
        return empty(title, "no robustness curves recorded: set robust_targets in the transfer study")
    panels = table[["arch", "target", "norm"]].drop_duplicates().sort_values(["arch", "target", "norm"])
    keys = [tuple(p) for p in panels.itertuples(index=False)]
    methods = method_order(table["label"])
    colors = method_colors(methods)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[f"{a} / {t} / {n}" for a, t, n in keys],
                        shared_yaxes=True)
    for col, (arch, target, norm) in enumerate(keys, start=1):
        part = table[(table["arch"] == arch) & (table["target"] == target) & (table["norm"] == norm)]
        for method in methods:
            sub = part[part["label"].astype(str) == method].sort_values("eps")
            if sub.empty:
                continue
            fig.add_scatter(x=sub["eps"].tolist(), y=sub["mean"].tolist(), mode="lines+markers", name=method,
                            legendgroup=method, showlegend=col == 1, line_color=colors[method],
                            error_y=dict(type="data", array=sub["std"].fillna(0).tolist(), visible=True),
                            row=1, col=col)
        fig.update_xaxes(title_text=f"eps ({norm})", row=1, col=col)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    return finish_layout(fig, title)


# ------------------------------------------------------------------------------------------------- scales
def layer_profile(profile: pd.DataFrame, color: str = "target", dash: str = "label") -> go.Figure:
    """The paper's figure: mean perturbation scale per layer (site index), one panel per architecture, one colour
    per ``color`` value, one dash per ``dash`` value (where ``profile`` has that column); error bars = std over
    seeds.

    ``profile``: columns arch, ``color``, site_index, site, mean, std (as :func:`workbench.study.scale_data` and
    :func:`workbench.dashboard_data.layer_profile` give).
    """
    title = f"Mean perturbation scale per layer across {color}s"
    if profile.empty:
        return empty(title, "no scales recorded")
    archs = sorted(profile["arch"].astype(str).unique())
    groups = sorted(profile[color].astype(str).unique())
    styles = sorted(profile[dash].astype(str).unique()) if dash in profile else [None]
    colors = label_colors(groups)
    fig = make_subplots(rows=1, cols=len(archs), subplot_titles=archs, shared_yaxes=True)
    for col, arch in enumerate(archs, start=1):
        part = profile[profile["arch"].astype(str) == arch]
        for group in groups:
            for k, style in enumerate(styles):
                sub = part[part[color].astype(str) == group]
                if style is not None:
                    sub = sub[sub[dash].astype(str) == style]
                if sub.empty:
                    continue
                sub = sub.sort_values("site_index")
                name = group if len(styles) == 1 else f"{group} · {style}"
                fig.add_scatter(x=sub["site_index"].tolist(), y=sub["mean"].tolist(), mode="lines+markers", name=name,
                                legendgroup=name, showlegend=name not in [t.name for t in fig.data],
                                line=dict(color=colors[group], dash=DASHES[k % len(DASHES)]),
                                error_y=dict(type="data", array=sub["std"].fillna(0).tolist(), visible=True,
                                             thickness=1),
                                text=sub["site"].astype(str).tolist(),
                                hovertemplate=f"{name}<br>site %{{x}} (%{{text}})<br>mean scale %{{y:.4f}}"
                                              "<extra></extra>", row=1, col=col)
        fig.update_xaxes(title_text="layer (site index)", row=1, col=col)
    _integer_ticks(fig, int(profile["site_index"].max()) + 1)
    fig.update_yaxes(title_text="mean scale", row=1, col=1)
    return finish_layout(fig, title, height=440)


def _scale_heatmap_trace(site_names: Sequence[str], matrix: np.ndarray, **colorbar: Any) -> go.Heatmap:
    """Rows = sites in forward order, columns = channels (blank where a site has fewer channels)."""
    return go.Heatmap(z=matrix, y=[f"{i}: {name}" for i, name in enumerate(site_names)], x=np.arange(matrix.shape[1]),
                      colorscale="Viridis", colorbar=dict(title="scale", **colorbar),
                      hovertemplate="site %{y}<br>channel %{x}<br>scale %{z:.4f}<extra></extra>")


def scale_heatmap(site_names: Sequence[str], matrix: np.ndarray,
                  title: str = "Perturbation scale per channel") -> go.Figure:
    """One run's per-channel scales: one row per site (forward order), one column per channel."""
    if matrix.size == 0:
        return empty(title, "this run recorded no scales")
    fig = go.Figure(_scale_heatmap_trace(site_names, matrix))
    fig.update_yaxes(autorange="reversed", title_text="site (forward order)")
    fig.update_xaxes(title_text="channel")
    return finish_layout(fig, title, height=max(320, 26 * len(site_names) + 120))


def scale_heatmaps(heatmaps: Sequence[tuple[str, Sequence[str], np.ndarray]]) -> go.Figure:
    """Per-channel scales, one heatmap per (arch, target, phi) as in :func:`scale_heatmap`. Each heatmap has its own
    colour scale (phis differ in level; :func:`layer_profile` compares levels), so the pattern over layers and
    channels stays visible."""
    title = "Perturbation scale per layer and channel (each panel on its own colour scale)"
    if not heatmaps:
        return empty(title, "no scales recorded")
    rows = len(heatmaps)
    spacing = min(0.12, 0.6 / rows)
    fig = make_subplots(rows=rows, cols=1, subplot_titles=[t for t, _, _ in heatmaps], vertical_spacing=spacing)
    for row, (_, names, matrix) in enumerate(heatmaps, start=1):
        domain = fig.get_subplot(row, 1).yaxis.domain
        fig.add_trace(_scale_heatmap_trace(names, matrix, y=(domain[0] + domain[1]) / 2, len=domain[1] - domain[0],
                                           thickness=14), row=row, col=1)
        fig.update_yaxes(autorange="reversed", row=row, col=1)
    fig.update_xaxes(title_text="channel", row=rows, col=1)
    sites = sum(len(n) for _, n, _ in heatmaps)
    return finish_layout(fig, title, height=max(360, 20 * sites + 110 * rows + 80))


__all__ = ["DASHES", "METHOD_ORDER", "PALETTE", "TEMPLATE", "delta_bars", "empty", "finish_layout", "label_colors",
           "layer_profile", "meta_curves", "method_colors", "method_order", "metric_bars", "reliability_diagram",
           "reliability_diagrams", "robustness_curves", "scale_by_layer", "scale_heatmap", "scale_heatmaps",
           "scale_history"]
