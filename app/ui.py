"""Streamlit plumbing shared by the pages: the artifacts root, cached readers, sidebar filters, run pickers.

Reading is done by :mod:`workbench.results` (runs, arrays, tables, labels) and :mod:`workbench.dashboard_data`
(the root, studies, filters); this module only caches it (``st.cache_data`` with a TTL, so new runs appear by
themselves) and turns its one-line errors into messages on the page.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import streamlit as st

from workbench import dashboard_data as dd
from workbench import results
from workbench.errors import WorkbenchError

LIST_TTL = 15      # seconds: listings (run.json / summary.json of every run) are re-read this often
RUN_TTL = 120      # seconds: one run's arrays and metrics
CONTEXT_KEY = "_workbench_dashboard_context"
FILTERS = ("source", "target", "arch", "method", "seed", "status")


# ------------------------------------------------------------------------------------------ cached readers
def _cached(reader: Callable, ttl: int, max_entries: int) -> Callable:
    """``reader`` behind Streamlit's data cache: each distinct (root, ...) argument list is read once per ``ttl``."""
    return st.cache_data(ttl=ttl, show_spinner=False, max_entries=max_entries)(reader)


# listings (run.json / summary.json of every run)
load_runs = _cached(results.runs_frame, LIST_TTL, 8)
load_studies = _cached(dd.studies_frame, LIST_TTL, 8)
load_foreign = _cached(dd.foreign_entries, LIST_TTL, 8)
# one run's records and arrays
load_details = _cached(results.run_details, RUN_TTL, 256)
load_metrics = _cached(results.metrics, RUN_TTL, 512)
load_reliability = _cached(results.reliability, RUN_TTL, 2048)
load_confidences = _cached(results.confidences, RUN_TTL, 512)
load_site_scales = _cached(results.site_scales, RUN_TTL, 2048)
load_robustness = _cached(results.robustness, RUN_TTL, 1024)
load_meta_site_stats = _cached(results.meta_site_stats, RUN_TTL, 128)
load_notebook = _cached(dd.executed_notebook, RUN_TTL, 16)


