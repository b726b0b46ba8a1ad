"""02's grid: one transfer run per (target, arch, seed, method) cell, each with a run id fixed by its study, fanned
out over workers (:mod:`workbench.fanout`), with the regime pilot."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

from ..artifacts import RunRecord, RunStore
from ..labels import labels_for, phi_verdict
from ..transfer import TransferConfig
from ..errors import StudyError
from .configs import LATEST, OFFICIAL, TransferStudyConfig, _parse_method
from .session import StudyRunStore


def latest_phi_run(store: RunStore) -> Optional[RunRecord]:
    """The newest finished meta-training result of a store: a ``meta_select`` run, or a ``meta_train`` run that is
    not one of a selection's candidates; None if there is none."""
    candidates = [r for r in store.list_runs(kind="meta_select") if r.status == "finished"]
    candidates += [r for r in store.list_runs(kind="meta_train") if r.status == "finished" and "parent" not in r.tags]
    candidates = [r for r in candidates if (r.path / "phi.pt").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.finished or r.created or "", r.run_id))


def resolve_study_phi(spec: str, store: RunStore) -> str:
    """The phi spec a grid passes to transfer: ``latest`` becomes that run's id; others are checked and kept."""
    from ..transfer import resolve_phi

    if spec == LATEST:
        record = latest_phi_run(store)
        if record is None:
            raise StudyError(f"phi='latest' but there is no finished meta-training run under {store.root}; run "
                             "notebooks/01_meta_train.ipynb first (workbench study run 01 --profile demo), or set "
                             "phi to 'official', a meta-train run id or a phi file")
        return record.run_id
    resolve_phi(spec, store)  # one line now if the phi does not exist, rather than after the first runs
    return spec


def limit_test(ds: Any, per_class: Optional[int]) -> Any:
    """The dataset with its test split cut to the first ``per_class`` images of every class (all if fewer)."""
    import torch

    if per_class is None:
        return ds
    y = ds.y_test
    keep = torch.zeros(len(y), dtype=torch.bool)
    for label in range(ds.num_classes):
        keep[torch.nonzero(y == label).flatten()[:per_class]] = True
    index = torch.nonzero(keep).flatten()
    return dataclasses.replace(ds, x_test=ds.x_test[index], y_test=ds.y_test[index])


def underfit_message(target: str, arch: str, seed: int, train: Optional[float], test: float) -> Optional[str]:
    """The warning for a Base run whose training-set accuracy is under ``OVERFIT_GAP`` above its test accuracy
    (None when it overfits, or when it has no training-set evaluation to judge by)."""
    from ..results import OVERFIT_GAP, UNDERFIT

    if train is None or train != train or train - test >= OVERFIT_GAP:
        return None
    return (f"Base on {target} / {arch} (seed {seed}) ends at {train:.1%} on its training images and {test:.1%} on "
            f"test, a gap of {100 * (train - test):.1f} points (under {100 * OVERFIT_GAP:.0f}): {UNDERFIT}; train "
            f"longer (steps) or on fewer images (per_class) for a budget where Base overfits")


def grid_cells(config: TransferStudyConfig) -> list[tuple[str, str, int, str]]:
    """(target, arch, seed, method spec) of every run, in the order they are made."""
    return [(t, a, s, m) for t in config.targets for a in config.archs for s in config.seeds for m in config.methods]


def cell_run_id(study_id: str, target: str, arch: str, seed: int, spec: str) -> str:
    """The run id of one grid cell: fixed by the study and the cell, so that a resumed study finds the run an
    earlier session made (or began) instead of starting another. Readable like a generated id: the study's
    creation time, ``transfer``, target, arch, method and seed, and four hex digits of a hash of the rest."""
    import hashlib

    from ..artifacts import slug

    name, phi = _parse_method(spec)
    digest = hashlib.sha1(f"{study_id}|{target}|{arch}|{seed}|{spec}".encode()).hexdigest()[:4]
    stamp = study_id[:15] if re.match(r"\d{8}-\d{6}", study_id) else slug(study_id)[:24]
    method = name + (f"-{slug(phi)[:12]}" if phi else "")
    parts = [stamp, "transfer", slug(target)[:24], slug(arch)[:24], slug(method)[:36], f"s{seed}"]
    return f"{'-'.join(p.strip('-') for p in parts)[:110]}-{digest}"


