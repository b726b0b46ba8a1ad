"""One meta-training run's life: created or resumed (on rank 0, shared with every process), trained with
checkpoints and curves, finished with its phi, arrays and the verdict of its diagnostics."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch

from .._distributed import DistContext
from ..artifacts.formatting import _exception_line
from ..artifacts import Run, RunStore, to_jsonable
from ..data import Augment
from .._runtime import cpu_copy, derive_seed, load_resume_checkpoint, resolve_device
from ..errors import WorkbenchError
from ..perturb import MetaPerturb
from ..phi_diagnostics import DIAGNOSTICS_RECORD, PHI_INIT_FILE, diagnose, initial_phi, official_phi, trained_by
from .config import CHECKPOINT_SCHEMA, CHECKPOINT_VERSION, MetaTrainConfig, PHI_FILE, PROBE_IMAGES, RESUME_MUTABLE, RUN_KIND, _METRIC_NAMES, _SEED_PROBE
from .trainer import MetaTrainer, NonFiniteLoss, SourceData, prepare_source


# =============================================================================================== runner
@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns.

    run_id: the meta_train run whose phi this is (the chosen one when several runs were made).
    phi: the meta-trained phi (CPU). phi_path: its file (``MetaPerturb.load(phi_path)``); None off rank 0.
    summary: the run's summary (with several runs: the selection's). run_ids: every meta_train run made.
    selection_run_id / selection: the meta_select run and its record when ``num_runs > 1``.
    """

    run_id: Optional[str]
    phi: MetaPerturb
    phi_path: Optional[Path]
    summary: dict[str, Any]
    run_ids: list[str] = dataclasses.field(default_factory=list)
    selection_run_id: Optional[str] = None
    selection: Optional[dict[str, Any]] = None


