"""Dashboard: the launcher's command line, the data layer, the figures, and every page under Streamlit's AppTest
with synthetic artifacts (corrupt and foreign entries included), real artifacts of the stages, and an empty root."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import charts  # app/charts.py (app/ is on pytest's pythonpath)
import dashboard_fixtures as fixtures

from workbench import dashboard
from workbench import dashboard_data as dd
from workbench.cli import build_parser, main
from workbench.errors import WorkbenchError
from workbench.evaluate import ece_from_bins, reliability_bins

REPO = Path(__file__).resolve().parents[1]
APP_MAIN = REPO / "app" / "main.py"
PAGES = ["runs", "accuracy", "scales", "calibration", "curves"]
SECRET = "TOP-SECRET-OUTSIDE-ROOT"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(root, corrupt entries) of a root with a study of 24 transfer runs, a meta-training run, a running and a
    failed run, and every kind of broken entry."""
    base = tmp_path_factory.mktemp("dashboard")
    root = base / "artifacts"
    fixtures.populate(root)
    made = fixtures.add_corrupt(root, base / "outside")
    return root, made


@pytest.fixture
def smoke(smoke_study):
    """The artifacts of the smoke study (conftest's session fixture: real meta-training and transfer and the reading
    notebooks, executed through papermill, shared with tests/test_notebooks.py); read only."""
    return smoke_study


def render(root, page: str, monkeypatch, query: dict | None = None) -> AppTest:
    """Run the app on ``root`` and show ``page``; fail on any exception the page raises."""
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(root))
    app = AppTest.from_file(str(APP_MAIN), default_timeout=120)
    if page == "runs":
        app.query_params.update(query or {})
        app.run()
    else:
        app.run()
        app.switch_page(f"views/{page}.py")
        app.query_params.update(query or {})
        app.run()
    assert not app.exception, [e.message for e in app.exception]
    return app


