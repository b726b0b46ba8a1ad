"""Studies and runs: what exists, its status (corrupt ones with their reason), parameters, and the links between a
study, its runs and its executed notebook."""

import pandas as pd
import streamlit as st

import charts
import ui
from workbench import results
from workbench.errors import WorkbenchError

RUN_COLUMNS = ["run_id", "kind", "status", "reason", "notice", "source", "target", "arch", "label", "seed",
               "study_id", "created", results.ACCURACY_KEY, results.ECE_KEY]


def _counts(ctx: ui.Context) -> None:
    status = ctx.runs["status"].value_counts()
    cols = st.columns(7)
    cols[0].metric("runs", len(ctx.runs))
    for col, name in zip(cols[1:6], ("finished", "running", "failed", "stale", "corrupt")):
        col.metric(name, int(status.get(name, 0)))
    cols[6].metric("studies", len(ctx.studies))


def _problems(ctx: ui.Context) -> None:
    rows = [{"where": f"runs/{r.run_id}", "status": r.status, "reason": r.reason}
            for r in ctx.runs[ctx.runs["status"] == "corrupt"].itertuples()]
    rows += [{"where": f"studies/{r.study_id}", "status": r.status, "reason": r.reason}
             for r in ctx.studies[ctx.studies["status"] == "corrupt"].itertuples()]
    rows += [{"where": r.entry, "status": "foreign", "reason": r.reason} for r in ctx.foreign.itertuples()]
    if not rows:
        return
    st.warning(f"{len(rows)} entries of the artifacts root cannot be read as runs or studies; they are listed here "
               "and left out everywhere else.")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="problems")


def _notices(ctx: ui.Context) -> None:
    """Readable runs that lack files their stage always writes (a finished transfer run without its predictions)."""
    if "notice" not in ctx.runs:
        return
    noted = ctx.runs[(ctx.runs["status"] != "corrupt") & (ctx.runs["notice"].fillna("").astype(str) != "")]
    if noted.empty:
        return
    st.info(f"{len(noted)} runs lack arrays their stage always writes; they are shown where their other files "
            "suffice and left out of the plots that need the missing ones.")
    st.dataframe(pd.DataFrame({"where": [f"runs/{r}" for r in noted["run_id"]], "status": noted["status"].tolist(),
                               "notice": noted["notice"].tolist()}), hide_index=True, key="notices")


def _studies(ctx: ui.Context) -> None:
    st.header("Studies")
    if ctx.studies.empty:
        st.caption("No studies yet (`workbench study run NOTEBOOK --profile smoke` makes one).")
        return
    shown = ctx.studies[["study_id", "status", "reason", "notebook", "profile", "created", "finished", "runs",
                         "executed_notebook"]]
    st.dataframe(shown, hide_index=True, key="studies_table")
    ok = ctx.studies[ctx.studies["status"] != "corrupt"]
    if ok.empty:
        return
    ids = ok["study_id"].tolist()
    wanted = ui.query_id("study", "study id")
    if wanted is not None and wanted not in ids:
        st.warning(f"`?study={wanted}` is not a readable study here")
    chosen = st.selectbox("Study", ids, index=ids.index(wanted) if wanted in ids else len(ids) - 1, key="study_pick")
    study = ok[ok["study_id"] == chosen].iloc[0]
    left, right = st.columns([1, 2])
    with left:
        st.markdown(f"**{study['study_id']}** · status **{study['status']}**"
                    + (f" · {study['reason']}" if study["reason"] else ""))
        st.markdown(f"Notebook `{study['notebook']}` · profile `{study['profile']}`")
        st.json(study["parameters"], expanded=False)
        executed = study["executed_notebook"]
        if isinstance(executed, str) and executed:
            st.markdown(f"Executed notebook: `{executed}` (inside the artifacts root)")
            data, error = ui.attempt(ui.load_notebook, ctx.root_str, executed)
            if error:
                st.warning(error)
            else:
                st.download_button("Download the executed notebook", data, file_name=executed.rsplit("/", 1)[-1],
                                   mime="application/x-ipynb+json", key="download_notebook")
        else:
            st.caption("No executed notebook saved (yet).")
    with right:
        members = set(study["run_ids"])
        runs = ctx.runs[ctx.runs["run_id"].isin(members) | (ctx.runs["study_id"] == chosen)]
        st.markdown(f"**{len(runs)} runs** of this study")
        st.dataframe(runs[[c for c in RUN_COLUMNS if c in runs]], hide_index=True, key="study_runs",
                     column_config=_column_config())
        missing = members - set(ctx.runs["run_id"])
        if missing:
            st.warning(f"{len(missing)} runs listed by the study are missing from runs/: {', '.join(sorted(missing)[:3])}")


