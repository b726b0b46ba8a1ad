"""Calibration: overlaid reliability diagrams per method (seeds pooled), ECE tables, confidence histograms."""

import numpy as np
import pandas as pd
import streamlit as st

import charts
import ui
from workbench import dashboard_data as dd
from workbench import results
from workbench.errors import WorkbenchError

MAX_RUNS = 200


def render() -> None:
    ctx, runs = ui.page_start("Calibration", "calibration")
    if runs is None:
        return
    if results.ECE_KEY in runs:
        st.header("ECE over seeds")
        table = results.accuracy_table(runs, results.ECE_KEY)
        st.dataframe(table.drop(columns=["seeds"]), hide_index=True, key="ece_table", column_config={
            "mean": st.column_config.NumberColumn("ECE (15 bins)", format="%.4f"),
            "std": st.column_config.NumberColumn("std over seeds", format="%.4f"),
            "n": "seeds",
            "delta_base": st.column_config.NumberColumn("Δ Base", format="%+.4f", help="negative: better calibrated"),
            "delta_base_se": st.column_config.NumberColumn("± se", format="%.4f"),
        })

    st.header("Reliability diagram")
    cols = st.columns(2)
    archs = dd.options(runs, "arch")
    arch = cols[0].selectbox("Architecture", archs, key="cal_arch") if archs else None
    part = runs if arch is None else runs[runs["arch"].astype(str) == str(arch)]
    targets = dd.options(part, "target")
    target = cols[1].selectbox("Target", targets, key="cal_target") if targets else None
    if target is not None:
        part = part[part["target"].astype(str) == str(target)]
    part = ui.latest_first(part).head(MAX_RUNS)
    bins_by_run, problems = ui.load_many(ui.load_reliability, ctx.root_str, part["run_id"].tolist())
    conf_by_run, problems_conf = ui.load_many(ui.load_confidences, ctx.root_str, part["run_id"].tolist())
    ui.show_problems(problems + problems_conf, "calibration files")
    ui.show_notices(part)
    labels = part.set_index("run_id")["label"]
    pooled, confidences, rows = {}, {}, []
    for label in charts.method_order(labels[list(bins_by_run)]) if bins_by_run else []:
        ids = [rid for rid in bins_by_run if labels[rid] == label]
        try:
            pooled[label] = results.pool_bins([bins_by_run[rid] for rid in ids])
        except WorkbenchError as exc:  # different bin edges between runs
            st.warning(f"{label}: {exc}")
            continue
        per_run = [results.ece(bins_by_run[rid]) for rid in ids]
        rows.append({"method": label, "runs": len(ids), "ECE of pooled bins": results.ece(pooled[label]),
                     "mean ECE": float(np.mean(per_run)), "std ECE": float(np.std(per_run, ddof=1)) if len(ids) > 1 else 0.0,
                     "examples": int(pooled[label]["count"].sum())})
        found = [conf_by_run[rid] for rid in ids if rid in conf_by_run]
        if found:
            confidences[label] = np.concatenate(found)
    title = " · ".join(str(v) for v in (arch, target) if v is not None)
    st.plotly_chart(charts.reliability_diagram(pooled, f"Reliability diagram · {title} (seeds pooled)"),
                    key="reliability")
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="ece_pooled", column_config={
            "ECE of pooled bins": st.column_config.NumberColumn(format="%.4f"),
            "mean ECE": st.column_config.NumberColumn(format="%.4f"),
            "std ECE": st.column_config.NumberColumn(format="%.4f")})
    st.plotly_chart(charts.confidence_histogram(confidences, pooled, f"Confidence of the predictions · {title}"),
                    key="confidence_hist")


render()