def texts(app: AppTest) -> str:
    """Every piece of text on the page, tables included."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(app, kind)]
    parts += [e.value.to_string() for e in app.dataframe]
    parts += [str(e.value) for e in app.json]
    return "\n".join(parts)


def tables(app: AppTest, *columns: str) -> list[pd.DataFrame]:
    """The tables on the page that have all of ``columns`` (AppTest does not keep a dataframe's key)."""
    return [e.value for e in app.dataframe if set(columns) <= set(e.value.columns)]


def charts_on(app: AppTest) -> int:
    return len(app.get("plotly_chart"))


# ------------------------------------------------------------------------------------------------ launcher
def test_default_bind_address_is_loopback(tmp_path):
    command = dashboard.build_command()
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--browser.gatherUsageStats") + 1] == "false"
    assert command[command.index("run") + 1] == str(REPO / "app" / "main.py") and "--" not in command
    args = build_parser().parse_args(["dashboard"])
    assert (args.address, args.port, args.artifacts) == ("127.0.0.1", 8501, None)
    # the root travels after "--" and the app reads it back from its script arguments
    with_root = dashboard.build_command(tmp_path, port=9000)
    assert with_root[with_root.index("--"):] == ["--", "--artifacts", str(tmp_path.resolve())]
    assert dd.resolve_root(with_root[with_root.index("--") + 1:], environ={}) == tmp_path.resolve()
    exposed = dashboard.build_command(address="0.0.0.0")
    assert exposed[exposed.index("--server.address") + 1] == "0.0.0.0"


def test_launcher_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(WorkbenchError, match="port"):
        dashboard.build_command(port=0)
    with pytest.raises(WorkbenchError, match="port"):
        dashboard.build_command(port=70000)
    with pytest.raises(WorkbenchError, match="does not exist"):
        dashboard.launch(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkbenchError, match="not a directory"):
        dashboard.launch(tmp_path / "file")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(WorkbenchError, match="cannot listen on 127.0.0.1"):
            dashboard.launch(tmp_path, port=busy.getsockname()[1])
    assert main(["dashboard", "--artifacts", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: artifacts directory") and err.count("\n") == 1


def test_artifacts_root_order(tmp_path, monkeypatch):
    flag, env = tmp_path / "flag", tmp_path / "env"
    assert dd.resolve_root(["--artifacts", str(flag)], environ={"WORKBENCH_ARTIFACTS": str(env)}) == flag
    assert dd.resolve_root(["--other", "x"], environ={"WORKBENCH_ARTIFACTS": str(env)}) == env
    monkeypatch.delenv("WORKBENCH_ARTIFACTS", raising=False)
    assert dd.resolve_root([], environ={}) == (REPO / "artifacts").resolve()


# ----------------------------------------------------------------------------------------------- data layer
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "/etc/passwd", "", ".hidden", "x\x00", "a" * 200, None])
def test_ids_with_path_parts_are_refused(bad):
    with pytest.raises(WorkbenchError, match="not valid"):
        dd.check_id(bad)


def test_nothing_outside_the_root_is_read(synthetic):
    root, _ = synthetic
    for run_id in ("../outside", "../../etc", "escape/../../outside"):
        with pytest.raises(WorkbenchError):
            dd.site_scales(root, run_id)
    with pytest.raises(WorkbenchError, match="corrupt"):  # a symlink out of the root: a valid name, never opened
        dd.run_details(root, "escape")
    for relative in ("studies/../../outside/secret.txt", "/etc/passwd", "studies/x/../../../outside/a.ipynb",
                     "runs/escape/secret.txt"):
        with pytest.raises(WorkbenchError):
            dd.executed_notebook(root, relative)


def test_listing_reports_corrupt_entries_and_keeps_the_rest(synthetic):
    root, made = synthetic
    runs = dd.runs_frame(root).set_index("run_id")
    expected_runs = {"foreign-folder", "half-written", "newer-schema", "stray-file.txt", "escape"}
    for name in expected_runs:
        assert runs.loc[name, "status"] == "corrupt", name
        assert made[name] in runs.loc[name, "reason"], (name, runs.loc[name, "reason"])
    for name, fragment in made.items():  # runs damaged in one file each: corrupt, or finished with a notice
        if name in runs.index and runs.loc[name, "kind"] == "transfer":
            said = runs.loc[name, "reason"] if runs.loc[name, "status"] == "corrupt" else runs.loc[name, "notice"]
            assert fragment in said, (name, said)
    assert runs.loc["missing-arrays", "status"] == "finished" and runs.loc["missing-arrays", "reason"] == ""
    assert dd.options(runs.reset_index(), "seed") == [0, 1, 7, 98, 99]  # the tag holding a list is not offered
    transfer = runs[runs["kind"] == "transfer"]
    # 2 targets x 2 archs x 3 methods x 2 seeds + the run without predictions; running and failed ones kept
    assert (transfer["status"] == "finished").sum() == 25
    assert set(transfer["status"]) == {"finished", "running", "failed", "corrupt"}
    studies = dd.studies_frame(root).set_index("study_id")
    assert studies.loc["broken-study", "status"] == "corrupt" and studies.loc["evil-study", "status"] == "corrupt"
    assert "not a file name inside the study folder" in studies.loc["evil-study", "reason"]
    good = studies[studies["status"] == "finished"].iloc[0]
    assert good["runs"] == 25 and good["executed_notebook"].startswith("studies/")
    assert list(dd.foreign_entries(root)["entry"]) == ["junk-folder"]
    assert dd.executed_notebook(root, good["executed_notebook"]).startswith(b"{")


def test_accuracy_table_is_mean_and_spread_over_seeds():
    rows = []
    values = {("base", 0): 0.50, ("base", 1): 0.54, ("base", 2): 0.52,
              ("metaperturb", 0): 0.60, ("metaperturb", 1): 0.58, ("dropblock", 0): 0.40}
    for (method, seed), acc in values.items():
        rows.append({"arch": "resnet20", "target": "cifar10", "method": method, "label": method, "seed": seed,
                     "summary.test_accuracy": acc})
    rows.append({"arch": "conv4", "target": "cifar10", "method": "dropblock", "label": "dropblock", "seed": 0,
                 "summary.test_accuracy": 0.3})
    table = dd.accuracy_table(pd.DataFrame(rows)).set_index(["arch", "method"])
    base = np.array([0.50, 0.54, 0.52])
    mp = np.array([0.60, 0.58])
    assert table.loc[("resnet20", "base"), "mean"] == pytest.approx(base.mean())
    assert table.loc[("resnet20", "base"), "std"] == pytest.approx(base.std(ddof=1))
    assert table.loc[("resnet20", "metaperturb"), "n"] == 2
    assert table.loc[("resnet20", "metaperturb"), "delta_base"] == pytest.approx(mp.mean() - base.mean())
    assert table.loc[("resnet20", "metaperturb"), "delta_base_se"] == pytest.approx(
        np.sqrt(mp.var(ddof=1) / 2 + base.var(ddof=1) / 3))
    assert table.loc[("resnet20", "dropblock"), "std"] == 0.0  # one seed: no spread, not NaN
    assert np.isnan(table.loc[("resnet20", "base"), "delta_base"])  # Base is not compared with itself
    assert np.isnan(table.loc[("conv4", "dropblock"), "delta_base"])  # no Base on conv4
    wide = dd.wide_table(table.reset_index())
    assert wide.loc["base", "resnet20 / cifar10"] == f"{base.mean():.4f} ± {base.std(ddof=1):.4f}"


def test_pooled_bins_equal_the_bins_of_all_examples():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 600)
    correct = rng.random(600) < conf
    frames = [pd.DataFrame(reliability_bins(conf[s], correct[s], 15)) for s in (slice(0, 250), slice(250, 600))]
    pooled = dd.pool_bins(frames)
    whole = reliability_bins(conf, correct, 15)
    assert np.array_equal(pooled["count"], whole["count"])
    assert np.allclose(pooled["confidence"], whole["confidence"]) and np.allclose(pooled["accuracy"], whole["accuracy"])
    assert dd.ece(pooled) == pytest.approx(ece_from_bins(whole))
    other = pd.DataFrame(reliability_bins(conf, correct, 10))
    with pytest.raises(WorkbenchError, match="different calibration bins"):
        dd.pool_bins([frames[0], other])


