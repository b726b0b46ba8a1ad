"""``workbench demo``: the main job on a fresh machine, offline, in minutes; then the dashboard.

The demo is the four study notebooks run with the ``demo`` profile (``notebooks/profiles/demo.yaml``), each as its
own study in the artifacts root, with the kernels' progress streamed to the console:

1. ``01_meta_train``: meta-train phi on tasks cut from the offline Tiny ImageNet;
2. ``02_transfer_study``: transfer that phi (``phi=<the run just made>``), the authors' released phi and the
   untrained-phi control to CIFAR-10 next to Base, where Base overfits; whether it does, accuracy, calibration and
   the differences to Base paired by seed;
3. ``03_calibration_robustness`` and ``04_scales``: reliability diagrams and the per-layer scales of that study
   (``source_study=<the study just made>``; they read, they do not train);

then it starts the dashboard on 127.0.0.1, prints its address and keeps it running until Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
import time
from typing import Optional

from .artifacts import RunStore, default_root
from .errors import WorkbenchError

NOTEBOOKS = ["01_meta_train", "02_transfer_study", "03_calibration_robustness", "04_scales"]
TITLES = {
    "01_meta_train": "meta-train phi on the offline Tiny ImageNet tasks",
    "02_transfer_study": "transfer phi (ours, the authors', the untrained control) and Base to CIFAR-10",
    "03_calibration_robustness": "calibration of the transferred networks",
    "04_scales": "per-layer perturbation scales",
}


def _needed_datasets(prepared) -> list[str]:
    names = []
    for item in prepared:
        config = item.config
        names += [getattr(config, "source", None)] + list(getattr(config, "targets", []) or [])
    return [n for n in dict.fromkeys(names) if n]


def check_offline_data(prepared, data_root: Optional[str] = None) -> None:
    """Refuse to start (one line) when a dataset the demo needs is not on this machine."""
    from .data import available_datasets

    known = {row["name"]: row for row in available_datasets(data_root)}
    for name in _needed_datasets(prepared):
        row = known.get(name)
        if row is not None and not row["available"]:
            raise WorkbenchError(f"the demo needs the dataset {name!r}, which is not on this machine; "
                                 f"{row['how_to_get']} (see `workbench data list`)")


def _port_is_free(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _chosen_phi(store: RunStore, study_id: str) -> str:
    """The phi a meta-training study produced: its selection run, else its (only) meta_train run."""
    runs = [store.run_record(r) for r in store.open_study(study_id).run_ids]
    for kind in ("meta_select", "meta_train"):
        done = [r for r in runs if r.kind == kind and r.status == "finished" and "parent" not in r.tags]
        if done:
            return done[-1].run_id
    raise WorkbenchError(f"study {study_id} finished without a meta-training run; see its executed notebook")


def _print_table(store: RunStore, study_id: str) -> None:
    """The accuracy table of the transfer study (from its report run), as text."""
    import pandas as pd

    from .results import wide_table

    reports = store.list_runs(kind="study_report", study_id=study_id)
    if not reports:
        return
    run = store.open_run(reports[-1].run_id)
    names = run.list_json()
    if "regime" in names:
        regime = pd.DataFrame(run.load_json("regime"))
        regime = regime[[c for c in ("arch", "target", "seeds", "train_accuracy", "test_accuracy", "gap", "regime")
                         if c in regime]]
        if not regime.empty:
            print("\ndoes Base overfit? (its final network on its training images and on the test split, mean over "
                  f"seeds):\n{regime.to_string(index=False)}")
    for name, title in (("accuracy", "test accuracy"), ("ece", "expected calibration error")):
        if name in names:
            table = wide_table(pd.DataFrame(run.load_json(name)))
            if not table.empty:
                print(f"\n{title} (mean ± std over seeds):\n{table.to_string()}")
    for metric in ("test_accuracy", "test_nll", "test_ece"):
        name = f"paired_{metric}"
        if name in names:
            paired = pd.DataFrame(run.load_json(name))
            if not paired.empty:
                paired = paired[[c for c in ("arch", "target", "label", "mean_diff", "se", "n", "beyond_2se")
                                 if c in paired]].round(4)
                print(f"\n{metric}: difference to Base of the same seed (mean ± se over seeds; beyond_2se: more than "
                      f"two standard errors):\n{paired.to_string(index=False)}")


def run_demo(artifacts: Optional[str] = None, profile: str = "demo", dashboard: bool = True,
             port: Optional[int] = None, stream: bool = True, overrides: Optional[dict] = None) -> int:
    """Run the demo studies, then (``dashboard=True``) serve the dashboard until Ctrl-C. Returns an exit code.

    overrides: parameters as for ``workbench study run -p`` (``KEY`` for every notebook that has it,
    ``NOTEBOOK.KEY`` for one).
    """
    from . import study

    started = time.perf_counter()
    prepared = study.prepare_studies(NOTEBOOKS, profile, overrides)  # every parameter checked before anything runs
    check_offline_data(prepared)
    if port is not None and dashboard and not _port_is_free(port):
        raise WorkbenchError(f"port {port} is in use; pass another --port or leave it out to pick a free one")
    root = default_root(artifacts)
    store = RunStore(root)
    print(f"MetaPerturb Workbench demo (profile {profile}): {len(NOTEBOOKS)} studies into {root}", flush=True)
    links: dict[str, dict] = {name: {} for name in NOTEBOOKS}  # what a study passes on to the next ones
    timings = []
    for index, item in enumerate(prepared, start=1):
        name = item.name
        print(f"\n[{index}/{len(NOTEBOOKS)}] {TITLES[name]} ({name})", file=sys.stderr, flush=True)
        if links[name]:
            item = dataclasses.replace(item, config=item.config.replace(**links[name]))
        outcome = study.execute_study(item, store, stream=stream)
        timings.append((name, outcome.seconds))
        if outcome.status != "finished":
            print(f"error: the demo stopped: study {outcome.study_id} ({name}) failed: {outcome.reason}; the executed "
                  f"notebook with the error is {outcome.executed_notebook}", file=sys.stderr)
            return 1
        if name == "01_meta_train":
            links["02_transfer_study"]["phi"] = _chosen_phi(store, outcome.study_id)
        if name == "02_transfer_study":
            for later in ("03_calibration_robustness", "04_scales"):
                links[later]["source_study"] = outcome.study_id
            _print_table(store, outcome.study_id)
    total = time.perf_counter() - started
    print("\n" + ", ".join(f"{n} {s:.0f} s" for n, s in timings) + f"; demo studies done in {total / 60:.1f} min",
          flush=True)
    if not dashboard:
        print(f"artifacts in {root}; look at them with `workbench dashboard --artifacts {root}`", flush=True)
        return 0
    from .dashboard import DEFAULT_PORT, interruptible, launch, stop

    if port is None:
        port = DEFAULT_PORT if _port_is_free(DEFAULT_PORT) else None  # None: launch picks a free one
    # Ctrl-C and SIGTERM stop the server; the handlers are in place before the address is printed.
    process = None
    with interruptible():
        try:
            process, url = launch(root, port=port)  # stops its own server if interrupted while starting
            print(f"\ndashboard running at {url} (artifacts {root}); press Ctrl-C to stop it", flush=True)
            code = process.wait()
            print(f"error: the dashboard server exited with status {code}", file=sys.stderr)
            return code or 1
        except KeyboardInterrupt:
            if process is not None:
                stop(process)
            print("dashboard stopped", flush=True)
            return 0


def _cli(args: argparse.Namespace) -> int:
    from .study.cli import _parse_value

    overrides = {key: _parse_value(raw) for key, raw in args.parameter or []}
    return run_demo(args.artifacts, profile=args.profile, dashboard=not args.no_dashboard, port=args.port,
                    stream=not args.quiet, overrides=overrides)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench demo [--no-dashboard] [--port N] [--artifacts DIR] [--profile demo] [-p KEY VALUE]``."""
    from .cli import add_command
    from .study.cli import add_notebook_flags

    parser = add_command(
        subparsers, "demo", _cli,
        help="the main job: meta-train, transfer, evaluate on offline data, then open the dashboard",
        description="Run the demo study with no network (the notebooks 01-04 with the demo profile: meta-train phi "
                    "on Tiny ImageNet tasks, transfer it and the authors' phi to CIFAR-10 and Fashion-MNIST next to "
                    "Base, accuracy, calibration, per-layer scales), then start the dashboard on 127.0.0.1 and keep "
                    "it running until Ctrl-C.")
    parser.add_argument("--no-dashboard", action="store_true", help="stop after the studies")
    parser.add_argument("--port", type=int, default=None, help="dashboard port (default 8501, or a free one if "
                                                               "8501 is taken)")
    add_notebook_flags(parser, "parameter profile (default demo; smoke for a check in seconds)", "demo")


__all__ = ["NOTEBOOKS", "check_offline_data", "register_cli", "run_demo"]
