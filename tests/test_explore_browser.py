"""The phi explorer in a real JupyterLab: the server starts on a free loopback port with a token, in a temporary
folder holding ``05_explore_phi.ipynb``; Debian's chromium (driven by playwright, no browser download) opens the
notebook, runs every cell, waits for the widgets and the three figures, moves two controls (the site slider and the
second phi) and sees the figures follow, and takes screenshots.

Screenshots go to the test's tmp folder. To refresh the README's pictures, point the test at a folder, and
optionally at a phi and a trained network to show (files or run folders: ``phi.pt``, a transfer run's folder)::

    EXPLORER_SCREENSHOTS=docs EXPLORER_PHI=$PWD/artifacts/results/runs/<meta run>/phi.pt \\
        EXPLORER_NETWORK=/path/to/artifacts/runs/<transfer run> \\
        .venv/bin/python -m pytest -q tests/test_explore_browser.py -m browser

which writes ``docs/explorer-maps.png`` and ``docs/explorer-scales.png``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from workbench import dashboard

from helpers import CIFAR10, OFFICIAL_PHI, REPO, require_shared

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = "05_explore_phi.ipynb"
# JupyterLab user settings for the test: every cell stays in the page (no windowing), no news or update checks
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def _parameters(nb: nbformat.NotebookNode, **values) -> None:
    """Append assignments to the parameters cell (what papermill's injected cell does)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "".join(f"\n{name} = {value!r}" for name, value in values.items())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(url, token, folder) of a JupyterLab server on a free loopback port, stopped after the module."""
    base = tmp_path_factory.mktemp("lab")
    folder = base / "notebooks"
    folder.mkdir()
    nb = nbformat.read(REPO / "notebooks" / NOTEBOOK, as_version=4)
    overrides = {k: os.environ[f"EXPLORER_{k.upper()}"] for k in ("phi", "compare", "network")
                 if os.environ.get(f"EXPLORER_{k.upper()}")}
    _parameters(nb, **overrides)
    nbformat.write(nb, folder / NOTEBOOK)
    settings = base / "settings"
    for name, value in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    artifacts = base / "artifacts"
    env = {**os.environ, "WORKBENCH_ARTIFACTS": str(artifacts), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTER_CONFIG_DIR": str(base / "config"), "WORKBENCH_PLOTLY_RENDERER": "plotly_mimetype"}
    port, token = dashboard.free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}", "--ServerApp.port_retries=0",
               "--LabApp.expose_app_in_browser=True", "--allow-root"]
    log = open(base / "lab.log", "w+")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"JupyterLab did not start on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, token, folder, artifacts
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the kernels it started
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_the_server_listens_on_loopback_with_a_token(lab):
    url, token, _, _ = lab
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/contents", timeout=10)
    assert refused.value.code == 403
    with urllib.request.urlopen(f"{url}/api/contents?token={token}", timeout=10) as response:
        assert NOTEBOOK in {item["name"] for item in json.load(response)["content"]}


def _figure_titles(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')]
        .map(div => (div.layout && div.layout.title && div.layout.title.text) || '')""")


def _shot(page, path: Path, first, last) -> Path:
    """A screenshot of the page from the top of ``first`` to the bottom of ``last`` (the viewport made tall enough)."""
    first.scroll_into_view_if_needed()
    top = first.bounding_box()
    bottom = last.bounding_box()
    height = bottom["y"] + bottom["height"] - top["y"]
    if top["y"] + height > page.viewport_size["height"]:
        page.set_viewport_size({"width": page.viewport_size["width"], "height": int(top["y"] + height + 40)})
        page.wait_for_timeout(500)
        top, bottom = first.bounding_box(), last.bounding_box()
    page.wait_for_timeout(1000)  # plotly's transitions
    left = min(top["x"], bottom["x"]) - 10
    right = max(top["x"] + top["width"], bottom["x"] + bottom["width"]) + 10
    page.screenshot(path=str(path), clip={"x": max(0, left), "y": max(0, top["y"] - 10), "width": right - max(0, left),
                                          "height": bottom["y"] + bottom["height"] - top["y"] + 20})
    return path


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                                                  "(apt-get install chromium); the test never downloads a browser")
def test_the_explorer_runs_in_jupyterlab_and_its_figures_follow_the_controls(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    require_shared(OFFICIAL_PHI, CIFAR10)  # the authors' phi and the explorer's default dataset
    url, token, _, artifacts = lab
    keep = os.environ.get("EXPLORER_SCREENSHOTS")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
            page.evaluate("""async () => {
                const app = window.jupyterapp;
                if (app.shell.leftCollapsed === false) { await app.commands.execute('application:toggle-left-area'); }
                const panel = app.shell.currentWidget;
                await panel.context.ready;
                await panel.sessionContext.ready;
                await app.commands.execute('notebook:run-all-cells');
            }""")
            # the last cell prints the study's line once everything above it ran
            page.get_by_text("(05_explore_phi): 1 run(s)").wait_for(timeout=300_000)
            page.locator(".widget-dropdown").first.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea .js-plotly-plot').length >= 3",
                                   timeout=120_000)
            before = _figure_titles(page)
            assert len(before) == 3 and "site 0:" in before[0], before
            assert page.locator(".jp-OutputArea-output").filter(has_text="Traceback").count() == 0
            figures = page.locator(".jp-OutputArea .js-plotly-plot")
            shots = [_shot(page, tmp_path / "explorer-maps.png", page.locator(".widget-hbox").first, figures.nth(0))]

            # move the site slider: type into its readout, as a user does
            slider = page.locator(".widget-slider").filter(has_text="site")
            readout = slider.locator(".widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("2")
            page.keyboard.press("Enter")
            page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')]"
                                   ".every(div => div.layout && div.layout.title && "
                                   "div.layout.title.text.includes('site 2:'))", timeout=120_000)
            after = _figure_titles(page)
            assert all("site 2:" in title for title in after), after
            assert page.evaluate("() => document.querySelectorAll('.jp-OutputArea .js-plotly-plot').length") == 3

            # and the second phi: the scale panels follow
            compare = page.locator(".widget-dropdown").filter(has_text="beside it (B)").locator("select")
            compare.select_option(label="none")
            page.wait_for_function("() => { const d = document.querySelectorAll('.jp-OutputArea .js-plotly-plot');"
                                   " return d.length >= 2 && !d[0].layout.title.text.includes('B = '); }",
                                   timeout=120_000)
            compare.select_option(index=2)  # back to a second phi (the authors' or a meta-trained one)
            page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea .js-plotly-plot')[0]"
                                   ".layout.title.text.includes('B = ')", timeout=120_000)
            shots.append(_shot(page, tmp_path / "explorer-scales.png", figures.nth(1), figures.nth(2)))
            for shot in shots:
                assert shot.stat().st_size > 20_000, shot  # a drawn figure, not a blank one
                if keep:
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, Path(keep) / shot.name)
        finally:
            browser.close()
    # the interactive session wrote its study where it was told to, not into the checkout
    assert list((artifacts / "studies").glob("*-05-explore-phi-interactive-*"))