def test_layer_profile_averages_channels_then_runs():
    a = np.array([[0.2, 0.4, np.nan], [0.6, 0.6, 0.6]])
    b = np.array([[0.4, 0.4, np.nan], [0.2, 0.4, 0.6]])
    items = [({"arch": "conv4", "target": "cifar10", "run_id": rid}, {"site_names": ["s0", "s1"], "scale": m})
             for rid, m in (("r1", a), ("r2", b))]
    profile = dd.layer_profile(items).set_index("site_index")
    assert profile.loc[0, "mean"] == pytest.approx((0.3 + 0.4) / 2)
    assert profile.loc[1, "mean"] == pytest.approx((0.6 + 0.4) / 2)
    assert profile.loc[1, "std"] == pytest.approx(np.std([0.6, 0.4], ddof=1)) and profile.loc[1, "n"] == 2


def test_arrays_of_a_transfer_run_are_read_by_their_documented_names(synthetic):
    root, _ = synthetic
    runs = dd.runs_frame(root)
    mp = runs[(runs["method"] == "metaperturb") & (runs["status"] == "finished") & (runs["arch"] == "resnet20")
              & (runs["seed"] == 0) & (runs["target"] == "cifar10")].iloc[0]
    scales = dd.site_scales(root, mp["run_id"])
    assert scales["scale"].shape == (9, 64) and list(scales["channels"]) == fixtures.SITES["resnet20"]
    assert np.isnan(scales["scale"][0, 16:]).all() and np.isfinite(scales["scale"][0, :16]).all()
    bins = dd.reliability(root, mp["run_id"])
    assert int(bins["count"].sum()) == len(dd.confidences(root, mp["run_id"])) == 400
    assert dd.ece(bins) == pytest.approx(mp["summary.test_ece"])
    robust = dd.robustness(root, mp["run_id"])
    assert set(robust["norm"]) == {"linf", "l2"} and (robust["eps"] == 0).sum() == 2  # clean accuracy at eps 0
    assert robust[robust["eps"] == 0]["accuracy"].iloc[0] == pytest.approx(mp["summary.test_accuracy"])
    meta = runs[runs["kind"] == "meta_train"].iloc[0]
    stats = dd.meta_site_stats(root, meta["run_id"])
    assert len(stats) == 4 * 9 and set(stats.columns) >= {"step", "site", "scale_mean", "multiplier_std"}
    base = runs[(runs["method"] == "base") & (runs["status"] == "finished")].iloc[0]
    assert dd.site_scales(root, base["run_id"]) is None  # Base has no perturbation sites


