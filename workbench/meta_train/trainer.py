"""The joint meta-training step: task networks and their private RNG streams, the source tasks, :class:`MetaTrainer`."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import compiled, graphs
from .._distributed import DistContext
from ..attach import attach
from ..data import Augment, BatchIterator, ImageDataset, SourceTask, channel_stats, describe_tasks, eval_batches, load_dataset, source_tasks
from .._runtime import cpu_copy, resolve_device
from ..errors import WorkbenchError
from ..lookahead import lookahead_meta_grad, twice_differentiable
from ..models import build, model_info
from .._runtime import derive_seed
from ..phi_diagnostics import initial_phi
from .config import MetaTrainConfig, _SEED_EVAL, _SEED_MODEL, _SEED_NOISE, _SEED_TRAIN, _SEED_VALID


def gradient_agreement(task_grads: torch.Tensor) -> tuple[float, float]:
    """(mean cosine similarity over all pairs of tasks, mean norm) of a ``(tasks, parameters)`` matrix of per-task
    meta-gradients. Tasks that pull phi the same way give a cosine near 1, unrelated ones near 0; NaN for one task."""
    g = task_grads.double()
    norms = g.norm(dim=1)
    t = g.shape[0]
    if t < 2:
        return float("nan"), float(norms.mean())
    unit = g / norms.clamp_min(1e-30).unsqueeze(1)
    cos = unit @ unit.T
    return float((cos.sum() - cos.diagonal().sum()) / (t * (t - 1))), float(norms.mean())


# ============================================================================================= task state
class TaskRNG:
    """A task's own state of the global torch RNG (CPU, plus CUDA on a GPU), swapped in by :meth:`active`."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda = torch.Generator(device=device).manual_seed(seed).get_state() if device.type == "cuda" else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the global RNG is this task's; the caller's streams are restored afterwards."""
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu.clone(), "cuda": None if self.cuda is None else self.cuda.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cpu = state["cpu"].cpu().to(torch.uint8)
        # A checkpoint taken on another device type keeps this task's freshly seeded CUDA stream.
        if self.cuda is not None and state.get("cuda") is not None:
            self.cuda = state["cuda"].cpu().to(torch.uint8)


@dataclass
class TaskSlot:
    """One task as this process runs it: its network, perturbation handle, optimiser, iterators and RNG."""

    index: int
    task: SourceTask
    model: nn.Module
    handle: Any
    optimizer: torch.optim.Optimizer
    train_iter: BatchIterator
    valid_iter: BatchIterator
    rng: TaskRNG
    last_train: Optional[torch.Tensor] = None  # [loss, accuracy] of the latest task_step
    captured: Optional[graphs.CapturedStep] = None  # the first-order step as a CUDA graph (cuda_graphs)


_BatchNorm = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm layers in evaluation mode for the block (everything else, the sites included, untouched)."""
    switched = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    for m in switched:
        m.eval()
    try:
        yield model
    finally:
        for m in switched:
            m.train()


@contextlib.contextmanager
def frozen(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """``requires_grad=False`` on ``params`` for the block: autograd then computes no gradient for them."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _recording(handle: Any, on: bool) -> Iterator[None]:
    """Let the sites keep their last scale and multiplier statistics (costs a host sync: logged steps only)."""
    sites = list(handle.sites)
    before = [s.record_stats for s in sites]
    for s in sites:
        s.record_stats = on
    try:
        yield
    finally:
        for s, flag in zip(sites, before):
            s.record_stats = flag


class NonFiniteLoss(Exception):
    """A task produced a NaN/inf loss or gradient at a meta step (converted to a WorkbenchError by the runner)."""

    def __init__(self, step: int, task: int, name: str, what: str):
        super().__init__(f"{what} is not finite at step {step} on task {task} ({name})")
        self.step, self.task, self.name, self.what = step, task, name, what