def _column_config() -> dict:
    return {results.ACCURACY_KEY: st.column_config.NumberColumn("test accuracy", format="%.4f"),
            results.ECE_KEY: st.column_config.NumberColumn("test ECE", format="%.4f"),
            "label": "method", "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm")}


def _run_details(ctx: ui.Context, view: pd.DataFrame) -> None:
    st.subheader("One run")
    readable = ui.latest_first(view[view["status"] != "corrupt"])
    typed = st.text_input("Run id (or pick one below)", key="run_id_text", placeholder="e.g. 20261126-...-ab12")
    run_id = None
    if typed.strip():
        try:
            run_id = results.check_id(typed.strip(), "run id")
        except WorkbenchError as exc:
            st.error(f"Refused: {exc}")
        else:
            if run_id not in set(ctx.runs["run_id"]):
                st.error(f"No run {run_id!r} in this artifacts root.")
                run_id = None
    if run_id is None:
        run_id = ui.pick_run(readable, "Run", key="run_pick")
    if run_id is None:
        return
    record = ctx.runs[ctx.runs["run_id"] == run_id].iloc[0]
    if record["status"] == "corrupt":
        st.error(f"runs/{run_id} is corrupt: {record['reason']}")
        return
    details, error = ui.attempt(ui.load_details, ctx.root_str, run_id)
    if error:
        st.error(error)
        return
    st.query_params["run"] = run_id
    st.markdown(f"**{details.run_id}** · kind **{details.kind}** · status **{details.status}**"
                + (f" · {details.reason}" if details.reason else "") + f" · folder `{details.path}`")
    if details.notice:
        st.warning(f"runs/{run_id}: {details.notice}")
    if details.study_id:
        st.markdown(f"Produced by study **{details.study_id}** (select it above to see its notebook and runs).")
    cols = st.columns(3)
    with cols[0]:
        st.markdown("**Tags**")
        st.json(details.tags)
        st.markdown("**Files**")
        st.markdown(f"arrays: {', '.join(details.arrays) or '—'}  \nrecords: {', '.join(details.records) or '—'}"
                    f"  \ncheckpoints: {', '.join(details.checkpoints) or '—'}")
    with cols[1]:
        st.markdown("**Summary**")
        st.json(details.summary, expanded=True)
    with cols[2]:
        st.markdown("**Config**")
        st.json(details.config, expanded=False)
    if details.kind in (results.KIND_TRANSFER, results.KIND_META, results.KIND_SOURCE):
        st.caption("Curves of this run: page *Curves and robustness*; its scales: page *Per-layer scales*.")


def render() -> None:
    st.title("Studies and runs")
    ctx = ui.context()
    if ctx.empty:
        ui.how_to("runs", ctx)
        return
    _counts(ctx)
    _problems(ctx)
    _notices(ctx)
    st.plotly_chart(charts.status_overview(ctx.view), key="status_chart")
    _studies(ctx)
    st.header("Runs")
    view = ui.latest_first(ctx.view)
    st.caption(f"{len(view)} runs (newest first; click a column header to sort).")
    st.dataframe(view[[c for c in RUN_COLUMNS if c in view]], hide_index=True, key="runs_table",
                 column_config=_column_config())
    with st.expander("All columns (tags, summary metrics)"):
        st.dataframe(view, hide_index=True, key="runs_table_all")
    _run_details(ctx, view)


render()