# ---------------------------------------------------------------------------------------------------- figures
def test_figures_have_one_trace_per_group():
    table = pd.DataFrame({"arch": ["a", "a", "b"], "target": ["t1", "t1", "t1"], "method": ["base", "mp", "mp"],
                          "mean": [0.5, 0.6, 0.7], "std": [0.01, 0.02, 0.0], "n": [3, 3, 1]})
    fig = charts.accuracy_bars(table)
    assert len(fig.data) == 3 and [t.name for t in fig.data[:2]] == ["base", "mp"]
    assert list(fig.data[1].error_y.array) == [0.02]
    table["delta_base"], table["delta_base_se"] = [np.nan, 0.1, np.nan], [np.nan, 0.03, np.nan]
    delta = charts.delta_bars(table)
    assert [t.name for t in delta.data] == ["mp"] and delta.data[0].marker.color == fig.data[1].marker.color
    bins = pd.DataFrame({"confidence": [0.2, 0.9], "accuracy": [0.1, 0.8], "count": [5, 0]})
    diagram = charts.reliability_diagram({"base": bins, "mp": bins})
    assert len(diagram.data) == 3 and list(diagram.data[1].x) == [0.2]  # empty bins are not drawn
    heat = charts.scale_heatmap(["s0", "s1"], np.ones((2, 5)))
    assert np.asarray(heat.data[0].z).shape == (2, 5)
    empty = charts.accuracy_bars(table.iloc[0:0])
    assert len(empty.data) == 0 and empty.layout.annotations[0].text.startswith("no finished")


# ------------------------------------------------------------------------------------------------------ pages
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_synthetic_artifacts(synthetic, page, monkeypatch):
    root, _ = synthetic
    app = render(root, page, monkeypatch)
    assert charts_on(app) >= 1
    assert not app.error, [e.value for e in app.error]
    assert SECRET not in texts(app)


def test_curves_page_says_whether_phi_learned(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "curves", monkeypatch)
    assert "Did phi learn?" in texts(app)
    assert [m.value for m in app.success] == ["phi learned: phi's function moved by 0.200 from its initialisation "
                                              "(threshold 0.02)"]
    specs = " ".join(chart.proto.spec for chart in app.get("plotly_chart"))
    assert "Did phi learn?" in specs and "from the authors' phi" in specs and "authors' phi" in specs


def test_accuracy_page_says_where_base_does_not_overfit(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "accuracy", monkeypatch)
    (regime,) = tables(app, "train_accuracy", "gap", "regime")
    runs = dd.finished(dd.runs_frame(root), dd.KIND_TRANSFER)
    assert len(regime) == runs[runs["method"] == "base"].groupby(["arch", "target"]).ngroups
    underfit = regime[regime["regime"] == dd.UNDERFIT]
    assert set(underfit["target"]) == {"fashion_mnist"} and (underfit["gap"].abs() < 1e-9).all()
    assert len(underfit) < len(regime) and (regime[regime["target"] != "fashion_mnist"]["gap"] > 0.29).all()
    assert [w.value for w in app.warning] == [
        f"Base does not overfit on {', '.join(f'{a} / fashion_mnist' for a in sorted(underfit['arch']))}: "
        f"{dd.UNDERFIT}."]


