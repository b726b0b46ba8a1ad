"""Entry point of the dashboard: ``streamlit run app/main.py -- --artifacts DIR`` (or ``workbench dashboard``).

The pages (``app/views/``) only read artifacts, through ``workbench.results`` and ``workbench.dashboard_data``;
nothing here trains. The shared sidebar (run store, reload, filters by source, target, arch, method, seed and
status) is drawn here, before the page, so its widgets are the same on every page and keep their values; pages get
it with ``ui.context()``.

The pages folder is deliberately not called ``pages/``: Streamlit treats a ``pages/`` folder beside the entry point
as the old file-based navigation until the entry point has run once in the server (so a fresh server opened on a
deep link such as ``/accuracy`` would show file names, skip ``set_page_config`` and this file), and AppTest runs the
files of such a folder without the entry point.
"""
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:  # `streamlit run` adds it; AppTest and other runners may not
    sys.path.insert(0, str(APP_DIR))

import streamlit as st  # noqa: E402

import ui  # noqa: E402

st.set_page_config(page_title="MetaPerturb Workbench", page_icon=":material/science:", layout="wide")

PAGES = [
    st.Page(APP_DIR / "views" / "runs.py", title="Studies and runs", icon=":material/table_view:", url_path="runs", default=True),
    st.Page(APP_DIR / "views" / "accuracy.py", title="Accuracy across targets", icon=":material/bar_chart:", url_path="accuracy"),
    st.Page(APP_DIR / "views" / "scales.py", title="Per-layer scales", icon=":material/layers:", url_path="scales"),
    st.Page(APP_DIR / "views" / "calibration.py", title="Calibration", icon=":material/tune:", url_path="calibration"),
    st.Page(APP_DIR / "views" / "curves.py", title="Curves and robustness", icon=":material/show_chart:", url_path="curves"),
]

navigation = st.navigation(PAGES)
ui.sidebar()
navigation.run()
