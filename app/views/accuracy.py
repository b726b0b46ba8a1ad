"""Accuracy across target tasks: methods x targets (x architectures), mean and spread over seeds, difference to Base."""

import streamlit as st

import charts
import ui
from workbench import dashboard_data as dd
from workbench import results


def render() -> None:
    ctx, runs = ui.page_start("Accuracy across target tasks", "accuracy")
    if runs is None:
        return
    metrics = dd.metric_columns(runs)
    names = ui.summary_names(metrics)
    default = metrics.index(results.ACCURACY_KEY) if results.ACCURACY_KEY in metrics else 0
    metric = st.selectbox("Metric (from each run's summary.json)", metrics, index=default, key="acc_metric",
                          format_func=lambda c: names[c])
    label = names[metric]
    table = results.accuracy_table(runs, metric)
    if table.empty:
        st.info(f"No finished transfer run among the selected ones records {label}.")
        return
    st.caption(f"{int(table['n'].sum())} finished transfer runs · mean and sample standard deviation over seeds · "
               "Δ Base: difference of the means to Base on the same architecture and target, ± its standard error")
    st.dataframe(
        table, hide_index=True, key="acc_table",
        column_config={
            "mean": st.column_config.NumberColumn(label, format="%.4f"),
            "std": st.column_config.NumberColumn("std over seeds", format="%.4f"),
            "n": st.column_config.NumberColumn("seeds", help="number of runs averaged"),
            "seeds": "seed values",
            "delta_base": st.column_config.NumberColumn("Δ Base", format="%+.4f"),
            "delta_base_se": st.column_config.NumberColumn("± se", format="%.4f"),
        },
    )
    regime = results.regime_table(runs)
    if not regime.empty:
        st.subheader("Does Base overfit here?")
        st.caption(f"Base's final network on its own training images (summary train_eval_accuracy) and on the test "
                   f"split, means over seeds; a gap below {results.OVERFIT_GAP:.0%} is marked underfit: a regularizer "
                   "cannot help there. 'unknown': runs made before the training-set evaluation existed.")
        underfit = regime[regime["regime"] == results.UNDERFIT]
        if not underfit.empty:
            cells = ", ".join(f"{r.arch} / {r.target}" for r in underfit.itertuples())
            st.warning(f"Base does not overfit on {cells}: {results.UNDERFIT}.")
        st.dataframe(regime, hide_index=True, key="acc_regime")
    with st.expander("Methods x targets at a glance (mean ± std)"):
        st.dataframe(results.wide_table(table), key="acc_wide")
    st.plotly_chart(charts.accuracy_bars(table, label), key="acc_bars")
    st.plotly_chart(charts.delta_bars(table, label), key="acc_delta")
    unfinished = ctx.view[(ctx.view["kind"] == results.KIND_TRANSFER) & (ctx.view["status"] != "finished")]
    if not unfinished.empty:
        st.caption(f"{len(unfinished)} transfer runs that are not finished (running, failed, stale, corrupt) are "
                   "left out; the page *Studies and runs* lists them.")


render()