# ================================================================================================ trainer
class MetaTrainer:
    """Joint meta-training of one phi over ``tasks`` (the tasks of this process are those ``dist`` assigns it).

    ``task_step`` / ``task_meta_grad`` / ``meta_step`` are the reference loop (plain PyTorch); ``train_step`` runs
    one full meta step. ``state_dict`` / ``load_state_dict`` cover phi, this process's tasks and the step.

    The config's ``compile_sites``, ``cuda_graphs`` and ``precision`` choose how the steps run (``sites_decision``
    and ``graphs_decision`` say what was chosen and why): compiled sites, each task's first-order step (``task_step``
    then ``task_meta_grad``) replayed as a CUDA graph on steps that record no statistics, bf16 autocast around the
    task networks' forward passes. The second-order look-ahead is never captured and its sites stay eager.
    """

    def __init__(self, config: MetaTrainConfig, tasks: Sequence[SourceTask], *, device: torch.device | str | None = None,
                 dist: Optional[DistContext] = None, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 flip: bool = True):
        if not tasks:
            raise WorkbenchError("meta-training needs at least one task")
        self.config = config
        self.device = torch.device(device) if device is not None else resolve_device(config.device)
        self.dist = dist or DistContext()
        if self.dist.world_size > len(tasks):
            raise WorkbenchError(f"{self.dist.world_size} processes for {len(tasks)} tasks: every process needs a "
                                 f"task; launch at most {len(tasks)} processes")
        self.num_tasks = len(tasks)
        self.task_names = [t.name for t in tasks]
        self.step = 0
        self.phi = initial_phi(config.seed, config.phi_init_std).to(self.device)
        self.phi_params = list(self.phi.parameters())
        self.phi_numel = sum(p.numel() for p in self.phi_params)
        self.phi_optimizer = torch.optim.Adam(self.phi_params, lr=config.phi_lr, weight_decay=config.phi_weight_decay)
        channels = int(tasks[0].train.x.shape[1])
        pad = 4 if config.augment else 0
        self.augment = Augment(config.image_size, padding=pad, flip=bool(flip and config.augment), mean=mean, std=std)
        self.slots = [self._make_slot(i, t, channels) for i, t in enumerate(tasks) if self.dist.owns_task(i)]
        self.sites_decision = compiled.apply(config.compile_sites, self.device, [slot.model for slot in self.slots],
                                             what="meta-training")
        self.graphs_decision = graphs.decide(
            config.cuda_graphs, self.device, models=[slot.model for slot in self.slots],
            optimizers=[slot.optimizer for slot in self.slots], what="meta-training",
            blockers={"the second-order look-ahead needs a double backward, which is not captured":
                      config.second_order})
        if self.graphs_decision.on:
            for slot in self.slots:
                self._capture_slot(slot)
        self.site_names = list(self.slots[0].handle.site_names)
        self.num_sites = len(self.site_names)
        for slot in self.slots:
            if len(slot.handle.sites) != self.num_sites:
                raise WorkbenchError(f"task {slot.task.name} has {len(slot.handle.sites)} perturbation sites but "
                                     f"task {self.slots[0].task.name} has {self.num_sites}; use one architecture")
        self.last_phi_grad: Optional[torch.Tensor] = None
        self.last_agreement = (float("nan"), float("nan"))  # (mean pairwise cosine, mean per-task norm)

    # ------------------------------------------------------------------------------------------ building
    def _make_slot(self, index: int, task: SourceTask, channels: int) -> TaskSlot:
        cfg = self.config
        if len(task.train) < cfg.batch_size or len(task.valid) < cfg.batch_size:
            raise WorkbenchError(f"task {task.name} has {len(task.train)} train / {len(task.valid)} held-out images, "
                                 f"fewer than batch_size={cfg.batch_size}; use a smaller batch_size or fewer tasks")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, _SEED_MODEL, index))
            model = build(cfg.arch, task.num_classes, in_channels=channels, image_size=cfg.image_size)
        model.to(self.device)
        handle = attach(model, self.phi, image_size=cfg.image_size)
        handle.set_clip(cfg.clip)
        handle.set_noise_coeff(1.0)
        for site in handle.sites:
            site.record_stats = False
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train_iter = BatchIterator(task.train, cfg.batch_size, self.augment, seed=derive_seed(cfg.seed, _SEED_TRAIN, index),
                                   device=self.device, drop_last=True)
        valid_iter = BatchIterator(task.valid, cfg.batch_size, self.augment, seed=derive_seed(cfg.seed, _SEED_VALID, index),
                                   device=self.device, drop_last=True)
        rng = TaskRNG(derive_seed(cfg.seed, _SEED_NOISE, index), self.device)
        return TaskSlot(index, task, model, handle, optimizer, train_iter, valid_iter, rng)

    def _capture_slot(self, slot: TaskSlot) -> None:
        """Make ``slot``'s first-order step a :class:`~workbench.graphs.CapturedStep` (warmed up, then captured on
        its first calls; the noise coefficient is a constant 1 here, so the sites keep their own paths)."""
        graphs.make_capturable(slot.optimizer, self.device)
        sites = list(slot.handle.sites)

        def first_order(x, y, xv, yv):
            train = self.task_step(slot, (x, y))
            grads, heldout = self.task_meta_grad(slot, (xv, yv))
            return (train, *grads, heldout)

        slot.captured = graphs.CapturedStep(first_order, self.device, f"meta step of task {slot.task.name}",
                                            signature=lambda: graphs.site_signature(slot.model, sites))

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` at the config's precision; the logits come back in float32 for the loss."""
        with graphs.autocast(self.config.precision, self.device, cache=False):
            return model(x).float()

    # ------------------------------------------------------------------------------------------ the verbs
    def task_step(self, slot: TaskSlot, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Update theta_t on a train batch with the perturbation active; returns ``[loss, accuracy]`` (a tensor).

        phi is frozen for this pass: its gradient from a train batch is never used, so it is not computed.
        """
        x, y = batch
        slot.model.train()
        with frozen(self.phi_params):
            logits = self._forward(slot.model, x)
            loss = F.cross_entropy(logits, y)
            slot.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)  # the gradients are spent: free them
        slot.last_train = torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])
        return slot.last_train

    def task_meta_grad(self, slot: TaskSlot, batch: tuple[torch.Tensor, torch.Tensor], record: bool = False
                       ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """phi's gradient of the held-out loss at theta_t (first order); returns ``(grads, [loss, accuracy])``.

        BatchNorm runs on its running statistics (not updated); the sites keep their training mode. theta_t is
        frozen, so the backward pass computes no weight gradient.
        """
        x, y = batch
        slot.model.train()
        with batchnorm_eval(slot.model), frozen(list(slot.model.parameters())), _recording(slot.handle, record):
            logits = self._forward(slot.model, x)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, self.phi_params)
        return grads, torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])

    def lookahead_task_step(self, slot: TaskSlot, train_batch, valid_batch, record: bool = False
                            ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Second-order variant of task_step + task_meta_grad: phi's gradient through one SGD look-ahead step
        (``lookahead_lr``) of theta_t, then theta_t's own Adam step with the same train gradient."""
        slot.model.train()
        with _recording(slot.handle, record), twice_differentiable(slot.handle.sites), \
                graphs.autocast(self.config.precision, self.device, cache=False):
            result = lookahead_meta_grad(slot.model, self.phi_params, *train_batch, *valid_batch,
                                         lr=self.config.effective_lookahead_lr, valid_mode=batchnorm_eval)
        slot.optimizer.zero_grad(set_to_none=True)
        for name, p in slot.model.named_parameters():
            if name in result.theta_grads:
                p.grad = result.theta_grads[name]
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        y, yv = train_batch[1], valid_batch[1]
        slot.last_train = torch.stack([result.train_loss, (result.train_logits.argmax(1) == y).float().mean()])
        return result.meta_grads, torch.stack([result.valid_loss, (result.valid_logits.argmax(1) == yv).float().mean()])

    def meta_step(self, batches: Mapping[int, tuple[torch.Tensor, torch.Tensor]], record: bool = False) -> torch.Tensor:
        """phi's step from held-out batches of this process's tasks (``{task index: batch}``), after their
        task_step. Returns the all-reduced per-task matrix (see :meth:`row_layout`) on the CPU."""
        rows = {}
        for slot in self.slots:
            if slot.index in batches:
                with slot.rng.active():
                    grads, heldout = self.task_meta_grad(slot, batches[slot.index], record)
                rows[slot.index] = self._row(slot, grads, heldout, record)
        return self._reduce_and_step(rows)

    def train_step(self, record: bool = False) -> torch.Tensor:
        """One meta step: every task of this process draws its batches, updates theta_t and gives phi's gradient;
        the gradients are averaged over all tasks (all processes) and phi takes one Adam step."""
        rows = {}
        for slot in self.slots:
            with slot.rng.active():
                train_batch = next(slot.train_iter)
                if self.config.second_order:
                    valid_batch = next(slot.valid_iter)
                    grads, heldout = self.lookahead_task_step(slot, train_batch, valid_batch, record)
                elif slot.captured is not None and not record:
                    # the batch iterators draw from their own generators: taking the held-out batch before the
                    # update changes no random stream
                    valid_batch = next(slot.valid_iter)
                    outputs = slot.captured(*train_batch, *valid_batch)
                    slot.last_train, grads, heldout = outputs[0], outputs[1:-1], outputs[-1]
                else:
                    self.task_step(slot, train_batch)
                    valid_batch = next(slot.valid_iter)
                    grads, heldout = self.task_meta_grad(slot, valid_batch, record)
            rows[slot.index] = self._row(slot, grads, heldout, record)
        return self._reduce_and_step(rows)

    # ------------------------------------------------------------------------------------- the reduction
    def row_layout(self) -> dict[str, slice]:
        """Columns of the per-task matrix exchanged every step."""
        p, s = self.phi_numel, self.num_sites
        return {"grad": slice(0, p), "metrics": slice(p, p + 4), "scale": slice(p + 4, p + 4 + s),
                "mult_mean": slice(p + 4 + s, p + 4 + 2 * s), "mult_std": slice(p + 4 + 2 * s, p + 4 + 3 * s),
                "scale_std": slice(p + 4 + 3 * s, p + 4 + 4 * s)}

    @property
    def row_width(self) -> int:
        return self.phi_numel + 4 + 4 * self.num_sites

    def _row(self, slot: TaskSlot, grads: Sequence[torch.Tensor], heldout: torch.Tensor, record: bool) -> torch.Tensor:
        train = slot.last_train if slot.last_train is not None else torch.full((2,), float("nan"), device=self.device)
        parts = [torch.cat([g.reshape(-1) for g in grads]), train.to(self.device), heldout]
        if record:
            scales = slot.handle.scales()
            nan = torch.full((2,), float("nan"), device=self.device)
            # gathered as device tensors: reading each site's statistics on the host would sync a GPU twice per site
            per_site = [s.last_multiplier_stats_tensor() for s in slot.handle.sites]
            stats = torch.stack([nan if t is None else t.to(self.device).float() for t in per_site])
            spread = [s.std(unbiased=False) for s in scales]  # across the site's channels
            parts += [torch.stack([s.mean() for s in scales]).to(self.device).float(), stats[:, 0], stats[:, 1],
                      torch.stack(spread).to(self.device).float()]
        else:
            parts.append(torch.zeros(4 * self.num_sites, device=self.device))
        return torch.cat([p.float() for p in parts])

    def _reduce_and_step(self, rows: Mapping[int, torch.Tensor]) -> torch.Tensor:
        layout = self.row_layout()
        full = torch.zeros(self.num_tasks, self.row_width, device=self.device)
        for index, row in rows.items():
            full[index] = row
        # Each row has exactly one non-zero contributor, so the SUM reproduces every rank's rows exactly.
        self.dist.all_reduce_sum_(full)
        host = full.cpu()
        checked = host[:, : layout["metrics"].stop]
        bad = ~torch.isfinite(checked).all(dim=1)
        if bool(bad.any()):
            task = int(torch.nonzero(bad)[0, 0])
            values = host[task, layout["metrics"]]
            what = ("train loss" if not math.isfinite(float(values[0])) else
                    "held-out loss" if not math.isfinite(float(values[2])) else "phi's gradient")
            raise NonFiniteLoss(self.step + 1, task, self.task_names[task], what)
        self.last_agreement = gradient_agreement(host[:, layout["grad"]])
        grad = full[:, layout["grad"]].sum(dim=0) / self.num_tasks
        offset = 0
        for p in self.phi_params:
            n = p.numel()
            p.grad = grad[offset: offset + n].view_as(p).clone()
            offset += n
        self.phi_optimizer.step()
        self.phi_optimizer.zero_grad(set_to_none=True)
        self.last_phi_grad = grad.detach()
        self.step += 1
        return host

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def heldout_accuracy(self, batch_size: int = 256) -> torch.Tensor:
        """Accuracy of every task network on its whole held-out split (eval mode: running statistics, one noise
        sample, no clamp), as a ``(num_tasks,)`` tensor on every process. Task RNG streams are left untouched."""
        counts = torch.zeros(self.num_tasks, 2, device=self.device)
        for slot in self.slots:
            was_training = slot.model.training
            slot.model.eval()
            slot.handle.set_clip(None)
            try:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(derive_seed(self.config.seed, _SEED_EVAL, slot.index))
                    for x, y in eval_batches(slot.task.valid, batch_size, self.augment.eval, self.device):
                        counts[slot.index, 0] += (slot.model(x).argmax(1) == y).sum()
                        counts[slot.index, 1] += y.numel()
            finally:
                slot.handle.set_clip(self.config.clip)
                slot.model.train(was_training)
        self.dist.all_reduce_sum_(counts)
        return (counts[:, 0] / counts[:, 1].clamp_min(1)).cpu()

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """phi, phi's optimiser, the step, and every task of this process (CPU tensors, weights_only-safe)."""
        return {
            "step": self.step,
            "phi": cpu_copy(self.phi.state_dict()),
            "phi_optimizer": cpu_copy(self.phi_optimizer.state_dict()),
            "tasks": {slot.index: self._slot_state(slot) for slot in self.slots},
        }

    def _slot_state(self, slot: TaskSlot) -> dict[str, Any]:
        return {
            "name": slot.task.name,
            "model": cpu_copy(slot.model.state_dict()),
            "optimizer": cpu_copy(slot.optimizer.state_dict()),
            "train_iter": cpu_copy(slot.train_iter.state_dict()),
            "valid_iter": cpu_copy(slot.valid_iter.state_dict()),
            "rng": slot.rng.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a (full or per-process) state: phi, its optimiser, the step and this process's tasks."""
        tasks = state["tasks"]
        missing = [slot.index for slot in self.slots if slot.index not in tasks]
        if missing:
            raise WorkbenchError(f"the checkpoint holds no state for task(s) {missing}; it was written by another "
                                 f"configuration")
        self.phi.load_state_dict(state["phi"])
        self.phi_optimizer.load_state_dict(state["phi_optimizer"])
        self.step = int(state["step"])
        for slot in self.slots:
            entry = tasks[slot.index]
            if entry["name"] != slot.task.name:
                raise WorkbenchError(f"checkpoint task {slot.index} is {entry['name']!r} but this run's is "
                                     f"{slot.task.name!r}; the task split differs")
            slot.model.load_state_dict(entry["model"])
            slot.optimizer.load_state_dict(entry["optimizer"])
            slot.train_iter.load_state_dict(entry["train_iter"])
            slot.valid_iter.load_state_dict(entry["valid_iter"])
            slot.rng.load_state_dict(entry["rng"])

    def release(self) -> None:
        """Drop the networks, optimisers and iterators (before leaving a process group)."""
        self.slots = []
        self.phi_optimizer = None  # type: ignore[assignment]


# ================================================================================================= data
@dataclass
class SourceData:
    """The tasks of a run and how their images are normalised."""

    tasks: list[SourceTask]
    description: dict[str, Any]
    mean: list[float]
    std: list[float]
    flip: bool
    channels: int


def prepare_source(config: MetaTrainConfig, dataset: Optional[ImageDataset] = None) -> SourceData:
    """Load the source (or use ``dataset``), cut it into tasks and compute the normalisation statistics.

    Every process runs this and gets the same tasks; every check that could fail on one process only is done here
    for all tasks, so no process is left waiting in a collective for one that failed.
    """
    ds = dataset if dataset is not None else load_dataset(config.source, root=config.data_root)
    tasks = source_tasks(ds, num_tasks=config.num_tasks, scheme=config.split_scheme, seed=config.split_seed,
                         image_size=config.image_size, use_test=config.use_test)
    smallest = min(min(len(t.train), len(t.valid)) for t in tasks)
    if smallest < config.batch_size:
        raise WorkbenchError(f"the smallest task of {ds.name} split into {config.num_tasks} tasks has {smallest} "
                             f"images in a split, fewer than batch_size={config.batch_size}; use batch_size <= "
                             f"{smallest}, fewer tasks, or use_test=true")
    channels = int(tasks[0].train.x.shape[1])
    # the task networks are built later, after the run folder exists: check now that this arch builds for this data
    model_info(config.arch, num_classes=min(t.num_classes for t in tasks), in_channels=channels,
               image_size=config.image_size)
    if config.normalization == "dataset":
        mean, std = channel_stats(torch.cat([t.train.x for t in tasks]))
    else:
        mean, std = [0.5] * channels, [0.5] * channels
    description = describe_tasks(tasks, ds)
    description["normalization"] = {"kind": config.normalization, "mean": mean, "std": std}
    return SourceData(tasks, description, mean, std, bool(ds.flip), channels)
