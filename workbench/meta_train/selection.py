"""``num_runs`` candidates under one ``meta_select`` run: fanned out or run in turn, then the best phi chosen on
the selection target (or the held-out source splits)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .._distributed import DistContext
from ..artifacts import Run, RunStore
from ..data import ImageDataset, load_dataset, target_view
from .._runtime import config_difference, cpu_copy, derive_seed, resolve_device
from ..errors import WorkbenchError
from ..fanout import FanOutSettings
from ..perturb import MetaPerturb
from ..transfer import TransferConfig, transfer
from .config import MetaTrainConfig, PHI_FILE, RESUME_MUTABLE, SELECT_KIND, _SEED_SELECT
from .trainer import SourceData, prepare_source
from .runs import MetaTrainResult, open_on_main, _run_one, _runtime


# ============================================================================================ selection
def selection_dataset(config: MetaTrainConfig) -> ImageDataset:
    """``config.select_target`` as the selection sees it: ``select_per_class`` training images per class to train
    on, and ``select_valid_per_class`` other *training* images per class as its test split (the real test split is
    never used to choose a phi)."""
    ds = load_dataset(config.select_target, root=config.data_root)
    view = target_view(ds, per_class=config.select_per_class, image_size=config.image_size, channels=3,
                       seed=derive_seed(config.seed, _SEED_SELECT), valid_per_class=config.select_valid_per_class)
    return ImageDataset(name=ds.name, x_train=view.train.x, y_train=view.train.y, x_test=view.valid.x,
                        y_test=view.valid.y, classes=list(ds.classes), flip=ds.flip,
                        source=f"{ds.source} (selection split: {config.select_per_class} train + "
                               f"{config.select_valid_per_class} held-out training images per class)")


def selection_transfer_config(config: MetaTrainConfig, phi: str, device: torch.device | str,
                              train_size: int) -> TransferConfig:
    """The transfer run that scores one candidate phi: a fresh ``config.arch`` trained ``select_steps`` steps with
    the frozen phi by the target recipe shortened (Adam with the task networks' lr and weight decay held constant,
    the noise ramp and clip of training), scored with ``select_mc_samples`` Monte-Carlo samples. Every candidate
    gets the same initialisation and batches (the selection's seed); ``train_size``: the selection's training
    images (a smaller set is one batch)."""
    return TransferConfig.from_dict(dict(
        target=config.select_target, data_root=config.data_root, arch=config.arch, method="metaperturb", phi=phi,
        seed=config.seed, image_size=config.image_size, channels=3, steps=config.select_steps,
        batch_size=min(config.batch_size, train_size), lr=config.lr, weight_decay=config.weight_decay,
        lr_milestones=[], clip=config.clip, eval_every=0, final_mc_samples=config.select_mc_samples,
        train_eval_examples=0, normalization=config.normalization, checkpoint_every=None, device=str(device),
        compile_sites=config.compile_sites, cuda_graphs=config.cuda_graphs, precision=config.precision))


def transfer_score(phi: MetaPerturb, config: MetaTrainConfig, device: torch.device, progress: bool = False,
                   dataset: Optional[ImageDataset] = None) -> float:
    """Accuracy on the selection's held-out training images of :func:`~workbench.transfer.transfer` run with the
    frozen ``phi`` (:func:`selection_transfer_config`, on :func:`selection_dataset`). The run is written to a
    scratch store and dropped: the selection's record is its score in the ``meta_select`` run."""
    dataset = dataset if dataset is not None else selection_dataset(config)
    with tempfile.TemporaryDirectory(prefix="workbench-select-") as scratch:
        phi_file = phi.save(Path(scratch) / PHI_FILE)
        recipe = selection_transfer_config(config, str(phi_file), device, len(dataset.y_train))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = transfer(recipe, RunStore(Path(scratch) / "store"), progress=progress, dataset=dataset)
    return float(result.summary["test_accuracy"])


def _select(config: MetaTrainConfig, results: list[MetaTrainResult], dist: DistContext, device: torch.device,
            progress: bool, held_out: Optional[ImageDataset] = None) -> dict[str, Any]:
    """Score every run's phi on the selection target and pick the best (ties: the earliest run)."""
    if config.select_target == "heldout":
        scores = [float(r.summary["heldout_acc_mean"]) for r in results]
        metric = "mean accuracy of the final task networks on their whole held-out source splits"
    else:
        # candidates are dealt over the processes like tasks; the scores are summed back
        local = torch.zeros(len(results), dtype=torch.float64, device=device)
        held_out = held_out if held_out is not None else selection_dataset(config)
        for index, result in enumerate(results):
            if index % dist.world_size == dist.rank:
                local[index] = transfer_score(result.phi, config, device, progress and dist.is_main, held_out)
        scores = dist.all_reduce_sum_(local).cpu().tolist()
        metric = (f"validation accuracy on {config.select_target} ({config.select_valid_per_class} held-out training "
                  f"images per class, {config.select_mc_samples} MC samples) of a fresh {config.arch} trained "
                  f"{config.select_steps} steps on {config.select_per_class} images per class with the frozen phi")
    best = int(np.argmax(scores))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    runner_up = scores[order[1]] if len(order) > 1 else None
    reason = (f"run {best} ({results[best].run_id}, seed {results[best].summary['seed']}) has the highest {metric}: "
              f"{scores[best]:.4f}" + (f" (next best {runner_up:.4f})" if runner_up is not None else ""))
    return {
        "select_target": config.select_target,
        "metric": metric,
        "candidates": [{"index": i, "run_id": r.run_id, "seed": r.summary["seed"], "score": s,
                        "heldout_acc_mean": r.summary["heldout_acc_mean"]}
                       for i, (r, s) in enumerate(zip(results, scores))],
        "chosen_index": best,
        "chosen_run_id": results[best].run_id,
        "chosen_score": scores[best],
        "reason": reason,
    }


def _run_many(config: MetaTrainConfig, data: SourceData, store: Optional[RunStore], progress: bool,
              dist: DistContext, device: torch.device, resume_id: Optional[str] = None,
              dataset: Optional[ImageDataset] = None, held_out: Optional[ImageDataset] = None) -> MetaTrainResult:
    """``num_runs`` independent runs (seeds seed..seed+num_runs-1) under one meta_select run, then selection."""

    def open_parent(hold) -> tuple[str, list]:
        if resume_id is not None:
            parent = hold(store.resume_run(resume_id, SELECT_KIND))  # one writer (see _run_one)
            if parent.status == "finished":
                raise WorkbenchError(f"run {resume_id} already finished (chose {parent.summary.get('chosen_run_id')}); "
                                     f"nothing to resume")
            differ = config_difference(parent.config, config, RESUME_MUTABLE)
            if differ:
                raise WorkbenchError(f"run {resume_id} was started with a different config ({', '.join(differ)}); "
                                     f"resume it without --config/--set")
            parent.mark_running()
            children = parent.load_json("children") if "children" in parent.list_json() else []
            states = [_child_state(store, c) for c in children]
            # candidates are named after their parent: ones begun but not yet listed are found by name
            states += [_child_state(store, candidate_run_id(resume_id, i))
                       for i in range(len(states), config.num_runs)]
        else:
            tags = {"source": config.source, "arch": config.arch, "num_runs": config.num_runs,
                    "select_target": config.select_target}
            parent = hold(store.create_run(SELECT_KIND, config, tags=tags, run_id=config.run_name))
            states = [(candidate_run_id(parent.run_id, i), None, False) for i in range(config.num_runs)]
        return parent.run_id, states

    parent, (parent_id, states) = open_on_main(dist, open_parent)
    try:
        return _select_runs(config, data, store, progress, dist, device, parent, parent_id, states, dataset, held_out)
    finally:
        if parent is not None:
            parent.release_lock()


def candidate_run_id(parent_id: str, index: int) -> str:
    """The run id of candidate ``index`` of a ``meta_select`` run: fixed, so that a resumed selection finds the
    candidates an interrupted one began, whichever process ran them."""
    return f"{parent_id[:120]}-r{index}"


def _child_state(store: RunStore, run_id: str) -> tuple[str, Optional[str], bool]:
    """(run id, status or None when there is no such run, whether it has a checkpoint to resume from)."""
    if not (store.runs_dir / run_id).is_dir():
        return run_id, None, False
    record = store.run_record(run_id)
    if record.status == "corrupt":
        return run_id, "corrupt", False
    return run_id, record.status, store.open_run(run_id).has_checkpoint("last")


def _candidate_config(config: MetaTrainConfig, parent_id: str, index: int) -> MetaTrainConfig:
    return config.replace(num_runs=1, seed=config.seed + index, run_name=candidate_run_id(parent_id, index),
                          **FanOutSettings().to_dict())  # a candidate runs in one process


def run_candidate(payload: Mapping[str, Any], context: Any) -> str:
    """One candidate of a fanned-out ``meta_select`` run, in a worker (:mod:`workbench.fanout`): made, resumed from
    its checkpoint, or started again; returns its run id."""
    config = MetaTrainConfig.from_dict(context.place(payload["config"]))
    store = RunStore(payload["root"])
    device = resolve_device(config.device)
    with _runtime(config, device):
        data = prepare_source(config, payload.get("dataset"))
        result = _run_unfinished(config, tuple(payload["state"]), data, store, False, DistContext(), device,
                                 payload["parent"], payload["index"])
    return result.run_id


def _run_unfinished(child: MetaTrainConfig, state: tuple, data: SourceData, store: RunStore, progress: bool,
                    dist: DistContext, device: torch.device, parent_id: str, index: int) -> MetaTrainResult:
    """Candidate ``index`` (config ``child``) from its ``state`` (run id, status, has a checkpoint): resumed from
    its checkpoint, or started (again: one begun and cut short before its first checkpoint is discarded first)."""
    run_id, status, resumable = state
    if resumable:
        return _run_one(child.replace(run_name=None), data, store, progress, dist, device, resume_id=run_id)
    if status is not None and dist.is_main:
        store.discard_run(run_id)
    return _run_one(child, data, store, progress, dist, device, tags={"parent": parent_id, "run_index": index},
                    run_id=child.run_name)


def _fan_out_candidates(config: MetaTrainConfig, store: RunStore, progress: bool, parent_id: str, states: list,
                        dataset: Optional[ImageDataset]) -> None:
    """Run the unfinished candidates in worker processes (or on Ray); a candidate that still fails stops the
    selection with its error, the finished ones kept for a resume."""
    from ..fanout import Cell, plan_workers, run_cells

    cells = []
    for index in range(config.num_runs):
        state = states[index]
        if state[1] == "finished":
            continue
        child = _candidate_config(config, parent_id, index)
        payload = {"root": str(store.root), "config": child.to_dict(), "state": state, "parent": parent_id,
                   "index": index, "dataset": dataset}
        cells.append(Cell(child.run_name, f"candidate {index} (seed {child.seed})", payload))
    if not cells:
        return
    plan = plan_workers(config.workers, config.threads, config.device, len(cells), executor=config.executor,
                        address=config.ray_address)
    if not plan.parallel:
        return
    print(f"{len(cells)} candidate run(s); {plan.describe()}", file=sys.stderr)
    outcomes = run_cells(cells, run_candidate, plan, retries=config.retries, progress=progress,
                         desc="meta-train candidates")
    failed = [(key, o) for key, o in outcomes.items() if o.status != "finished"]
    if failed:
        raise WorkbenchError(f"{len(failed)} of {len(cells)} candidate runs did not finish ({failed[0][0]}: "
                             f"{failed[0][1].error}); resume the selection with --resume {parent_id}")


def _select_runs(config: MetaTrainConfig, data: SourceData, store: Optional[RunStore], progress: bool,
                 dist: DistContext, device: torch.device, parent: Optional[Run], parent_id: str,
                 states: list, dataset: Optional[ImageDataset] = None,
                 held_out: Optional[ImageDataset] = None) -> MetaTrainResult:
    """The candidate runs of a ``meta_select`` run (``parent`` on rank 0, holding its writer lock), then selection
    (on ``held_out``, the :func:`selection_dataset` when the caller has it already).

    In one process the unfinished candidates fan out first (``workers``, ``executor``); every candidate is then
    read back, or run here, in index order."""
    if not dist.enabled and config.num_runs > 1 and (config.workers != 1 or config.executor == "ray"):
        _fan_out_candidates(config, store, progress, parent_id, states, dataset)
        states = [state if state[1] == "finished" else _child_state(store, state[0]) for state in states]
    results: list[MetaTrainResult] = []
    for index in range(config.num_runs):
        child = _candidate_config(config, parent_id, index)
        state = states[index]
        if state[1] == "finished":
            results.append(_finished_result(store, state[0], dist))
        else:
            results.append(_run_unfinished(child, state, data, store, progress, dist, device, parent_id, index))
        if parent is not None:
            parent.save_json("children", [r.run_id for r in results])

    selection = _select(config, results, dist, device, progress, held_out)
    chosen = results[selection["chosen_index"]]
    summary = {"chosen_run_id": chosen.run_id, "chosen_score": selection["chosen_score"],
               "select_target": config.select_target, "reason": selection["reason"], "phi_path": PHI_FILE,
               "run_ids": [r.run_id for r in results], "scores": [c["score"] for c in selection["candidates"]]}
    phi_path = None
    if parent is not None:
        parent.save_json("selection", selection)
        phi_path = chosen.phi.save(parent.path / PHI_FILE, chosen_run_id=chosen.run_id, reason=selection["reason"])
        parent.mark_finished(summary)
    return MetaTrainResult(run_id=chosen.run_id, phi=chosen.phi, phi_path=phi_path, summary=summary,
                           run_ids=[r.run_id for r in results], selection_run_id=parent_id, selection=selection)


def _finished_result(store: Optional[RunStore], run_id: str, dist: DistContext) -> MetaTrainResult:
    """A finished child run's phi and summary, read by rank 0 and shared with every process."""
    def read() -> tuple:
        run = store.open_run(run_id)
        phi = MetaPerturb.load(run.path / PHI_FILE)
        return cpu_copy(phi.state_dict()), run.summary, str(run.path / PHI_FILE)

    state, summary, path = dist.run_on_main(read)
    phi = MetaPerturb()
    phi.load_state_dict(state)
    return MetaTrainResult(run_id=run_id, phi=phi, phi_path=Path(path) if dist.is_main else None, summary=summary,
                           run_ids=[run_id])