@contextlib.contextmanager
def _runtime(config: MetaTrainConfig, device: torch.device) -> Iterator[None]:
    """Threads and determinism for the run; the caller's settings are restored afterwards (notebooks)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a CUDA kernel without a deterministic variant warns instead of stopping a long run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _process_device(config: MetaTrainConfig, dist: DistContext) -> torch.device:
    device = resolve_device(config.device)
    if device.type == "cuda" and dist.enabled:
        return torch.device("cuda", dist.local_rank)  # one GPU per process under torchrun
    return device


class _Log:
    """What the run accumulates between logged steps and over the run (identical on every process)."""

    def __init__(self, num_tasks: int, num_sites: int):
        self.sums = torch.zeros(num_tasks, 4, dtype=torch.float64)
        self.count = 0
        self.steps: list[int] = []
        self.scale: list[torch.Tensor] = []
        self.mult_mean: list[torch.Tensor] = []
        self.mult_std: list[torch.Tensor] = []
        self.scale_std: list[torch.Tensor] = []
        self.phi: list[torch.Tensor] = []
        self.last_means = torch.full((num_tasks, 4), float("nan"), dtype=torch.float64)
        self.agreement = torch.zeros(3, dtype=torch.float64)  # sums since the last row: cosine, task norm, count
        self.seconds = 0.0  # training time up to the last checkpoint, summed over the sessions of a resumed run
        self.sessions = 1   # processes that trained this run (a resume adds one)

    def state_dict(self) -> dict[str, Any]:
        stack = lambda xs: torch.stack(xs) if xs else torch.zeros(0)  # noqa: E731
        return {"sums": self.sums.clone(), "count": self.count, "steps": list(self.steps), "scale": stack(self.scale),
                "mult_mean": stack(self.mult_mean), "mult_std": stack(self.mult_std),
                "scale_std": stack(self.scale_std), "phi": stack(self.phi), "last_means": self.last_means.clone(),
                "agreement": self.agreement.clone(), "seconds": float(self.seconds), "sessions": int(self.sessions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.count, self.steps = state["sums"].clone(), int(state["count"]), list(state["steps"])
        for name in ("scale", "mult_mean", "mult_std", "phi"):
            setattr(self, name, list(state[name]) if len(self.steps) else [])
        # checkpoints written before the channel spread and gradient agreement were recorded lack them
        spread = state.get("scale_std")
        self.scale_std = (list(spread) if spread is not None and len(spread) == len(self.steps) else
                          [torch.full_like(s, float("nan")) for s in self.scale])
        self.agreement = state["agreement"].clone() if "agreement" in state else torch.zeros(3, dtype=torch.float64)
        self.last_means = state["last_means"].clone()
        # checkpoints written before the time of earlier sessions was kept lack it: their time is unknown (0)
        self.seconds, self.sessions = float(state.get("seconds", 0.0)), int(state.get("sessions", 1)) + 1


def _phi_vector(phi: MetaPerturb) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in phi.parameters()])


def _save_arrays(run: Run, trainer: MetaTrainer, log: _Log) -> None:
    if not log.steps:
        return
    run.save_arrays("site_stats", steps=np.asarray(log.steps, dtype=np.int64),
                    scale_mean=torch.stack(log.scale).numpy(), multiplier_mean=torch.stack(log.mult_mean).numpy(),
                    multiplier_std=torch.stack(log.mult_std).numpy(), scale_channel_std=torch.stack(log.scale_std).numpy(),
                    site_names=np.asarray(trainer.site_names, dtype=str),
                    task_names=np.asarray(trainer.task_names, dtype=str))
    names = [name for name, _ in trainer.phi.named_parameters()]
    sizes = [p.numel() for p in trainer.phi.parameters()]
    run.save_arrays("phi_trajectory", steps=np.asarray(log.steps, dtype=np.int64), phi=torch.stack(log.phi).numpy(),
                    parameter_names=np.asarray(names, dtype=str), parameter_sizes=np.asarray(sizes, dtype=np.int64))


def _checkpoint(run: Optional[Run], trainer: MetaTrainer, log: _Log, config: MetaTrainConfig, dist: DistContext) -> None:
    """Gather every task's state to rank 0 and write the full checkpoint (and phi_<step>.pt) atomically."""
    state = trainer.state_dict()
    parts = dist.gather(state["tasks"])
    if not dist.is_main:
        return
    for part in parts or []:
        state["tasks"].update(part)
    checkpoint = {
        "schema": CHECKPOINT_SCHEMA,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "step": trainer.step,
        "trainer": state,
        "log": log.state_dict(),
        "torch": str(torch.__version__),
        "world_size": dist.world_size,
    }
    run.save_checkpoint(checkpoint, "last")
    trainer.phi.save(run.path / "checkpoints" / f"phi_{trainer.step}.pt", step=trainer.step, run_id=run.run_id)
    _save_arrays(run, trainer, log)


def _load_resume(run: Run, config: MetaTrainConfig) -> dict[str, Any]:
    """The checkpoint of ``run``, checked against ``config`` (one-line errors for every mismatch)."""
    checkpoint = load_resume_checkpoint(run, config, RESUME_MUTABLE, CHECKPOINT_SCHEMA, CHECKPOINT_VERSION,
                                        "meta-training")
    if int(checkpoint["step"]) >= config.steps and run.status == "finished":
        raise WorkbenchError(f"run {run.run_id} already finished all {config.steps} steps; nothing to resume "
                             f"(its phi is {run.path / PHI_FILE})")
    return checkpoint


def open_on_main(dist: DistContext, open_run: Callable[[Callable[[Run], Run]], Any]) -> tuple[Optional[Run], Any]:
    """``open_run(hold)`` on rank 0 only: it creates or resumes a run, passing it through ``hold`` as soon as it
    holds the run's writer lock, and returns what every rank needs. A WorkbenchError releases that lock before it
    is raised on every rank. Returns the run (rank 0; None elsewhere) and the shared value."""
    held: list[Run] = []

    def hold(run: Run) -> Run:
        held.append(run)
        return run

    def step() -> Any:
        try:
            return open_run(hold)
        except WorkbenchError:
            for run in held:
                run.release_lock()
            raise

    shared = dist.run_on_main(step)
    return (held[0] if held else None), shared