def test_runs_page_lists_corrupt_entries_with_their_reason(synthetic, monkeypatch):
    root, made = synthetic
    app = render(root, "runs", monkeypatch)
    (problems,) = tables(app, "where", "reason")
    (notices,) = tables(app, "where", "notice")
    for name, reason in made.items():
        table, column = (notices, "notice") if reason == fixtures.NOTICE else (problems, "reason")
        row = table[table["where"].str.endswith(name)]
        assert len(row) == 1, name
        assert reason in row[column].iloc[0], (name, row[column].iloc[0])
    assert not problems["where"].str.endswith("missing-arrays").any()  # readable: a notice, not a problem
    listed = set(dd.runs_frame(root)["run_id"])
    # every run is still listed, corrupt ones included
    assert any(set(t["run_id"]) == listed for t in tables(app, "run_id", "status", "reason"))
    assert app.metric[0].value == str(len(listed))


def test_runs_page_links_a_study_to_its_runs_and_notebook(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "runs", monkeypatch)
    study = dd.studies_frame(root)
    study = study[study["status"] == "finished"].iloc[0]
    assert app.selectbox(key="study_pick").value == study["study_id"]
    assert any(set(t["run_id"]) == set(study["run_ids"]) for t in tables(app, "run_id", "status"))
    assert study["executed_notebook"] in texts(app)
    assert len(app.get("download_button")) == 1


@pytest.mark.parametrize("page", ["runs", "scales", "curves"])
def test_a_run_id_with_a_path_is_refused(synthetic, page, monkeypatch):
    root, _ = synthetic
    app = render(root, page, monkeypatch, query={"run": "../outside/secret.txt"})
    assert any("Refused" in e.value for e in app.error)
    assert SECRET not in texts(app)


def test_typed_run_ids_are_checked(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "runs", monkeypatch)
    app.text_input(key="run_id_text").input("../../outside").run()
    assert any("Refused" in e.value for e in app.error) and SECRET not in texts(app)
    app.text_input(key="run_id_text").input("escape").run()  # a valid name for a symlink out of the root
    assert any("corrupt" in e.value for e in app.error) and SECRET not in texts(app)
    good = dd.runs_frame(root)
    good = good[good["status"] == "finished"]["run_id"].iloc[0]
    app.text_input(key="run_id_text").input(good).run()
    assert not app.error and good in texts(app)


def test_sidebar_filters_narrow_every_table(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "accuracy", monkeypatch)
    assert set(tables(app, "delta_base_se", "seeds")[0]["target"]) == {"cifar10", "fashion_mnist"}
    app.multiselect(key="filter_target").select("fashion_mnist").run()
    assert not app.exception
    assert set(tables(app, "delta_base_se", "seeds")[0]["target"]) == {"fashion_mnist"}


def test_filters_keep_their_values_across_pages(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "accuracy", monkeypatch)
    app.multiselect(key="filter_arch").select("conv4").run()
    app.switch_page("views/calibration.py").run()
    assert not app.exception and app.multiselect(key="filter_arch").value == ["conv4"]
    assert set(tables(app, "delta_base_se")[0]["arch"]) == {"conv4"}


def test_broken_array_files_make_the_run_corrupt_and_are_never_plotted(synthetic, monkeypatch):
    root, _ = synthetic
    app = render(root, "scales", monkeypatch, query={"run": "garbage-arrays"})
    assert "garbage-arrays" not in app.selectbox(key="scale_run").options  # listed as corrupt, left out here
    with pytest.raises(WorkbenchError, match="garbage-arrays is corrupt: arrays/.*npz is not a readable npz file"):
        dd.site_scales(root, "garbage-arrays")


