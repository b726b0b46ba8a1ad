"""Training curves (transfer and meta-training) and robustness (accuracy under PGD against epsilon)."""

import pandas as pd
import streamlit as st

import charts
import ui
from workbench import dashboard_data as dd
from workbench import plots, results

MAX_CURVES = 12
MAX_ROBUST_RUNS = 200
STAGE_STYLES = {results.STAGE_TRAIN: "solid", results.STAGE_TEST: "dash", results.STAGE_FINAL: "dot"}
SPLIT_STYLES = {"train": "solid", "held-out": "dash"}


def _default_runs(runs: pd.DataFrame, wanted: str | None) -> list[str]:
    """``?run=`` if it is offered, else one run per method of the newest run's architecture and target."""
    ids = runs["run_id"].tolist()
    if wanted in ids:
        return [wanted]
    if runs.empty:
        return []
    first = runs.iloc[0]
    same = runs[(runs["arch"].astype(str) == str(first["arch"])) & (runs["target"].astype(str) == str(first["target"]))]
    return same.drop_duplicates("label")["run_id"].head(6).tolist()


def _transfer_curves(ctx: ui.Context) -> None:
    runs = ui.latest_first(ctx.view[ctx.view["kind"].isin([results.KIND_TRANSFER, results.KIND_SOURCE])
                                    & (ctx.view["status"] != "corrupt")])
    if runs.empty:
        return
    st.header("Training curves")
    names = {row["run_id"]: ui.run_label(row) for row in runs.to_dict("records")}
    wanted = ui.query_id("run", "run id")
    chosen = st.multiselect("Runs", list(names), default=_default_runs(runs, wanted), key="curve_runs",
                            format_func=lambda rid: names.get(rid, rid), max_selections=MAX_CURVES)
    frames, problems = ui.load_many(ui.load_metrics, ctx.root_str, chosen)
    ui.show_problems(problems, "metric files")
    if not frames:
        st.info("Pick runs above to see their curves.")
        return
    data = pd.concat([f.assign(run=names[rid]) for rid, f in frames.items() if not f.empty], ignore_index=True) \
        if any(not f.empty for f in frames.values()) else pd.DataFrame()
    if data.empty:
        st.info("The selected runs have logged no metrics yet.")
        return
    train = data[data["stage"] == results.STAGE_TRAIN]
    evals = data[data["stage"].isin([results.STAGE_TRAIN, results.STAGE_TEST, results.STAGE_FINAL])]
    # full width: run labels are long and the legend needs the room
    st.plotly_chart(charts.series_lines(train, "step", "loss", "run", "Training loss"), key="curve_loss")
    st.plotly_chart(charts.series_lines(evals, "step", "accuracy", "run",
                                        "Accuracy (train: solid, test: dashed, final: dotted)", dash="stage",
                                        dash_styles=STAGE_STYLES), key="curve_acc")


def _meta_curves(ctx: ui.Context) -> None:
    frame = ui.meta_section(ctx, "Meta-training", "meta_curve_run", ui.load_metrics)
    if frame is ui.NOTHING:
        return
    tasks = frame[frame["stage"] == results.STAGE_META] if "stage" in frame else frame.iloc[0:0]
    if tasks.empty:
        st.info("This run has logged no meta-training steps yet.")
        return
    tasks = tasks.assign(task=tasks["task"].map(lambda t: f"task {int(t)}" if pd.notna(t) else "?"))
    cols = st.columns(2)
    with cols[0]:
        long = pd.concat([tasks.assign(split="train", value=tasks.get("train_loss")),
                          tasks.assign(split="held-out", value=tasks.get("heldout_loss"))])
        st.plotly_chart(charts.series_lines(long, "step", "value", "task", "Loss per task (train: solid, held-out: dashed)",
                                            "loss", dash="split", dash_styles=SPLIT_STYLES), key="meta_loss")
    with cols[1]:
        long = pd.concat([tasks.assign(split="train", value=tasks.get("train_acc")),
                          tasks.assign(split="held-out", value=tasks.get("heldout_acc"))])
        st.plotly_chart(charts.series_lines(long, "step", "value", "task",
                                            "Accuracy per task (train: solid, held-out: dashed)", "accuracy",
                                            dash="split", dash_styles=SPLIT_STYLES), key="meta_acc")
    phi = frame[frame["stage"] == results.STAGE_PHI]
    if not phi.empty and "grad_norm" in phi:
        st.plotly_chart(charts.series_lines(phi.assign(run="phi"), "step", "grad_norm", "run",
                                            "Norm of phi's meta-gradient", "gradient norm"), key="meta_grad")
    run_id = st.session_state.get("meta_curve_run")
    if run_id:
        _phi_verdict(ctx, run_id, phi)


