"""Server time of each dashboard page on an artifacts root of 1,000 runs (the limit is 2 s per page).

Writes 1,000 synthetic finished transfer runs (5 targets x 2 archs x 5 methods x 20 seeds, every one with
predictions, reliability bins, scales for MetaPerturb and robustness curves for one target) plus meta-training runs
and corrupt entries into a temporary root through the real run store, then renders every page with Streamlit's
AppTest (the script runs in this process, as it does in the server; no browser): once with empty caches ("cold":
listing the runs and loading the arrays the page needs) and once more ("warm": cached, what the next interaction
costs). Prints the times side by side with the time of the bare listing (``RunStore.runs_table``).

    .venv/bin/python benchmarks/dashboard_render.py [--runs 1000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from streamlit.testing.v1 import AppTest  # noqa: E402

import dashboard_fixtures as fixtures  # noqa: E402
from workbench import dashboard_data as dd  # noqa: E402

PAGES = ["runs", "accuracy", "scales", "calibration", "curves"]
LIMIT_S = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="transfer runs to generate (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per page; the median is printed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        root = Path(tmp) / "artifacts"
        started = time.perf_counter()
        fixtures.populate(root, targets=("cifar10", "fashion_mnist", "mnist_test10k", "omniglot_small", "imagenette64"),
                          archs=("resnet20", "conv4"),
                          methods=("base", "dropblock", "manifold_mixup", "information_dropout", "metaperturb"),
                          seeds=tuple(range(20)), limit=args.runs, meta_runs=2)
        fixtures.add_corrupt(root, Path(tmp) / "outside")
        print(f"wrote {args.runs} transfer runs (+ meta-training, running, failed, corrupt) in "
              f"{time.perf_counter() - started:.1f} s to {root}")

        listing = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            frame = dd.runs_frame(root)
            listing.append(time.perf_counter() - t)
        print(f"{len(frame)} rows listed; RunStore.runs_table + tag columns: {statistics.median(listing):.3f} s\n")

        import os
        os.environ["WORKBENCH_ARTIFACTS"] = str(root)
        app = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=120)
        app.run()  # the first run imports the page modules' dependencies (plotly, pandas): not a page's cost
        print(f"{'page':<12} {'cold (s)':>9} {'warm (s)':>9} {'charts':>7}  {'cold / 2 s limit':>16}")
        worst = 0.0
        for page in PAGES:
            cold, warm = [], []
            for _ in range(args.repeat):
                # "Reload data" empties every cache inside the app's run (st.cache_data.clear() called from here
                # would not reach the caches of the script run).
                app.button(key="reload").click()
                app.switch_page(f"views/{page}.py")
                t = time.perf_counter()
                app.run()
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                app.run()
                warm.append(time.perf_counter() - t)
            if app.exception:
                print(f"{page}: the page raised {app.exception[0].message}")
                return 1
            c, w = statistics.median(cold), statistics.median(warm)
            worst = max(worst, c)
            print(f"{page:<12} {c:>9.3f} {w:>9.3f} {len(app.get('plotly_chart')):>7}  {c / LIMIT_S:>16.2f}")
        verdict = "within" if worst < LIMIT_S else "OVER"
        print(f"\nslowest page, cold: {worst:.3f} s = {worst / LIMIT_S:.2f} x the {LIMIT_S:.0f} s limit ({verdict})")
        return 0 if worst < LIMIT_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