#: Seconds per million (training step x image x pixel) of a Conv-4 cell on one CPU thread here: the demo's cells
#: (600 steps of 64 images of 32x32, 30 MC samples) took about 40 s.
SECONDS_PER_MEGA_PIXEL_STEP = 1.0


def estimated_grid_seconds(config: TransferStudyConfig) -> float:
    """A rough serial time of the grid on one CPU thread, only to decide whether worker processes would pay for
    their start-up (:func:`workbench.fanout.plan_workers`); a GPU or a deeper network shifts it, not the choice."""
    work = config.steps * config.batch_size * config.image_size ** 2 / 1e6
    return len(grid_cells(config)) * work * SECONDS_PER_MEGA_PIXEL_STEP


_CELL_DATA: dict[tuple, Any] = {}  # the target dataset of this process's last cell: one target in memory at a time


def _cell_dataset(target: str, data_root: Optional[str], test_per_class: Optional[int]) -> Any:
    from ..data import load_dataset

    key = (target, data_root, test_per_class)
    if key not in _CELL_DATA:
        _CELL_DATA.clear()
        _CELL_DATA[key] = limit_test(load_dataset(target, root=data_root), test_per_class)
    return _CELL_DATA[key]


def transfer_cell(payload: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """One grid cell, in whichever process runs it: its run made, resumed from its checkpoint, started again (a
    run cut short before its first checkpoint), or read when an earlier session finished it. Returns the run id,
    its summary and which of those happened."""
    from ..transfer import transfer  # looked up when the cell runs, so a replaced transfer() is the one called

    store = StudyRunStore(payload["root"], payload["study_id"])
    run_id = payload["run_id"]
    values = context.place({**payload["config"], "run_name": run_id})
    config = TransferConfig.from_dict(values)
    dataset = _cell_dataset(config.target, config.data_root, payload["test_per_class"])
    progress = bool(payload.get("progress"))
    if not os.path.lexists(store.runs_dir / run_id):
        how = "new"
        result = transfer(config, store, progress=progress, dataset=dataset)
    else:
        record = store.run_record(run_id)
        if record.status == "finished":
            return {"run_id": run_id, "summary": store.open_run(run_id).summary, "how": "done"}
        if record.status != "corrupt" and store.open_run(run_id).has_checkpoint("last"):
            how = "resumed"
            result = transfer(config, store, progress=progress, resume=run_id, dataset=dataset)
        else:
            how = "restarted"
            store.discard_run(run_id)  # cut short before its first checkpoint: nothing to keep
            result = transfer(config, store, progress=progress, dataset=dataset)
    return {"run_id": result.run_id, "summary": result.summary, "how": how}


def run_transfer_grid(config: TransferStudyConfig, store: RunStore, progress: bool = True):
    """Train every cell of the grid (one transfer run each, written to ``store``) and return one row per run, in
    grid order: run_id, target, arch, seed, method, phi, label, test_accuracy, test_nll, test_ece, mc_samples,
    train_examples, test_examples, train_seconds.

    Cells run as ``config.workers`` / ``executor`` say (see :mod:`workbench.fanout`). Each writes the run id
    :func:`cell_run_id` gives, so a grid run again in the same study (``workbench study resume``, or the cell run
    again in JupyterLab) keeps the finished runs and resumes or restarts the others. A cell that still fails
    after ``retries`` further attempts does not stop the others; the grid then ends with a StudyError naming it."""
    import pandas as pd

    from ..fanout import Cell, plan_workers, run_cells
    from ..regularizers import build_regularizer

    uses_ours = any(_parse_method(m)[1] is None and build_regularizer(_parse_method(m)[0]).needs_phi
                    for m in config.methods)
    ours = resolve_study_phi(config.phi, store) if uses_ours else None
    verdict = phi_verdict(store, ours) if uses_ours else None
    if uses_ours:
        print(f"our phi: {ours}" + (" (phi='latest')" if config.phi == LATEST else ""))
        if verdict is not None and not verdict["learned"]:
            print(f"warning: our phi {verdict['message']}; its rows are labelled so")
    study_id = getattr(store, "study_id", None)
    if not study_id:
        raise StudyError("run_transfer_grid needs the study's store (session.store): its cells are runs of a study")
    grid = grid_cells(config)
    plan = plan_workers(config.workers, config.threads, config.device, len(grid),
                        executor=config.executor, address=config.ray_address,
                        serial_seconds=estimated_grid_seconds(config))
    print(f"{len(grid)} cells; {plan.describe()}")
    cells: list[Cell] = []
    meta: dict[str, tuple[str, str, int, str]] = {}
    pilots: dict[tuple[str, str], str] = {}
    for target, arch, seed, spec in grid:
        run_id = cell_run_id(study_id, target, arch, seed, spec)
        meta[run_id] = (target, arch, seed, spec)
        if _parse_method(spec)[0] == "base" and config.regime_check != "off":
            pilots.setdefault((target, arch), run_id)
        # with regime_check=stop the other methods of an (arch, target) wait for its pilot's verdict
        pilot = pilots.get((target, arch))
        after = (pilot,) if config.regime_check == "stop" and pilot and pilot != run_id else ()
        payload = {"root": str(store.root), "study_id": study_id, "run_id": run_id,
                   "config": config.transfer_config(target, arch, spec, seed, phi=ours or OFFICIAL).to_dict(),
                   "test_per_class": config.test_per_class, "progress": progress and not plan.parallel}
        cells.append(Cell(run_id, f"{target} {arch} {spec} seed {seed}", payload, after))
    # A pilot listed after other methods of its (arch, target) still gates nothing it comes after, as serially.
    pilot_ids = set(pilots.values())
    regime_warnings: dict[str, str] = {}  # by pilot; listed in grid order whatever order the cells finish in

    def on_result(cell: Cell, value: Mapping[str, Any]) -> None:
        if cell.key not in pilot_ids:
            return
        target, arch, seed, _ = meta[cell.key]
        s = value["summary"]
        message = underfit_message(target, arch, seed, s.get("train_eval_accuracy"), s["test_accuracy"])
        if message and config.regime_check == "stop":
            raise StudyError(f"{message}; stopped (regime_check=stop; regime_check=warn runs the grid anyway)")
        if message:
            regime_warnings[cell.key] = message
            print(f"warning: {message}")

    outcomes = run_cells(cells, transfer_cell, plan, retries=config.retries, on_result=on_result,
                         progress=progress, desc="transfer grid")
    kept = sum(o.status == "finished" and o.value["how"] == "done" for o in outcomes.values())
    if kept:
        print(f"{kept} of {len(cells)} cells were finished by an earlier session of this study and kept")
    failed = [(meta[k], o) for k, o in outcomes.items() if o.status != "finished"]
    if failed:
        shown = "; ".join(f"{t} {a} {m} seed {s}: {o.error}" for (t, a, s, m), o in failed[:3])
        raise StudyError(f"{len(failed)} of {len(cells)} cells did not finish ({shown}"
                         f"{'; ...' if len(failed) > 3 else ''}); the others are kept: resume the study "
                         f"(`workbench study resume {study_id}`) to try these again")
    rows = []
    for key, outcome in outcomes.items():
        target, arch, seed, spec = meta[key]
        s = outcome.value["summary"]
        name, own = _parse_method(spec)
        phi = (own or ours) if build_regularizer(name, config.method_options.get(name) or {}).needs_phi else None
        rows.append({"run_id": outcome.value["run_id"], "target": target, "arch": arch, "seed": int(seed),
                     "method": name, "phi": phi,
                     "test_accuracy": s["test_accuracy"], "test_nll": s["test_nll"], "test_ece": s["test_ece"],
                     "train_eval_accuracy": s.get("train_eval_accuracy"),
                     "generalization_gap": s.get("generalization_gap"),
                     "mc_samples": s["mc_samples"], "train_examples": s["train_examples"],
                     "test_examples": s["test_examples"], "train_seconds": s["train_seconds_last_session"]})
    frame = pd.DataFrame(rows)
    # every phi's verdict (ours, or a meta-train run named with @), labelled as the dashboard labels the runs
    frame.insert(6, "label", labels_for(store, frame["method"], frame["phi"]))
    frame.attrs["our_phi"] = ours
    frame.attrs["regime_warnings"] = [regime_warnings[c.key] for c in cells if c.key in regime_warnings]
    frame.attrs["workers"] = plan.describe()
    return frame