def _phi_verdict(ctx: ui.Context, run_id: str, phi: pd.DataFrame) -> None:
    """Whether the run's phi learned, the diagnostics over the steps, and the end-of-run probe per site."""
    found, error = ui.attempt(results.phi_diagnostics, ctx.root_str, run_id)
    if error:
        st.warning(error)
        return
    st.subheader("Did phi learn?")
    if found["learned"]:
        st.success(f"phi {found['message']}")
    else:
        st.warning(f"phi {found['message']}")
    if not phi.empty:
        st.plotly_chart(plots.meta_diagnostics(phi, found["chance"]), key="meta_diagnostics")
    if found["record"]:
        sites = pd.DataFrame(found["record"]["sites"])
        st.plotly_chart(plots.probe_scales(sites), key="meta_probe")
        with st.expander("Probe values per site"):
            st.dataframe(sites, hide_index=True, key="meta_probe_table")


def _robustness(ctx: ui.Context) -> None:
    runs = results.finished(ctx.view, results.KIND_TRANSFER)
    robust_cols = [c for c in runs.columns if c.startswith(results.ROBUST_PREFIX)]
    if robust_cols:
        runs = runs[runs[robust_cols].notna().any(axis=1)]
    else:
        runs = runs.iloc[0:0]
    st.header("Robustness: accuracy under PGD")
    if runs.empty:
        st.info("No finished transfer run with robustness curves among the selected runs; add "
                "`--set robust_norms=[linf,l2]` to `workbench transfer` to record them.")
        return
    cols = st.columns(2)
    archs = dd.options(runs, "arch")
    arch = cols[0].selectbox("Architecture", archs, key="rob_arch")
    part = runs[runs["arch"].astype(str) == str(arch)]
    target = cols[1].selectbox("Target", dd.options(part, "target"), key="rob_target")
    part = ui.latest_first(part[part["target"].astype(str) == str(target)]).head(MAX_ROBUST_RUNS)
    curves, problems = ui.load_many(ui.load_robustness, ctx.root_str, part["run_id"].tolist())
    ui.show_problems(problems, "robustness files")
    labels = part.set_index("run_id")["label"]
    if not curves:
        st.info("The selected runs' robustness files are missing.")
        return
    data = pd.concat([c.assign(arch=str(arch), target=str(target), label=labels[rid]) for rid, c in curves.items()],
                     ignore_index=True)
    table = data.groupby(["arch", "target", "label", "norm", "eps"]).agg(
        mean=("accuracy", "mean"), std=("accuracy", "std"), n=("accuracy", "count")).reset_index()
    table["std"] = table["std"].fillna(0.0)
    st.plotly_chart(charts.robustness_curves(table), key="robustness")
    with st.expander("Values (mean ± std over seeds)"):
        st.dataframe(table, hide_index=True, key="robust_table")


def render() -> None:
    ctx, usable = ui.page_start("Training curves and robustness", "curves", lambda ctx: ctx.view[
        ctx.view["kind"].isin([results.KIND_TRANSFER, results.KIND_SOURCE, results.KIND_META])
        & (ctx.view["status"] != "corrupt")])
    if usable is None:
        return
    _transfer_curves(ctx)
    _meta_curves(ctx)
    _robustness(ctx)


render()