def _run_one(config: MetaTrainConfig, data: SourceData, store: Optional[RunStore], progress: bool, dist: DistContext,
             device: torch.device, *, resume_id: Optional[str] = None, tags: Optional[dict] = None,
             run_id: Optional[str] = None) -> MetaTrainResult:
    """One meta-training run (new, or resumed from ``resume_id``), on every process of ``dist``."""

    def open_run(hold) -> tuple[str, Any]:
        if resume_id is not None:
            # one writer: refused while another process holds the run (its pid and host are named)
            run = hold(store.resume_run(resume_id, RUN_KIND))
            checkpoint = _load_resume(run, config)
            stored_split = run.load_json("task_split") if "task_split" in run.list_json() else {}
            if (stored_split.get("fingerprint") != data.description["fingerprint"]
                    or stored_split.get("tasks") != to_jsonable(data.description["tasks"])):
                raise WorkbenchError(f"run {run.run_id} was made from other source data or another task split "
                                     f"than {config.source} gives now; resume with the data it used")
            run.truncate_metrics(int(checkpoint["step"]))
            run.mark_running()
        else:
            checkpoint = None
            run_tags = {"source": data.description.get("dataset", config.source), "arch": config.arch, "seed": config.seed,
                        "num_tasks": config.num_tasks, "second_order": config.second_order, **(tags or {})}
            run = hold(store.create_run(RUN_KIND, config, tags=run_tags, run_id=run_id))
            run.save_json("task_split", data.description)
            initial_phi(config.seed, config.phi_init_std).save(run.path / PHI_INIT_FILE, run_id=run.run_id, step=0)
        run.save_json("runtime", {"device": str(device), "world_size": dist.world_size,
                                  "backend": dist.backend, "threads": torch.get_num_threads(),
                                  "deterministic": config.deterministic, "resumed_from_step":
                                  None if checkpoint is None else int(checkpoint["step"])})
        return run.run_id, checkpoint

    run, (the_run_id, checkpoint) = open_on_main(dist, open_run)

    try:
        return _train(config, data, progress, dist, device, run, the_run_id, checkpoint)
    except BaseException as exc:
        if run is not None and run.status == "running":
            run.mark_failed(_exception_line(exc))
        raise
    finally:
        if run is not None:
            run.release_lock()


