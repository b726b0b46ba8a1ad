"""Copy a finished results study into the repository's shipped results store, without what a reader does not need.

    .venv/bin/python scripts/ship_results.py SOURCE_ROOT [--into artifacts/results]

Copies ``runs/`` and ``studies/`` of SOURCE_ROOT, leaving out network weights (``checkpoints/``) and the full
probability matrices of ``arrays/predictions.npz`` (confidence, prediction, label and correctness stay: enough to
redraw the reliability diagram and the confidence histograms). Runs and studies already in the destination are
never overwritten: the copy stops with an error naming the first one that exists.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.artifacts import atomic_savez  # noqa: E402

LEFT_OUT_DIRS = {"checkpoints"}
LEFT_OUT_ARRAYS = {"predictions": {"probs"}}


def ship(source: Path, into: Path) -> int:
    folders = [p for kind in ("runs", "studies") if (source / kind).is_dir() for p in sorted((source / kind).iterdir())]
    if not folders:
        raise SystemExit(f"error: {source} holds no runs/ or studies/; pass the artifacts root of the study")
    for folder in folders:
        target = into / folder.parent.name / folder.name
        if target.exists():
            raise SystemExit(f"error: {target} exists already; shipped results are never overwritten "
                             "(move it away first if you mean to replace it)")
    for folder in folders:
        target = into / folder.parent.name / folder.name
        shutil.copytree(folder, target, ignore=lambda _dir, names: [n for n in names if n in LEFT_OUT_DIRS])
        for name, dropped in LEFT_OUT_ARRAYS.items():
            path = target / "arrays" / f"{name}.npz"
            if path.is_file():
                with np.load(path, allow_pickle=False) as arrays:
                    kept = {k: arrays[k] for k in arrays.files if k not in dropped}
                atomic_savez(path, **kept)
    return len(folders)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="artifacts root the results study wrote")
    parser.add_argument("--into", type=Path, default=Path("artifacts/results"), help="shipped results store")
    args = parser.parse_args(argv)
    count = ship(args.source, args.into)
    print(f"shipped {count} run and study folders into {args.into}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
