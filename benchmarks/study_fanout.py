"""Fan-out of a study's transfer grid, measured side by side in one run: the demo's grid with ``--workers 2`` over
the same grid run one cell after another in one process (the serial default before fan-out). Target on a 2-core
machine: at most 0.65.

The grid is the ``demo`` profile's ``02_transfer_study`` (Conv-4 on CIFAR-10, 50 images per class, 600 steps of
batch 64, 100 test images per class, 30 MC samples; Base and the three MetaPerturb variants, 2 seeds: 8 cells),
with our phi replaced by the authors' file so that no meta-training run is needed (the cost is the same). Both
grids run with one torch thread per process, as the profile says; the fanned-out one includes its workers'
start-up. The two grids must give the same per-run metrics, bit for bit, and the script checks it. Usage::

    .venv/bin/python benchmarks/study_fanout.py [--workers 2] [--steps 600] [--order serial-first|parallel-first]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.artifacts import RunStore  # noqa: E402
from workbench.fanout import usable_cores  # noqa: E402
from workbench.study import StudyRunStore, TransferStudyConfig, load_profile, run_transfer_grid  # noqa: E402
from workbench.transfer import official_phi_path  # noqa: E402


def timed_grid(root: Path, parameters: dict) -> tuple[float, object]:
    store = RunStore(root)
    study = store.create_study("notebooks/02_transfer_study.ipynb", "demo", parameters)
    config = TransferStudyConfig.from_dict(parameters)
    started = time.perf_counter()
    frame = run_transfer_grid(config, StudyRunStore(root, study.study_id), progress=False)
    return time.perf_counter() - started, frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="training steps per cell (default: the demo's)")
    parser.add_argument("--order", choices=["serial-first", "parallel-first"], default="serial-first")
    args = parser.parse_args()
    parameters = {**load_profile("demo", "02_transfer_study"), "phi": str(official_phi_path())}
    if args.steps:
        parameters["steps"] = args.steps
    print(f"demo transfer grid: {len(parameters['methods']) * len(parameters['seeds'])} cells of "
          f"{parameters['steps']} steps; {usable_cores()} usable cores; threads {parameters['threads']} per process")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        order = [1, args.workers] if args.order == "serial-first" else [args.workers, 1]
        for workers in order:
            seconds, frame = timed_grid(Path(tmp) / f"w{workers}", {**parameters, "workers": workers})
            results[workers] = (seconds, frame)
            print(f"  workers {workers}: {seconds:7.1f} s  ({frame.attrs['workers']})", flush=True)
    (serial, a), (fanned, b) = results[1], results[args.workers]
    columns = ["method", "seed", "test_accuracy", "test_nll", "test_ece", "train_eval_accuracy"]
    same = a[columns].values.tolist() == b[columns].values.tolist()
    print(f"per-run metrics identical: {same}")
    print(f"wall time, {args.workers} workers / serial: {fanned / serial:.3f} (target <= 0.65)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