def test_shipped_results_are_a_second_store_inside_the_root(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    fixtures.populate(root / "results", targets=("mnist_test10k",), archs=("conv4",), seeds=(0,), study=False)
    root.joinpath("runs").mkdir()
    assert dd.store_roots(root) == {"artifacts": root, "results": (root / "results").resolve()}
    app = render(root, "accuracy", monkeypatch)
    assert app.radio(key="store").value == "artifacts" and "make demo" in texts(app)  # the root itself is empty
    app.radio(key="store").set_value("results").run()
    assert not app.exception and set(tables(app, "delta_base_se")[0]["target"]) == {"mnist_test10k"}
    outside = tmp_path / "elsewhere"
    fixtures.populate(outside, targets=("cifar10",), archs=("conv4",), seeds=(0,), study=False, meta_runs=0)
    (root / "results").rename(tmp_path / "old-results")
    (root / "results").symlink_to(outside)  # a results link leading out of the root is not offered
    assert list(dd.store_roots(root)) == ["artifacts"]


@pytest.mark.parametrize("state", ["empty", "missing"])
@pytest.mark.parametrize("page", PAGES)
def test_an_empty_root_shows_how_to_produce_data(tmp_path, page, state, monkeypatch):
    root = tmp_path / "artifacts"
    if state == "empty":
        root.mkdir()
    app = render(root, page, monkeypatch)
    text = texts(app)
    assert "workbench transfer" in text and "make demo" in text
    assert charts_on(app) == 0 and not app.error


@pytest.mark.slow
def test_every_page_renders_the_smoke_study(smoke, monkeypatch):
    pages = {page: render(smoke, page, monkeypatch) for page in PAGES}
    runs = dd.runs_frame(smoke)
    meta = runs[runs["kind"] == "meta_train"]["run_id"].tolist()
    for page, app in pages.items():
        assert charts_on(app) >= 1 and not app.error, page
        # the only warnings: the smoke study's 4-step phi did not learn, said where its run is shown, and its
        # 4-step Base does not overfit, said on the accuracy page
        expected = {"curves": [f"phi {dd.phi_diagnostics(smoke, meta[0])['message']}"],
                    "accuracy": [f"Base does not overfit on conv4_8 / cifar10, conv4_8 / mnist_test10k: {dd.UNDERFIT}."]}
        assert [w.value for w in app.warning] == expected.get(page, []), page
    assert "Did phi learn?" in texts(pages["curves"])
    transfer = runs[runs["kind"] == "transfer"]
    # the study page links the transfer study to its runs and its executed notebook
    studies = dd.studies_frame(smoke)
    grid = studies[studies["notebook"].str.contains("02_transfer")].iloc[-1]
    assert set(transfer["run_id"]) <= set(grid["run_ids"]) and grid["executed_notebook"].endswith(".ipynb")
    assert grid["executed_notebook"] in texts(pages["runs"])
    # methods: Base and MetaPerturb with the meta-trained phi among them, told apart from the authors' phi
    table = tables(pages["accuracy"], "delta_base_se", "seeds")[0]
    assert len(table) == transfer.groupby(["arch", "target", "label"]).ngroups
    assert "base" in set(table["method"]) and "metaperturb (authors' phi)" in set(table["method"])
    assert f"metaperturb (ours, did not learn: …{meta[0][-4:]})" in set(table["method"])
    assert (table[table["method"] == "base"]["n"] == 2).all()  # two seeds each
    variants = pages["scales"].selectbox(key="profile_variant").options  # one phi at a time in the profile
    assert len(variants) == sum(m.startswith("metaperturb") for m in set(table["method"]))
    assert pages["scales"].selectbox(key="meta_scale_run").value in meta
    heat = pages["scales"].get("plotly_chart")[0].proto.spec.replace(" ", "")
    assert '"type":"heatmap"' in heat
    robust = pages["curves"].get("plotly_chart")[-1].proto.spec
    assert "Accuracy under PGD attack" in robust and '"type":"scatter"' in robust.replace(" ", "")
