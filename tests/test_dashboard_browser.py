"""The dashboard served for real: ``workbench.dashboard.launch`` starts Streamlit on a free loopback port; the server
listens on 127.0.0.1 only; Debian's chromium (driven by playwright, no browser download) opens every page, waits
for its plotly charts to be drawn and takes a screenshot.

Screenshots go to the test's tmp folder. To refresh the README's pictures, point the test at a folder (and at
real artifacts instead of the synthetic ones)::

    DASHBOARD_SCREENSHOTS=docs DASHBOARD_ARTIFACTS=artifacts .venv/bin/python -m pytest -q \
        tests/test_dashboard_browser.py -m browser

which writes ``docs/dashboard-<page>.png`` for the pages in ``DASHBOARD_SCREENSHOT_PAGES`` (default
``accuracy,scales``; ``all`` for every page).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dashboard_fixtures as fixtures

from workbench import dashboard
from workbench import dashboard_data as dd

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"runs": "Studies and runs", "accuracy": "Accuracy across target tasks", "scales": "Per-layer perturbation scales",
         "calibration": "Calibration", "curves": "Training curves and robustness"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, root) of a dashboard server on a free loopback port, stopped after the module."""
    given = os.environ.get("DASHBOARD_ARTIFACTS")
    if given:
        root = Path(given).resolve()
    else:
        base = tmp_path_factory.mktemp("dashboard-server")
        root = base / "artifacts"
        fixtures.populate(root, targets=("cifar10", "fashion_mnist", "mnist_test10k"),
                          methods=("base", "dropblock", "manifold_mixup", "metaperturb"), seeds=(0, 1, 2))
        fixtures.add_corrupt(root, base / "outside")  # every kind of damage, files out of the root included
    process, url = dashboard.launch(root, timeout=120)
    try:
        yield url, root, process
    finally:
        dashboard.stop(process)


def _listening(port: int, table: str) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    path = Path("/proc/net") / table
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].rsplit(":", 1)
        if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
            found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp to see listening sockets")
def test_the_server_listens_on_loopback_only(server):
    url, _, process = server
    port = int(url.rsplit(":", 1)[1])
    assert url == f"http://127.0.0.1:{port}"
    assert _listening(port, "tcp") == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0
    assert _listening(port, "tcp6") == []
    assert process.poll() is None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp to see listening sockets")
def test_the_command_serves_until_stopped_and_takes_the_server_with_it(server):
    _, root, _ = server
    port = dashboard.free_port()
    command = [sys.executable, "-m", "workbench", "dashboard", "--artifacts", str(root), "--port", str(port)]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = cli.stdout.readline()
        assert line.startswith(f"dashboard running at http://127.0.0.1:{port} "), line + cli.stderr.read()
        assert _listening(port, "tcp") == ["0100007F"]
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while _listening(port, "tcp") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _listening(port, "tcp") == []  # the streamlit child went with it
    finally:
        if cli.poll() is None:
            cli.kill()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium "
                                                  "(apt-get install chromium); the test never downloads a browser")
def test_every_page_draws_its_charts_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, root, _ = server
    runs = dd.runs_frame(root)
    corrupt = int((runs["status"] == "corrupt").sum())  # the damaged runs of add_corrupt among them
    keep = os.environ.get("DASHBOARD_SCREENSHOTS")
    keep_pages = os.environ.get("DASHBOARD_SCREENSHOT_PAGES", "accuracy,scales").split(",")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            for path, title in PAGES.items():
                page.goto(f"{url}/{path}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
                # st.navigation's page titles, not file names: the entry point ran (see app/main.py)
                assert page.locator('[data-testid="stSidebarNav"]').get_by_text("Per-layer scales").count() == 1
                page.locator(".js-plotly-plot .main-svg").first.wait_for(state="visible", timeout=60_000)
                # the script has finished once the status widget stops saying "Running"
                page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                       timeout=60_000)
                assert page.locator(".js-plotly-plot .main-svg").count() >= 1, path
                assert page.locator('[data-testid="stException"]').count() == 0, path
                assert "TOP-SECRET" not in page.content()
                if path == "runs":  # the damaged runs are counted and listed as corrupt, the rest drawn
                    metric = page.locator('[data-testid="stMetric"]').filter(has_text="corrupt")
                    assert metric.locator('[data-testid="stMetricValue"]').inner_text().strip() == str(corrupt)
                    if corrupt:
                        assert page.get_by_text("cannot be read as runs or studies").count() >= 1
                shot = tmp_path / f"dashboard-{path}.png"
                page.screenshot(path=str(shot))
                assert shot.stat().st_size > 10_000, path  # a drawn page, not a blank one
                if keep and (path in keep_pages or "all" in keep_pages):
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, Path(keep) / shot.name)
        finally:
            browser.close()