def attempt(reader: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    """``(reader(*args), None)``, or ``(None, one-line reason)`` when the artifact cannot be read."""
    try:
        return reader(*args), None
    except WorkbenchError as exc:
        return None, str(exc)
    except (OSError, ValueError, KeyError) as exc:  # anything a damaged file can still provoke
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def load_many(reader: Callable[[str, str], Any], root: str, run_ids: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``{run_id: value}`` for the runs that have the artifact, and the problems met on the way."""
    values, problems = {}, []
    for run_id in run_ids:
        value, error = attempt(reader, root, run_id)
        if error:
            problems.append(error)
        elif value is not None:
            values[run_id] = value
    return values, problems


def show_problems(problems: Sequence[str], what: str = "artifacts") -> None:
    if problems:
        st.warning(f"{len(problems)} {what} could not be read and are left out: " + "; ".join(problems[:3])
                   + (" ..." if len(problems) > 3 else ""))


def show_notices(runs: pd.DataFrame) -> None:
    """Say which of ``runs`` lack files their stage always writes (the store's ``notice``), so a run missing
    from a plot is never silent."""
    if "notice" not in runs:
        return
    noted = runs[runs["notice"].fillna("").astype(str) != ""]
    if not noted.empty:
        first = noted.iloc[0]
        st.info(f"{len(noted)} of these runs lack arrays and are left out where those are needed, e.g. "
                f"runs/{first['run_id']}: {first['notice']}" + (" (all are listed on *Studies and runs*)"
                                                                if len(noted) > 1 else ""))


# ------------------------------------------------------------------------------------------------ context
@dataclass
class Context:
    root: Path
    runs: pd.DataFrame          # every run of the store, corrupt ones included
    view: pd.DataFrame          # the runs that pass the sidebar filters
    studies: pd.DataFrame
    foreign: pd.DataFrame
    error: str | None = None

    @property
    def root_str(self) -> str:
        return str(self.root)

    @property
    def empty(self) -> bool:
        return self.runs.empty and self.studies.empty


def artifacts_root() -> Path:
    """The root from ``streamlit run app/main.py -- --artifacts DIR``, ``$WORKBENCH_ARTIFACTS`` or the default."""
    return dd.resolve_root(sys.argv[1:])


def _empty_runs() -> pd.DataFrame:
    return pd.DataFrame(columns=["run_id", "kind", "status", "reason", "notice", "created", "study_id", "path", "label",
                                 *results.TAG_COLUMNS])


def sidebar() -> Context:
    """Render the shared sidebar (store, reload, filters) and read the listings (cached)."""
    base = artifacts_root()
    stores = dd.store_roots(base)
    with st.sidebar:
        if len(stores) > 1:
            choice = st.radio("Run store", list(stores), key="store",
                              format_func=lambda k: "artifacts root" if k == "artifacts" else f"shipped {k}")
        else:
            choice = "artifacts"
        root = stores.get(choice, base)
        st.caption(f"Artifacts: `{root}`")
        if st.button("Reload data", key="reload",
                     help=f"Read the artifacts again now (listings are re-read every {LIST_TTL} s anyway)"):
            st.cache_data.clear()
    runs, error_runs = attempt(load_runs, str(root))
    studies, error_studies = attempt(load_studies, str(root))
    foreign, _ = attempt(load_foreign, str(root))
    error = error_runs or error_studies
    runs = runs if runs is not None else _empty_runs()
    studies = studies if studies is not None else pd.DataFrame(columns=["study_id", "status", "reason", "run_ids"])
    foreign = foreign if foreign is not None else pd.DataFrame(columns=["entry", "reason"])
    wanted = {}
    if not runs.empty:
        with st.sidebar:
            st.subheader("Filters")
            for column in FILTERS:
                values = dd.options(runs, column)
                if values:
                    wanted[column] = st.multiselect(column, values, key=f"filter_{column}", placeholder="all")
    view = dd.filter_runs(runs, **wanted) if wanted else runs
    if len(view) != len(runs):
        st.sidebar.caption(f"{len(view)} of {len(runs)} runs pass the filters")
    ctx = Context(Path(root), runs, view, studies, foreign, error)
    st.session_state[CONTEXT_KEY] = ctx  # replaced on every run of the entry point, before the page runs
    return ctx


def context() -> Context:
    """What the page shows: the root, all runs, the filtered runs, the studies.

    The entry point (``app/main.py``) draws the sidebar and stores the context before it runs the page, so the
    filters are the same widgets on every page and keep their values; a page run without it draws its own.
    """
    ctx = st.session_state.get(CONTEXT_KEY)
    return ctx if isinstance(ctx, Context) else sidebar()


# ----------------------------------------------------------------------------------------------- messages
def how_to(page: str, ctx: Context) -> None:
    """What the page needs and the commands that produce it."""
    if ctx.error:
        st.error(f"The artifacts root cannot be read: {ctx.error}")
    if ctx.empty:
        st.info(f"Nothing to show yet: `{ctx.root}` holds no runs or studies.")
        st.markdown(dd.HOW_TO)
    else:
        st.info(f"Nothing to show here for the current filters: this page needs {dd.PAGE_NEEDS[page]}.")
        st.markdown(dd.HOW_TO_COMMANDS)


def page_start(title: str, page: str,
               usable: Callable[[Context], pd.DataFrame] | None = None) -> tuple[Context, pd.DataFrame | None]:
    """A page's first lines: its title, the context, and the runs of the current filters it shows (``usable``;
    default: the finished transfer runs), or None, after saying what the page needs, when there are none."""
    st.title(title)
    ctx = context()
    runs = usable(ctx) if usable is not None else results.finished(ctx.view, results.KIND_TRANSFER)
    if runs.empty:
        how_to(page, ctx)
        return ctx, None
    return ctx, runs


# ---------------------------------------------------------------------------------------------- run picks
def run_label(row: pd.Series | dict) -> str:
    """``target · arch · method · s<seed> · <id suffix>`` (or kind and id for runs without those tags)."""
    get = row.get
    parts = [str(get(k)) for k in ("target", "arch") if get(k) is not None and not _missing(get(k))]
    label = get("label")
    if label and label != "?":
        parts.append(str(label))
    if get("seed") is not None and not _missing(get("seed")):
        parts.append(f"s{get('seed')}")
    if not parts:
        parts.append(str(get("kind") or "?"))
    return " · ".join(parts) + f" · {str(get('run_id'))[-4:]}"


def _missing(value: Any) -> bool:
    return isinstance(value, float) and value != value


def query_id(name: str, what: str) -> str | None:
    """A run or study id from the URL (``?run=...``), validated; an invalid one is refused on the page."""
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return results.check_id(raw, what)
    except WorkbenchError as exc:
        st.error(f"Refused `?{name}=`: {exc}")
        return None


def pick_run(candidates: pd.DataFrame, label: str, key: str, query: str = "run") -> str | None:
    """A selectbox over ``candidates`` (preselecting ``?run=`` when it names one of them); returns the run id."""
    if candidates.empty:
        return None
    ids = candidates["run_id"].tolist()
    names = {row["run_id"]: run_label(row) for row in candidates.to_dict("records")}
    wanted = query_id(query, "run id")
    if wanted is not None and wanted not in names and wanted not in set(context().runs["run_id"]):
        st.warning(f"`?{query}={wanted}`: no such run in this artifacts root; showing another one")
    index = ids.index(wanted) if wanted in names else 0
    chosen = st.selectbox(label, ids, index=index, key=key, format_func=lambda rid: names.get(rid, rid))
    return chosen


NOTHING = object()  # what meta_section returns when its section has nothing to show


def meta_section(ctx: Context, title: str, key: str, reader: Callable[[str, str], Any]) -> Any:
    """The opening of a page's meta-training section: a header and a picker over the readable meta-training runs
    (newest first), then ``reader(root, run_id)`` of the chosen one. :data:`NOTHING` when there is no such run or
    the read failed (said on the page)."""
    meta = latest_first(ctx.view[(ctx.view["kind"] == results.KIND_META) & (ctx.view["status"] != "corrupt")])
    if meta.empty:
        return NOTHING
    st.header(title)
    run_id = pick_run(meta, "Meta-training run", key=key, query="meta")
    value, error = attempt(reader, ctx.root_str, run_id)
    if error:
        st.warning(error)
        return NOTHING
    return value


def latest_first(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.sort_values("created", ascending=False, na_position="last") if "created" in runs else runs


def summary_names(columns: Sequence[str]) -> dict[str, str]:
    return {c: c[len(results.SUMMARY):] if c.startswith(results.SUMMARY) else c for c in columns}
