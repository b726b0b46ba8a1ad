"""Synthetic artifacts for the dashboard's tests and benchmark, written through the real run store.

Every run is created with :class:`workbench.artifacts.RunStore` and carries the files, array names and metric
stages that ``workbench/transfer.py`` and ``workbench/meta_train.py`` write (see ``workbench/results.py``),
with made-up numbers: a method/target/arch-dependent accuracy plus seed noise, miscalibrated confidences, per-site
scales that vary with depth and target. :func:`add_corrupt` adds the broken and foreign entries a real root can
collect (half-written, foreign, newer-schema, symlinks out of the root, files of the wrong types, a finished run
without its predictions: :func:`add_damaged_runs`).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from workbench import artifacts
from workbench.artifacts import RunStore
from workbench.evaluate import reliability_bins

SITES = {  # channels per perturbation site, as attach() places them
    "resnet20": [16, 16, 16, 32, 32, 32, 64, 64, 64],
    "conv4": [32, 32, 32, 32],
}
TARGET_DIFFICULTY = {"cifar10": 0.55, "fashion_mnist": 0.82, "mnist_test10k": 0.93, "omniglot_small": 0.60,
                     "imagenette64": 0.48}
METHOD_GAIN = {"base": 0.0, "dropblock": 0.01, "manifold_mixup": 0.015, "information_dropout": 0.005,
               "metaperturb": 0.03}
NORM_EPS = {"linf": [1 / 255, 2 / 255, 4 / 255, 8 / 255], "l2": [0.1, 0.25, 0.5, 1.0]}


@contextlib.contextmanager
def fast_environment() -> Iterator[None]:
    """Skip the per-run environment probe (git status, nvidia-smi) and the fsyncs of the atomic writes: both are
    slow (fsync on a busy disk dominates writing 1,000 runs) and irrelevant to throwaway synthetic runs. The files
    are still written to a temporary name and renamed, exactly as the stages write them."""
    original_env, original_fsync = artifacts.environment_info, os.fsync
    artifacts.environment_info = lambda: {"python": "synthetic", "git_revision": None}
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        artifacts.environment_info, os.fsync = original_env, original_fsync


def write_transfer_run(store: RunStore, target: str, arch: str, method: str, seed: int, *, phi: str | None = None,
                       study_id: str | None = None, arrays: bool = True, robust: bool = False, steps: int = 50,
                       status: str = "finished", examples: int = 400, run_id: str | None = None):
    """One transfer run with config, curves, summary and (``arrays=True``) predictions, reliability bins, site
    scales (MetaPerturb only) and robustness curves (``robust=True``); ``run_id`` names it (else generated)."""
    rng = np.random.default_rng(seed * 1009 + len(target) * 31 + len(arch) * 7 + len(method))
    tags = {"target": target, "arch": arch, "method": method, "seed": seed}
    if method == "metaperturb":
        phi = phi or "official"
        tags.update(phi=phi, source=phi)
    config = {"target": target, "arch": arch, "method": method, "seed": seed, "steps": steps, "phi": phi,
              "per_class": 200, "lr": 1e-3}
    run = store.create_run("transfer", config, tags=tags, study_id=study_id, run_id=run_id)
    accuracy = min(0.99, TARGET_DIFFICULTY.get(target, 0.6) - (0.04 if arch == "conv4" else 0.0)
                   + METHOD_GAIN.get(method, 0.0) + rng.normal(0, 0.01))
    for step in range(10, steps + 1, 10):
        frac = step / steps
        run.log_metrics(step, "train", loss=2.3 * (1 - 0.7 * frac) + rng.normal(0, 0.02),
                        accuracy=min(1.0, accuracy * (0.5 + 0.6 * frac)), lr=1e-3)
        if step == steps // 2:
            run.log_metrics(step, "test", accuracy=accuracy * 0.9, nll=1.2, ece=0.08, mc_samples=5)
    if status == "failed":
        run.mark_failed("ValueError: synthetic failure at step 30")
        return run
    if status == "running":
        return run
    confidence = np.clip(rng.beta(6 if method == "base" else 4, 2, size=examples), 0.05, 1.0)
    shift = 0.12 if method == "base" else 0.03  # Base is over-confident: accuracy below confidence
    correct = rng.random(examples) < np.clip(confidence - shift, 0, 1)
    bins = reliability_bins(confidence, correct, 15)
    ece = float(np.sum(bins["count"] / examples * np.abs(bins["accuracy"] - bins["confidence"])))
    summary = {"test_accuracy": float(accuracy), "test_nll": float(1.0 - accuracy + 0.3), "test_ece": ece,
               "mc_samples": 100 if method == "metaperturb" else 1, "test_examples": examples, "steps": steps,
               "method": method, "arch": arch, "target": target,
               # Base overfits everywhere but on Fashion-MNIST, where it ends at its test accuracy
               "train_eval_accuracy": float(accuracy if target == "fashion_mnist" else min(1.0, accuracy + 0.3))}
    if arrays:
        predicted = rng.integers(0, 10, size=examples)
        label = np.where(correct, predicted, (predicted + 1) % 10)
        run.save_arrays("predictions", confidence=confidence.astype(np.float32), predicted=predicted,
                        label=label, correct=correct)
        run.save_arrays("reliability", **bins)
        if method == "metaperturb":
            channels = SITES.get(arch, [16, 32])
            scale = np.full((len(channels), max(channels)), np.nan, dtype=np.float32)
            level = 0.3 + 0.4 * TARGET_DIFFICULTY.get(target, 0.6)
            for i, c in enumerate(channels):
                depth = i / max(1, len(channels) - 1)
                scale[i, :c] = np.clip(level * (1 - 0.5 * depth) + rng.normal(0, 0.05, size=c), 0.01, 0.99)
            run.save_arrays("site_scales", site_names=np.asarray([f"layer{i}" for i in range(len(channels))]),
                            channels=np.asarray(channels), scale=scale,
                            multiplier_mean=np.linspace(0.9, 0.6, len(channels)),
                            multiplier_std=np.linspace(0.2, 0.4, len(channels)))
            summary["sites"] = len(channels)
            summary["mean_scale"] = float(np.nanmean(scale))
        if robust:
            out = {"norms": np.asarray(list(NORM_EPS), dtype=str), "clean_accuracy": np.asarray(accuracy)}
            for norm, eps in NORM_EPS.items():
                acc = [accuracy * np.exp(-(3 if method == "base" else 2) * k / len(eps)) for k in range(1, len(eps) + 1)]
                out[f"{norm}_eps"] = np.asarray(eps)
                out[f"{norm}_accuracy"] = np.asarray(acc)
                for e, a in zip(eps, acc):
                    summary[f"robust_{norm}_{e:.6g}"] = float(a)
            run.save_arrays("robustness", **out)
    run.log_metrics(steps, "final", accuracy=accuracy, nll=summary["test_nll"], ece=ece,
                    mc_samples=summary["mc_samples"])
    run.mark_finished(summary)
    return run


def write_meta_train_run(store: RunStore, seed: int = 0, *, tasks: int = 3, steps: int = 40, study_id: str | None = None):
    """A meta-training run: per-task train/held-out curves (stage meta_train), phi statistics (stage phi),
    per-site scale and noise statistics over training (arrays/site_stats.npz), a phi checkpoint."""
    rng = np.random.default_rng(100 + seed)
    config = {"source": "tinyimagenet32", "arch": "resnet20", "num_tasks": tasks, "steps": steps, "seed": seed}
    run = store.create_run("meta_train", config, tags={"source": "tinyimagenet32", "arch": "resnet20", "seed": seed,
                                                       "num_tasks": tasks}, study_id=study_id)
    logged = list(range(10, steps + 1, 10))
    channels = SITES["resnet20"]
    for step in logged:
        frac = step / steps
        for task in range(tasks):
            run.log_metrics(step, "meta_train", task=task, train_loss=3.0 - frac, train_acc=0.2 + 0.4 * frac,
                            heldout_loss=3.2 - frac + rng.normal(0, 0.02), heldout_acc=0.15 + 0.35 * frac)
        run.log_metrics(step, "phi", grad_norm=0.1 / frac, norm=1.0 + frac, scale_mean=0.5 - 0.1 * frac,
                        dist_init=frac, dist_official=2.0 - frac, grad_cosine=0.1, task_grad_norm=0.3,
                        scale_site_range=0.1 * frac, scale_channel_std=0.01 * frac,
                        train_acc_mean=0.2 + 0.4 * frac, heldout_acc_mean=0.15 + 0.35 * frac)
    depth = np.linspace(0, 1, len(channels))
    scale = np.stack([np.stack([0.5 - 0.2 * depth * (s / steps) + rng.normal(0, 0.01, len(channels))
                                for _ in range(tasks)]) for s in logged])
    run.save_arrays("site_stats", steps=np.asarray(logged), scale_mean=scale, multiplier_mean=scale * 1.5,
                    multiplier_std=scale * 0.5, site_names=np.asarray([f"layer{i}" for i in range(len(channels))]),
                    task_names=np.asarray([f"task{i}" for i in range(tasks)]))
    run.save_json("task_split", {"tasks": [{"classes": list(range(i * 10, i * 10 + 10))} for i in range(tasks)]})
    run.save_json("phi_diagnostics", {
        "learned": True, "verdict": "learned", "function_change": 0.2, "threshold": 0.02,
        "message": "learned: phi's function moved by 0.200 from its initialisation (threshold 0.02)",
        "sites": [{"site": f"layer{i}", "channels": c, "scale": 0.7 - 0.01 * i, "scale_init": 0.5,
                   "scale_official": 0.71 - 0.01 * i, "scale_channel_std": 0.01, "multiplier_mean": 0.5,
                   "multiplier_mean_init": 0.4, "multiplier_std": 0.3, "multiplier_std_init": 0.26}
                  for i, c in enumerate(channels)]})
    run.mark_finished({"steps": steps, "heldout_acc_mean": 0.5, "seed": seed, "final_means": {"heldout_acc": 0.5},
                       "chance": 0.1})
    return run


def write_notebook(path: Path, title: str) -> None:
    notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [f"# {title}"]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    artifacts.atomic_write_json(path, notebook)


def populate(root: str | os.PathLike, *, targets: Sequence[str] = ("cifar10", "fashion_mnist"),
             archs: Sequence[str] = ("resnet20", "conv4"), methods: Sequence[str] = ("base", "dropblock", "metaperturb"),
             seeds: Sequence[int] = (0, 1), arrays: bool = True, meta_runs: int = 1, study: bool = True,
             limit: int | None = None, study_runs: int = 100) -> RunStore:
    """A store with a finished study of transfer runs over targets x archs x methods x seeds (the first target
    with robustness curves), ``meta_runs`` meta-training runs, one running and one failed transfer run.
    ``limit`` caps the number of transfer runs (the grid is cycled with new seeds until it is reached); the first
    ``study_runs`` of them belong to the study (each addition rewrites study.json, so a huge study is slow)."""
    store = RunStore(root)
    with fast_environment():
        study_obj = store.create_study("notebooks/02_transfer_study.ipynb", "smoke",
                                       {"targets": list(targets), "seeds": list(seeds)}) if study else None
        sid = study_obj.study_id if study_obj else None
        for seed in range(meta_runs):
            write_meta_train_run(store, seed, study_id=sid)
        grid = [(t, a, m) for t in targets for a in archs for m in methods]
        total = limit if limit is not None else len(grid) * len(seeds)
        for k in range(total):
            target, arch, method = grid[k % len(grid)]
            seed = seeds[k // len(grid)] if k // len(grid) < len(seeds) else k // len(grid)
            write_transfer_run(store, target, arch, method, seed, study_id=sid if k < study_runs else None, arrays=arrays,
                               robust=arrays and target == targets[0])
        write_transfer_run(store, targets[0], archs[0], "base", 99, status="running", arrays=False)
        write_transfer_run(store, targets[0], archs[0], "dropblock", 98, status="failed", arrays=False)
        if study_obj is not None:
            write_notebook(study_obj.executed_notebook_path, "transfer study (smoke)")
            study_obj.mark_finished()
    return store


def add_corrupt(root: str | os.PathLike, outside: str | os.PathLike) -> dict[str, str]:
    """Broken and foreign entries, by name -> what is wrong with it. ``outside`` is a folder outside the root
    (symlink targets point there; it gets a secret file the app must never show)."""
    root, outside = Path(root), Path(outside)
    runs, studies = root / "runs", root / "studies"
    runs.mkdir(parents=True, exist_ok=True)
    studies.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text("TOP-SECRET-OUTSIDE-ROOT")
    (outside / "run.json").write_text(json.dumps({"schema_version": 1, "run_id": "escape", "kind": "transfer",
                                                  "status": "finished", "created": "2026-01-01T00:00:00+00:00"}))
    made = {}
    (runs / "foreign-folder").mkdir()
    (runs / "foreign-folder" / "notes.txt").write_text("not a run")
    made["foreign-folder"] = "no run.json"
    (runs / "half-written").mkdir()
    (runs / "half-written" / "config.json").write_text("{}")
    (runs / "half-written" / "run.json").write_text('{"schema_version": 1, "run_id": "half-wr')
    made["half-written"] = "not valid JSON"
    (runs / "newer-schema").mkdir()
    (runs / "newer-schema" / "run.json").write_text(json.dumps({"schema_version": 99, "run_id": "newer-schema"}))
    made["newer-schema"] = "newer"
    (runs / "stray-file.txt").write_text("junk")
    made["stray-file.txt"] = "a file"
    os.symlink(outside, runs / "escape")
    made["escape"] = "outside the artifacts root"
    (studies / "broken-study").mkdir()
    (studies / "broken-study" / "study.json").write_text("[1, 2")
    made["broken-study"] = "not valid JSON"
    (studies / "evil-study").mkdir()
    (studies / "evil-study" / "study.json").write_text(json.dumps({
        "schema_version": 1, "study_id": "evil-study", "notebook": "x.ipynb", "profile": "smoke",
        "created": "2026-01-01T00:00:00+00:00", "status": "finished", "run_ids": [], "parameters": {},
        "executed_notebook": "../../../secret.txt"}))
    made["evil-study"] = "not a file name inside the study folder"
    (root / "junk-folder").mkdir()
    made["junk-folder"] = "foreign folder"
    made.update(add_damaged_runs(root, outside))
    return made


SECRET = "TOP-SECRET-OUTSIDE-ROOT"
NOTICE = "arrays/predictions.npz is missing"


def add_damaged_runs(root: str | os.PathLike, outside: str | os.PathLike) -> dict[str, str]:
    """Finished transfer runs (readable run.json) damaged in one file each, by run id -> a fragment of the reason
    the store gives: wrong types (run.json tag, summary.json, config.json, a metrics row, an npz array), files and
    folders leading outside the root through symlinks, a file where a folder belongs, garbage npz files. The run
    ``missing-arrays`` lacks its predictions: readable, with the notice :data:`NOTICE`. Everything outside the root
    holds :data:`SECRET`, which no reader may show."""
    root, outside = Path(root), Path(outside)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "config.json").write_text(json.dumps({"secret": SECRET, "target": SECRET}))
    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": SECRET, "wall_time": 1.0, "loss": 1.0}) + "\n")
    secret_arrays = outside / "arrays"
    secret_arrays.mkdir(exist_ok=True)
    artifacts.atomic_savez(secret_arrays / "predictions.npz", confidence=np.full(4, 0.5, np.float32))
    artifacts.atomic_savez(secret_arrays / "site_scales.npz", site_names=np.asarray([SECRET]), scale=np.ones((1, 2)))
    store = RunStore(root)
    made: dict[str, str] = {}

    def damaged(run_id: str, fragment: str, method: str = "metaperturb"):
        with fast_environment():
            run = write_transfer_run(store, "cifar10", "resnet20", method, 7, run_id=run_id)
        made[run_id] = fragment
        return run.path

    def relink(path: Path, target: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        os.symlink(target, path)

    path = damaged("bad-tag-list", "tag 'seed' holds a list")
    meta = json.loads((path / "run.json").read_text())
    meta["tags"]["seed"] = [1, 2]
    (path / "run.json").write_text(json.dumps(meta))
    path = damaged("bad-summary-type", "summary.json test_accuracy is a string")
    summary = json.loads((path / "summary.json").read_text()) | {"test_accuracy": "high"}
    (path / "summary.json").write_text(json.dumps(summary))
    path = damaged("bad-config-type", "config.json holds a JSON list")
    (path / "config.json").write_text("[1, 2]")
    path = damaged("bad-metrics-row", "metrics.jsonl line 2: step is a string")
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "step": "20"})
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    path = damaged("bad-array-type", "arrays/predictions.npz array 'confidence' has dtype <U")
    artifacts.atomic_savez(path / "arrays" / "predictions.npz", confidence=np.asarray(["high", "low"]))
    path = damaged("garbage-arrays", "npz is not a readable npz file")
    (path / "arrays" / "site_scales.npz").write_bytes(b"not a zip file")
    (path / "arrays" / "reliability.npz").write_bytes(b"PK\x03\x04 torn")
    path = damaged("config-out", "config.json is a symlink leading outside the artifacts root")
    relink(path / "config.json", outside / "config.json")
    path = damaged("metrics-out", "metrics.jsonl is a symlink leading outside the artifacts root")
    relink(path / "metrics.jsonl", outside / "metrics.jsonl")
    path = damaged("arrays-out", "arrays is a symlink leading outside the artifacts root")
    relink(path / "arrays", secret_arrays)
    path = damaged("npz-out", "arrays/site_scales.npz is a symlink leading outside the artifacts root")
    relink(path / "arrays" / "site_scales.npz", secret_arrays / "site_scales.npz")
    path = damaged("arrays-a-file", "arrays is a file, not a folder")
    relink(path / "arrays", outside / "config.json")  # first a link out, then a plain file in its place
    (path / "arrays").unlink()
    (path / "arrays").write_text("not a folder")
    path = damaged("missing-arrays", NOTICE, method="base")
    (path / "arrays" / "predictions.npz").unlink()
    return made
