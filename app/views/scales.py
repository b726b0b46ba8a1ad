"""Per-layer perturbation scales: one run's sites x channels, the mean scale per layer across targets and
architectures (the paper's figure), and phi's scale and noise statistics during meta-training."""

import pandas as pd
import streamlit as st

import charts
import ui
from workbench import results

MAX_PROFILE_RUNS = 400


def _with_scales(view: pd.DataFrame) -> pd.DataFrame:
    runs = results.finished(view, results.KIND_TRANSFER)
    if results.SITES_KEY not in runs:
        return runs.iloc[0:0]
    return ui.latest_first(runs[runs[results.SITES_KEY].notna()])


def _one_run(ctx: ui.Context, runs: pd.DataFrame) -> None:
    st.header("One run: scale per site and channel")
    run_id = ui.pick_run(runs, "MetaPerturb run", key="scale_run")
    scales, error = ui.attempt(ui.load_site_scales, ctx.root_str, run_id)
    if error:
        st.warning(error)
        return
    if scales is None:
        st.info("This run recorded no site scales.")
        return
    st.query_params["run"] = run_id
    row = runs[runs["run_id"] == run_id].iloc[0]
    st.plotly_chart(charts.scale_heatmap(scales["site_names"], scales["scale"],
                                         f"Scale s per channel · {ui.run_label(row)}"), key="scale_heatmap")
    noise = pd.DataFrame({"site_index": range(len(scales["site_names"])), "site": scales["site_names"],
                          "multiplier mean": scales["multiplier_mean"], "multiplier std": scales["multiplier_std"],
                          "channels": scales["channels"]})
    with st.expander("Noise multiplier s·z per site (test-set averages)"):
        st.dataframe(noise, hide_index=True, key="noise_table")


def _across_runs(ctx: ui.Context, runs: pd.DataFrame) -> None:
    st.header("Across runs: mean scale per layer")
    # One phi at a time: scales of different phis (the authors', each meta-training run's) are not comparable.
    counts = runs["label"].value_counts()
    variants = sorted(counts.index, key=lambda v: (-counts[v], v))
    cols = st.columns(2)
    variant = cols[0].selectbox("Method and phi", variants, key="profile_variant",
                                format_func=lambda v: f"{v} ({counts[v]} runs)")
    color = cols[1].radio("One line per", ["target", "seed"], horizontal=True, key="profile_color")
    chosen = runs[runs["label"] == variant].head(MAX_PROFILE_RUNS)
    if int(counts[variant]) > MAX_PROFILE_RUNS:
        st.caption(f"Using the newest {MAX_PROFILE_RUNS} of {counts[variant]} runs; narrow the filters to choose.")
    values, problems = ui.load_many(ui.load_site_scales, ctx.root_str, chosen["run_id"].tolist())
    ui.show_problems(problems, "scale files")
    rows = chosen.set_index("run_id")
    items = [({"run_id": rid, **rows.loc[rid].to_dict()}, scales) for rid, scales in values.items()]
    profile = results.layer_profile(items, color=color)
    st.plotly_chart(charts.layer_profile(profile, color=color), key="scale_profile")
    st.caption(f"{len(items)} runs · per run the mean of s over each site's channels, then mean ± std over runs.")


def _meta(ctx: ui.Context) -> None:
    stats = ui.meta_section(ctx, "phi during meta-training: scale and noise statistics", "meta_scale_run",
                            ui.load_meta_site_stats)
    if stats is ui.NOTHING:
        return
    if stats is None:
        st.info("This run has not written its site statistics yet (they come with each checkpoint).")
        return
    cols = st.columns(2)
    with cols[0]:
        st.plotly_chart(charts.series_lines(stats, "step", "scale_mean", "site", "Mean scale per site (mean over tasks)",
                                            "scale"), key="meta_scale")
    with cols[1]:
        if "multiplier_std" in stats:
            st.plotly_chart(charts.series_lines(stats, "step", "multiplier_std", "site",
                                                "Noise multiplier s·z: std per site", "std of s·z"), key="meta_noise")


def render() -> None:
    st.title("Per-layer perturbation scales")
    ctx = ui.context()
    runs = _with_scales(ctx.view)
    has_meta = not ctx.view[ctx.view["kind"] == results.KIND_META].empty
    if runs.empty and not has_meta:
        ui.how_to("scales", ctx)
        return
    if not runs.empty:
        _one_run(ctx, runs)
        _across_runs(ctx, runs)
    _meta(ctx)


render()