def _train(config: MetaTrainConfig, data: SourceData, progress: bool, dist: DistContext, device: torch.device,
           run: Optional[Run], the_run_id: str, checkpoint: Optional[dict]) -> MetaTrainResult:
    """The training loop of :func:`_run_one` (artifacts written by rank 0 only, through ``run``)."""
    from tqdm.auto import tqdm

    trainer = MetaTrainer(config, data.tasks, device=device, dist=dist, mean=data.mean, std=data.std, flip=data.flip)
    log = _Log(trainer.num_tasks, trainer.num_sites)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["trainer"])
        log.load_state_dict(checkpoint["log"])
    prior_seconds = log.seconds
    layout = trainer.row_layout()
    init_vector = _phi_vector(initial_phi(config.seed, config.phi_init_std))
    reference = official_phi()
    official_vector = _phi_vector(reference) if reference is not None else None
    started = time.perf_counter()
    start_step = trainer.step
    bar = tqdm(total=config.steps, initial=trainer.step, desc=f"meta-train {the_run_id}", unit="step",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    try:
        while trainer.step < config.steps:
            step = trainer.step + 1
            log_now = step % config.log_every == 0 or step == config.steps
            try:
                host = trainer.train_step(record=log_now)
            except NonFiniteLoss as exc:
                last = int(checkpoint["step"]) if checkpoint is not None else None
                kept = (f"the last good checkpoint (step {last}) is kept in {run.path if run else the_run_id}"
                        if last is not None else "no checkpoint had been written yet")
                message = (f"meta-training stopped: the {exc.what} is not finite (NaN/inf) at step {exc.step} on task "
                           f"{exc.task} ({exc.name}); {kept}; lower lr/phi_lr or check the data")
                if run is not None:
                    run.mark_failed(message)
                raise WorkbenchError(message) from None
            log.sums += host[:, layout["metrics"]].double()
            log.count += 1
            log.agreement += torch.tensor([*trainer.last_agreement, 1.0], dtype=torch.float64)
            if log_now:
                means = log.sums / max(log.count, 1)
                log.last_means = means
                log.steps.append(step)
                log.scale.append(host[:, layout["scale"]].clone())
                log.mult_mean.append(host[:, layout["mult_mean"]].clone())
                log.mult_std.append(host[:, layout["mult_std"]].clone())
                log.scale_std.append(host[:, layout["scale_std"]].clone())
                vector = _phi_vector(trainer.phi)
                log.phi.append(vector)
                cosine, task_norm = (log.agreement[:2] / log.agreement[2].clamp_min(1)).tolist()
                log.sums.zero_()
                log.count = 0
                log.agreement.zero_()
                if run is not None:
                    for i in range(trainer.num_tasks):
                        run.log_metrics(step, "meta_train", task=i, **dict(zip(_METRIC_NAMES, means[i].tolist())))
                    mean_all = means.mean(dim=0).tolist()
                    distances = {"dist_init": float((vector - init_vector).norm())}
                    if official_vector is not None:
                        distances["dist_official"] = float((vector - official_vector).norm())
                    run.log_metrics(step, "phi", grad_norm=float(trainer.last_phi_grad.norm()),
                                    norm=float(vector.norm()), grad_cosine=cosine, task_grad_norm=task_norm,
                                    scale_mean=float(host[:, layout["scale"]].mean()),
                                    scale_site_range=float(np.ptp(host[:, layout["scale"]].mean(dim=0).numpy())),
                                    scale_channel_std=float(host[:, layout["scale_std"]].mean()),
                                    **distances, **{f"{k}_mean": v for k, v in zip(_METRIC_NAMES, mean_all)})
                bar.set_postfix(heldout_acc=f"{float(means[:, 3].mean()):.3f}",
                                heldout_loss=f"{float(means[:, 2].mean()):.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                log.seconds = prior_seconds + time.perf_counter() - started
                _checkpoint(run, trainer, log, config, dist)
                checkpoint = {"step": step}
            bar.update(1)
    finally:
        bar.close()

    seconds = time.perf_counter() - started
    heldout = trainer.heldout_accuracy()
    phi = MetaPerturb()
    phi.load_state_dict(cpu_copy(trainer.phi.state_dict()))
    chance = float(np.mean([1.0 / t.num_classes for t in data.tasks]))
    diagnostics = _diagnose(config, phi, data, trainer.augment) if run is not None else None
    summary = {
        "steps": config.steps,
        "heldout_acc_mean": float(heldout.mean()),
        "heldout_acc": heldout.tolist(),
        "chance": chance,
        "task_names": list(trainer.task_names),
        "final_means": {k: float(v) for k, v in zip(_METRIC_NAMES, log.last_means.mean(dim=0).tolist())},
        "phi_path": PHI_FILE,
        "phi_norm": float(_phi_vector(phi).norm()),
        # summed over the sessions of a resumed run (each up to its last checkpoint, the last one to the end)
        "seconds": prior_seconds + seconds,
        "seconds_per_step": (prior_seconds + seconds) / max(config.steps, 1),
        "seconds_last_session": seconds,
        "seconds_per_step_last_session": seconds / max(config.steps - start_step, 1),
        "sessions": log.sessions,
        "device": str(device),
        "world_size": dist.world_size,
        "second_order": config.second_order,
        "seed": config.seed,
    }
    if diagnostics is not None:
        summary.update(phi_learned=diagnostics["learned"], phi_verdict=diagnostics["message"],
                       phi_function_change=diagnostics["function_change"],
                       phi_distance_from_init=diagnostics["distance_from_init"],
                       phi_distance_from_official=diagnostics["distance_from_official"],
                       scale_by_site=[row["scale"] for row in diagnostics["sites"]])
    phi_path = None
    if run is not None:
        run.save_json(DIAGNOSTICS_RECORD, diagnostics)
        phi_path = phi.save(run.path / PHI_FILE, run_id=run.run_id, step=config.steps, source=config.source,
                            arch=config.arch, seed=config.seed)
        _save_arrays(run, trainer, log)
        run.mark_finished(summary)
    trainer.release()
    return MetaTrainResult(run_id=the_run_id, phi=phi, phi_path=phi_path, summary=summary, run_ids=[the_run_id])


def _diagnose(config: MetaTrainConfig, phi: MetaPerturb, data: SourceData, augment: Augment) -> dict[str, Any]:
    """Whether ``phi`` computes something else than the run's initial phi (:func:`phi_diagnostics.diagnose`), probed
    with the first held-out images of the first task on a fresh network of the run's architecture."""
    task = data.tasks[0]
    images = augment.eval(task.valid.x[:PROBE_IMAGES]).cpu()
    return diagnose(phi, initial_phi(config.seed, config.phi_init_std), config.arch, images,
                    num_classes=task.num_classes, image_size=config.image_size,
                    seed=derive_seed(config.seed, _SEED_PROBE))


def diagnose_run(run_ref: str, store: Optional[RunStore] = None) -> dict[str, Any]:
    """Write (or rewrite) the diagnostics record of a finished meta-training run, e.g. one made before runs wrote it:
    its ``phi.pt`` against the initial phi of its seed, on its own source data. A selection run: its chosen run."""
    store, run_id = _locate_run(run_ref, store, None)
    trained = trained_by(store, run_id)
    if trained is None:
        raise WorkbenchError(f"selection run {run_id} has not chosen a run yet; check it when it has finished")
    run = store.open_run(trained)
    if run.kind != RUN_KIND:
        raise WorkbenchError(f"run {run.run_id} is a {run.kind!r} run; phi-check reads meta_train runs (or their "
                             f"selection run)")
    if not (run.path / PHI_FILE).is_file():
        raise WorkbenchError(f"run {run.run_id} has no {PHI_FILE} (status {run.status}); check a finished run")
    config = MetaTrainConfig.from_dict(dict(run.config))
    data = prepare_source(config)
    augment = Augment(config.image_size, padding=0, flip=False, mean=data.mean, std=data.std)
    record = _diagnose(config, MetaPerturb.load(run.path / PHI_FILE), data, augment)
    run.save_json(DIAGNOSTICS_RECORD, record)
    return {"run_id": run.run_id, **record}


def _stored_config(store: RunStore, run_id: str) -> dict[str, Any]:
    return dict(store.open_run(run_id).config)


def _locate_run(ref: str, store: Optional[RunStore], config: Any) -> tuple[RunStore, str]:
    """(store, run id) for a run id or a run folder ``<root>/runs/<run_id>``."""
    path = Path(str(ref)).expanduser()
    if path.is_dir() and (path / "run.json").is_file():
        return RunStore(path.resolve().parent.parent), path.name
    if store is None:
        root = None
        if isinstance(config, MetaTrainConfig):
            root = config.artifacts_root
        elif isinstance(config, Mapping):
            root = config.get("artifacts_root")
        store = RunStore(root)
    if os.sep in str(ref) or not (store.runs_dir / str(ref)).is_dir():
        raise WorkbenchError(f"no run {ref!r}: give a run id under {store.runs_dir} (see `ls {store.runs_dir}`) or a "
                             f"run folder; pass --artifacts DIR if the run lives under another artifacts root")
    return store, str(ref)
