"""Meta-training phi jointly over heterogeneous source tasks, in one process or many (``torchrun``), resumable.

The algorithm is the released code's (paper-notes 1.7). T tasks, each with its own network theta_t and its own
Adam, share one phi with its own Adam. One meta step is, for every task:

1. :meth:`MetaTrainer.task_step`: ``model.train()``, a batch of the task's *train* split, the perturbed forward
   (clip 100, noise coefficient 1), cross-entropy, one Adam step of theta_t. phi is frozen for this pass, so no
   gradient for it is even computed (the original computed and discarded it).
2. :meth:`MetaTrainer.task_meta_grad`: BatchNorm layers in evaluation mode (running statistics, not updated), the
   perturbation sites still in training mode (batch statistics, running statistics updated), a batch of the task's
   *held-out* split, the perturbed forward at the updated theta_t, cross-entropy, and its gradient with respect to
   phi only. theta_t is frozen for this pass (``requires_grad=False``), so autograd computes no weight gradients:
   the backward pass only carries activations' gradients down to the sites.
3. :meth:`MetaTrainer.meta_step`: phi's gradient is the mean of the per-task gradients; phi takes one Adam step.

``second_order=True`` replaces 1-2 by the paper's one-step look-ahead (:mod:`workbench.lookahead`): the held-out
loss is evaluated at ``theta - lookahead_lr * grad`` (a plain SGD step, differentiated with ``create_graph``), and
theta_t then takes its usual Adam step with the same train gradient. The sites then compute through the
plain-autograd reference formula (the fused fast path cannot be differentiated twice), which is slower.

Reproducibility: every task owns its random streams: a seed for its network's initialisation, seeded batch
iterators for its two splits, and its own state of the global torch RNG (CPU, and CUDA on a GPU) that is swapped
in around the task's forward passes and saved after them (the perturbation draws its noise from the global RNG).
The result therefore does not depend on how tasks are placed on processes.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the default process group is opened (gloo on CPU,
NCCL on CUDA), task ``i`` runs on rank ``i % world_size``, and one all-reduce (SUM) per step carries a
``(num_tasks, width)`` matrix in which each rank has filled the rows of its own tasks: phi's per-task gradients,
the per-task losses and accuracies and, on logged steps, per-site scale statistics. Every rank then sums the
gradient rows in task order and divides by ``num_tasks``, so one process and many give the same phi to the last
bit when the per-task computations agree. They agree when every process uses the same number of CPU threads: the
perturbation splits its noise draw over the threads, so set ``threads`` (torchrun defaults to one thread per process).
Rank 0 writes every artifact; resuming a multi-node run needs the artifacts root on a shared filesystem (every process
reads the run's config; rank 0 alone reads the checkpoint and sends it to the others).

Artifacts (through :class:`workbench.artifacts.RunStore`, run kind ``meta_train``): config, the task split
(``records/task_split.json``), metrics every ``log_every`` steps (stage ``meta_train``: one row per task with the
means of train/held-out loss and accuracy since the previous row; stage ``phi``: phi's gradient norm and norm),
per-site statistics (``arrays/site_stats.npz``: mean scale, mean and std of the multiplier s*z, per logged step,
task and site), phi's trajectory (``arrays/phi_trajectory.npz``), phi every checkpoint
(``checkpoints/phi_<step>.pt``), the full resumable checkpoint (``checkpoints/last.pt``) and the final
``phi.pt`` (:meth:`MetaPerturb.save`). Several runs (``num_runs``) are followed by a ``meta_select`` run that
records which phi was chosen and why.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _distributed
from ._distributed import DistContext
from .artifacts import Run, RunStore, atomic_write_text, to_jsonable
from .attach import attach
from .config import Config, parse_overrides, require, require_seed, require_threads
from .data import (Augment, BatchIterator, ImageDataset, SourceTask, channel_stats, describe_tasks, eval_batches,
                   load_dataset, source_tasks, target_view)
from ._runtime import config_difference, cpu_copy, load_resume_checkpoint, resolve_device, steady_allocator
from .errors import WorkbenchError
from .lookahead import lookahead_meta_grad, twice_differentiable
from .models import build, model_info
from .perturb import MetaPerturb
from .phi_diagnostics import DIAGNOSTICS_RECORD, diagnose, official_phi, trained_by

RUN_KIND = "meta_train"
SELECT_KIND = "meta_select"
RESUME_KINDS = (RUN_KIND, SELECT_KIND)  # what `workbench meta-train --resume` continues
CHECKPOINT_SCHEMA = "workbench.meta_train.checkpoint"
CHECKPOINT_VERSION = 1
PHI_FILE = "phi.pt"
# Config fields that may differ when a run is resumed: where things are and how fast, never what is computed.
RESUME_MUTABLE = ("data_root", "artifacts_root", "threads", "device", "checkpoint_every", "run_name", "workers",
                  "executor", "ray_address", "retries")
# Purposes of the per-task seeds derived from the run seed (see derive_seed).
_SEED_PHI, _SEED_MODEL, _SEED_NOISE, _SEED_TRAIN, _SEED_VALID, _SEED_EVAL, _SEED_SELECT, _SEED_PROBE = range(8)
PHI_INIT_FILE = "phi_init.pt"  # the run's phi at step 0: the untrained-phi control and the diagnostics compare with it
PROBE_IMAGES = 64  # held-out source images the end-of-run diagnostics feed through a fresh network
_METRIC_NAMES = ("train_loss", "train_acc", "heldout_loss", "heldout_acc")


# ================================================================================================= config
@dataclass
class MetaTrainConfig(Config):
    """Everything that defines a meta-training run (defaults: the released code's setting, paper-notes 2.4).

    source / data_root: the source dataset spec (``workbench.data.load_dataset``) and where to find it.
    num_tasks / split_scheme / split_seed / use_test: how the source is cut into tasks (``workbench.data.source_tasks``;
        the split is the same for every run of a ``num_runs`` study, as in the original code).
    arch / image_size: every task network (``workbench.models.build``) and the working resolution.
    steps / batch_size: meta steps; images per train batch and per held-out batch.
    lr / weight_decay: each task network's Adam (L2 decay, as the original). phi_lr / phi_weight_decay: phi's Adam.
    clip: upper clamp of perturbed activations in training forwards (None: no clamp).
    second_order / lookahead_lr: differentiate through one SGD step of theta_t (lr defaults to ``lr``).
    num_runs: independent runs (seeds seed, seed+1, ...); with more than one, the best phi is selected on
        ``select_target``: ``"heldout"`` (mean accuracy of the final task networks on their whole held-out
        splits) or a dataset spec such as ``"cifar10"`` (a fresh ``arch`` trained for ``select_steps`` steps with
        the frozen phi on ``select_per_class`` images per class, scored on ``select_valid_per_class`` other
        training images per class with ``select_mc_samples`` Monte-Carlo samples; the test split is never used).
    normalization: ``"dataset"`` (per-channel statistics of the source images) or ``"0.5"`` (the original code).
    device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    deterministic: deterministic kernels (``torch.use_deterministic_algorithms``); threads: torch CPU threads (the
        noise draw depends on it: give the same value to compare runs across machines or process counts).
    workers / executor / ray_address / retries: how the ``num_runs`` candidates fan out before the selection
        (see ``TransferStudyConfig`` and :mod:`workbench.fanout`; null workers: one per core, or per GPU).
        Under torchrun the candidates run one after another, each across all processes.
    """

    source: str = "tinyimagenet32"
    data_root: Optional[str] = None
    arch: str = "resnet20"
    num_tasks: int = 10
    split_scheme: Literal["original", "paper"] = "original"
    split_seed: int = 0
    use_test: bool = False
    image_size: int = 32
    steps: int = 750
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    phi_lr: float = 1e-3
    phi_weight_decay: float = 5e-4
    phi_init_std: float = 0.01
    clip: Optional[float] = 100.0
    second_order: bool = False
    lookahead_lr: Optional[float] = None
    augment: bool = True
    normalization: Literal["dataset", "0.5"] = "dataset"
    seed: int = 0
    num_runs: int = 1
    select_target: str = "heldout"
    select_steps: int = 300
    select_per_class: int = 50
    select_valid_per_class: int = 50
    select_mc_samples: int = 5
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"
    deterministic: bool = False
    threads: Optional[int] = None
    workers: Optional[int] = None
    executor: str = "local"
    ray_address: Optional[str] = None
    retries: int = 1
    artifacts_root: Optional[str] = None
    run_name: Optional[str] = None

    def validate(self) -> None:
        from .data import check_spec
        from .fanout import check_execution
        from .models import check_image_size, check_name

        check_execution(self.workers, self.executor, self.retries)

        for name in ("steps", "batch_size", "num_tasks", "num_runs", "checkpoint_every", "log_every",
                     "select_steps", "select_per_class", "select_valid_per_class", "select_mc_samples"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be a positive integer, got {value}; e.g. {name}=1")
        require(self.batch_size >= 2, f"batch_size must be at least 2 (the perturbation uses the batch variance), "
                                      f"got {self.batch_size}")
        check_image_size(self.image_size)
        for name in ("lr", "phi_lr"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}; e.g. 1e-3")
        for name in ("weight_decay", "phi_weight_decay", "phi_init_std"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"{name} must be a non-negative number, got {value}")
        require(self.clip is None or (math.isfinite(self.clip) and self.clip > 0),
                f"clip must be a positive number or null (no clamp), got {self.clip}")
        require(self.lookahead_lr is None or (math.isfinite(self.lookahead_lr) and self.lookahead_lr > 0),
                f"lookahead_lr must be a positive number or null (= lr), got {self.lookahead_lr}")
        require(self.lookahead_lr is None or self.second_order,
                "lookahead_lr only applies with second_order=true; set second_order=true or drop lookahead_lr")
        require_seed("seed", self.seed)
        require_seed("split_seed", self.split_seed)
        require_threads(self.threads)
        require(bool(self.source.strip()), "source must name a dataset, e.g. tinyimagenet32")
        check_spec(self.source, "source")
        require(bool(self.arch.strip()), "arch must name a model, e.g. resnet20")
        check_name(self.arch)  # an unknown arch fails now, not after the run folder is made
        require(bool(self.select_target.strip()), "select_target must be 'heldout' or a dataset name such as cifar10")
        if self.select_target.strip() != "heldout":
            check_spec(self.select_target, "select_target")
        resolve_device(self.device, check_available=False)
        if self.run_name is not None:
            require(bool(self.run_name) and all(c.isalnum() or c in "-_." for c in self.run_name),
                    f"run_name {self.run_name!r} may hold only letters, digits, '-', '_' and '.'")

    @property
    def effective_lookahead_lr(self) -> float:
        return self.lookahead_lr if self.lookahead_lr is not None else self.lr




def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for one purpose (and task) of a run, from the run seed."""
    state = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def initial_phi(seed: int, init_std: float = 0.01) -> MetaPerturb:
    """The phi a run of seed ``seed`` starts from (every tensor ~ N(0, init_std^2), drawn from the run's own stream):
    the meta-trainer's starting point and the untrained-phi control (``metaperturb_untrained``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _SEED_PHI))
        return MetaPerturb(init_std=init_std)


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

    # ------------------------------------------------------------------------------------------ the verbs
    def task_step(self, slot: TaskSlot, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Update theta_t on a train batch with the perturbation active; returns ``[loss, accuracy]`` (a tensor).

        phi is frozen for this pass: its gradient from a train batch is never used, so it is not computed.
        """
        x, y = batch
        slot.model.train()
        with frozen(self.phi_params):
            logits = slot.model(x)
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
            logits = slot.model(x)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, self.phi_params)
        return grads, torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])

    def lookahead_task_step(self, slot: TaskSlot, train_batch, valid_batch, record: bool = False
                            ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Second-order variant of task_step + task_meta_grad: phi's gradient through one SGD look-ahead step
        (``lookahead_lr``) of theta_t, then theta_t's own Adam step with the same train gradient."""
        slot.model.train()
        with _recording(slot.handle, record), twice_differentiable(slot.handle.sites):
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


def _run_one(config: MetaTrainConfig, data: SourceData, store: Optional[RunStore], progress: bool, dist: DistContext,
             device: torch.device, *, resume_id: Optional[str] = None, tags: Optional[dict] = None,
             run_id: Optional[str] = None) -> MetaTrainResult:
    """One meta-training run (new, or resumed from ``resume_id``), on every process of ``dist``."""
    run: Optional[Run] = None
    payload: Any = None
    if dist.is_main:
        try:
            if resume_id is not None:
                # one writer: refused while another process holds the run (its pid and host are named)
                run = store.resume_run(resume_id, RUN_KIND)
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
                run = store.create_run(RUN_KIND, config, tags=run_tags, run_id=run_id)
                run.save_json("task_split", data.description)
                initial_phi(config.seed, config.phi_init_std).save(run.path / PHI_INIT_FILE, run_id=run.run_id, step=0)
            run.save_json("runtime", {"device": str(device), "world_size": dist.world_size,
                                      "backend": dist.backend, "threads": torch.get_num_threads(),
                                      "deterministic": config.deterministic, "resumed_from_step":
                                      None if checkpoint is None else int(checkpoint["step"])})
            payload = ("ok", run.run_id, checkpoint)
        except WorkbenchError as exc:
            if run is not None:
                run.release_lock()
            payload = ("error", str(exc), None)
    payload = dist.broadcast(payload)
    if payload[0] == "error":
        raise WorkbenchError(payload[1])
    _, the_run_id, checkpoint = payload

    try:
        return _train(config, data, progress, dist, device, run, the_run_id, checkpoint)
    except BaseException as exc:
        if run is not None and run.status == "running":
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            run.mark_failed(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
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


# ============================================================================================ selection
def _selection_view(config: MetaTrainConfig):
    """The target view the selection trains and scores on (``select_target``: train and held-out images per class)."""
    ds = load_dataset(config.select_target, root=config.data_root)
    return target_view(ds, per_class=config.select_per_class, image_size=config.image_size, channels=3,
                       seed=derive_seed(config.seed, _SEED_SELECT), valid_per_class=config.select_valid_per_class)


def transfer_score(phi: MetaPerturb, config: MetaTrainConfig, device: torch.device, progress: bool = False) -> float:
    """Validation accuracy of a fresh ``config.arch`` trained with the frozen ``phi`` on ``config.select_target``.

    The recipe is the target recipe of the original code, shortened: Adam (lr, weight_decay), noise coefficient
    annealed over the first 40 % of ``select_steps``, clip during training; then Monte-Carlo prediction
    (``select_mc_samples``) without clip on ``select_valid_per_class`` held-out *training* images per class. Every
    candidate phi sees the same network initialisation and batches (seeded from the selection seed).
    """
    from tqdm.auto import tqdm

    from .evaluate import mc_predict

    view = _selection_view(config)
    augment = Augment.for_view(view, stats="dataset" if config.normalization == "dataset" else "half")
    frozen_phi = MetaPerturb()
    frozen_phi.load_state_dict(phi.state_dict())
    frozen_phi.to(device).requires_grad_(False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, _SEED_SELECT, 1))
        model = build(config.arch, view.num_classes, in_channels=view.channels, image_size=config.image_size)
        model.to(device)
        handle = attach(model, frozen_phi, image_size=config.image_size)
        handle.set_clip(config.clip)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        batches = BatchIterator(view.train, min(config.batch_size, len(view.train)), augment,
                                seed=derive_seed(config.seed, _SEED_SELECT, 2), device=device)
        anneal = max(1.0, 0.4 * config.select_steps)
        model.train()
        for step in tqdm(range(config.select_steps), desc=f"select on {config.select_target}", leave=False,
                         disable=not progress):
            handle.set_noise_coeff(min(1.0, step / anneal))
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        handle.set_noise_coeff(1.0)
        handle.set_clip(None)
        correct = total = 0
        for x, y in eval_batches(view.valid, 256, augment.eval, device):
            probs = mc_predict(model, x, samples=config.select_mc_samples)
            correct += int((probs.argmax(1) == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


def _select(config: MetaTrainConfig, results: list[MetaTrainResult], dist: DistContext, device: torch.device,
            progress: bool) -> dict[str, Any]:
    """Score every run's phi on the selection target and pick the best (ties: the earliest run)."""
    if config.select_target == "heldout":
        scores = [float(r.summary["heldout_acc_mean"]) for r in results]
        metric = "mean accuracy of the final task networks on their whole held-out source splits"
    else:
        # candidates are dealt over the processes like tasks; the scores are summed back
        local = torch.zeros(len(results), dtype=torch.float64, device=device)
        for index, result in enumerate(results):
            if index % dist.world_size == dist.rank:
                local[index] = transfer_score(result.phi, config, device, progress and dist.is_main)
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
              dataset: Optional[ImageDataset] = None) -> MetaTrainResult:
    """``num_runs`` independent runs (seeds seed..seed+num_runs-1) under one meta_select run, then selection."""
    payload: Any = None
    parent: Optional[Run] = None
    if dist.is_main:
        try:
            if resume_id is not None:
                parent = store.resume_run(resume_id, SELECT_KIND)  # one writer (see _run_one)
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
                parent = store.create_run(SELECT_KIND, config, tags={"source": config.source, "arch": config.arch,
                                                                     "num_runs": config.num_runs,
                                                                     "select_target": config.select_target},
                                          run_id=config.run_name)
                states = []
            payload = ("ok", parent.run_id, states)
        except WorkbenchError as exc:
            if parent is not None:
                parent.release_lock()
            payload = ("error", str(exc), None)
    payload = dist.broadcast(payload)
    if payload[0] == "error":
        raise WorkbenchError(payload[1])
    _, parent_id, states = payload
    try:
        return _select_runs(config, data, store, progress, dist, device, parent, parent_id, states, dataset)
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
                          workers=None, executor="local", ray_address=None, retries=1)


def run_candidate(payload: Mapping[str, Any], context: Any) -> str:
    """One candidate of a fanned-out ``meta_select`` run, in a worker (:mod:`workbench.fanout`): made, resumed from
    its checkpoint, or started again; returns its run id."""
    values = {**payload["config"], "threads": context.threads}
    if str(values.get("device")) in ("auto", "cuda") or str(values.get("device")).startswith("cuda"):
        values["device"] = context.device
    config = MetaTrainConfig.from_dict(values)
    store = RunStore(payload["root"])
    device = resolve_device(config.device)
    with _runtime(config, device):
        data = prepare_source(config, payload.get("dataset"))
        run_id, status, resumable = payload["state"]
        if resumable:
            result = _run_one(config.replace(run_name=None), data, store, False, DistContext(), device,
                              resume_id=run_id)
        else:
            if status is not None:
                store.discard_run(run_id)  # begun, cut short before its first checkpoint: start again
            result = _run_one(config, data, store, False, DistContext(), device, run_id=config.run_name,
                              tags={"parent": payload["parent"], "run_index": payload["index"]})
    return result.run_id


def _fan_out_candidates(config: MetaTrainConfig, store: RunStore, progress: bool, parent_id: str, states: list,
                        dataset: Optional[ImageDataset]) -> None:
    """Run the unfinished candidates in worker processes (or on Ray); a candidate that still fails stops the
    selection with its error, the finished ones kept for a resume."""
    from .fanout import Cell, plan_workers, run_cells

    cells = []
    for index in range(config.num_runs):
        state = states[index] if index < len(states) else (candidate_run_id(parent_id, index), None, False)
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
                 states: list, dataset: Optional[ImageDataset] = None) -> MetaTrainResult:
    """The candidate runs of a ``meta_select`` run (``parent`` on rank 0, holding its writer lock), then selection.

    In one process the unfinished candidates fan out first (``workers``, ``executor``); every candidate is then
    read back, or run here, in index order."""
    if not dist.enabled and config.num_runs > 1 and (config.workers != 1 or config.executor == "ray"):
        _fan_out_candidates(config, store, progress, parent_id, states, dataset)
        states = [_child_state(store, candidate_run_id(parent_id, i)) if i >= len(states) or states[i][1] != "finished"
                  else states[i] for i in range(config.num_runs)]
    results: list[MetaTrainResult] = []
    for index in range(config.num_runs):
        child = _candidate_config(config, parent_id, index)
        state = states[index] if index < len(states) else (child.run_name, None, False)
        if state[1] == "finished":
            results.append(_finished_result(store, state[0], dist))
        elif state[2]:
            results.append(_run_one(child.replace(run_name=None), data, store, progress, dist, device,
                                    resume_id=state[0]))
        else:
            if state[1] is not None and dist.is_main:
                store.discard_run(state[0])  # begun, cut short before its first checkpoint: start again
            results.append(_run_one(child, data, store, progress, dist, device,
                                    tags={"parent": parent_id, "run_index": index}, run_id=child.run_name))
        if parent is not None:
            parent.save_json("children", [r.run_id for r in results])

    selection = _select(config, results, dist, device, progress)
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
    payload = None
    if dist.is_main:
        run = store.open_run(run_id)
        phi = MetaPerturb.load(run.path / PHI_FILE)
        payload = (cpu_copy(phi.state_dict()), run.summary, str(run.path / PHI_FILE))
    state, summary, path = dist.broadcast(payload)
    phi = MetaPerturb()
    phi.load_state_dict(state)
    return MetaTrainResult(run_id=run_id, phi=phi, phi_path=Path(path) if dist.is_main else None, summary=summary,
                           run_ids=[run_id])


# ============================================================================================ entry points
def meta_train(config: MetaTrainConfig | Mapping[str, Any] | None = None, store: Optional[RunStore] = None,
               progress: bool = True, *, resume: Optional[str] = None,
               dataset: Optional[ImageDataset] = None) -> MetaTrainResult:
    """Meta-train phi (Python API; ``workbench meta-train`` on the command line).

    config: a :class:`MetaTrainConfig` or a dict of its fields (None with ``resume``: the run's own config).
    store: the run store (default: ``RunStore(config.artifacts_root)``).
    resume: a run id (or run folder) to continue from its last checkpoint; ``config``, if given, must match it.
    dataset: an :class:`ImageDataset` to cut into tasks instead of loading ``config.source`` (e.g. synthetic data).

    Launched by ``torchrun`` the tasks are spread over the processes (see the module docstring); every process
    returns the same phi, rank 0 writes the artifacts.
    """
    if resume is not None:
        store, resume = _locate_run(resume, store, config)
        store.check_resume_kind(resume, RESUME_KINDS, "a meta-train run")  # before its config is read as ours
        stored = MetaTrainConfig.from_dict(_stored_config(store, resume))
        if config is None:
            config = stored
        else:
            config = config if isinstance(config, MetaTrainConfig) else MetaTrainConfig.from_dict(config)
    elif config is None:
        config = MetaTrainConfig()
    elif not isinstance(config, MetaTrainConfig):
        config = MetaTrainConfig.from_dict(config)
    else:
        config.validate()
    if store is None:
        store = RunStore(config.artifacts_root)
    steady_allocator()  # freed feature maps are reused rather than faulted in again every step ($WORKBENCH_MALLOC)
    device = resolve_device(config.device)
    dist = _distributed.setup(device.type)
    clean = False
    try:
        device = _process_device(config, dist)
        with _runtime(config, device):
            data = prepare_source(config, dataset)
            if config.num_runs > 1 and config.select_target != "heldout":
                _selection_view(config)  # a selection target that cannot be used fails now, not after the runs
            if config.num_runs > 1:
                result = _run_many(config, data, store, progress, dist, device, resume_id=resume, dataset=dataset)
            else:
                result = _run_one(config, data, store, progress, dist, device, resume_id=resume,
                                  run_id=config.run_name if resume is None else None)
        clean = True
        return result
    except WorkbenchError:
        clean = True  # raised on every process alike (errors that one process sees alone are broadcast first)
        raise
    finally:
        _distributed.shutdown(dist, clean=clean)


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


# ==================================================================================================== CLI
def _cli(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.artifacts:
        overrides["artifacts_root"] = args.artifacts
    store = RunStore(args.artifacts) if args.artifacts else None
    if args.resume:
        store, run_id = _locate_run(args.resume, store, overrides)
        store.check_resume_kind(run_id, RESUME_KINDS, "a meta-train run")  # a transfer run is sent to its command
        stored = _stored_config(store, run_id)
        if args.config:
            config = MetaTrainConfig.from_yaml(args.config, **overrides)
        else:
            # keep the stored values; an override that changes a computed field is refused by the resume check
            config = MetaTrainConfig.from_dict({**stored, **overrides})
        result = meta_train(config, store=store, progress=not args.no_progress, resume=run_id)
    else:
        config = (MetaTrainConfig.from_yaml(args.config, **overrides) if args.config
                  else MetaTrainConfig.from_dict(overrides))
        result = meta_train(config, store=store, progress=not args.no_progress)
    if result.phi_path is not None:  # rank 0
        where = f"selection run {result.selection_run_id}, chosen run {result.run_id}" if result.selection_run_id \
            else f"run {result.run_id}"
        extra = (f"; {result.summary['reason']}" if result.selection else
                 f"; mean held-out accuracy {result.summary['heldout_acc_mean']:.4f}")
        print(f"meta-training finished ({where}); phi saved to {result.phi_path}{extra}")
    return 0


def _cli_check(args: argparse.Namespace) -> int:
    store = RunStore(args.artifacts) if args.artifacts else None
    record = diagnose_run(args.run, store)
    sites = ", ".join(f"{row['scale']:.3f}" for row in record["sites"])
    print(f"run {record['run_id']}: phi {record['message']}; mean scale per site {sites}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench meta-train`` and ``workbench phi-check``."""
    parser = subparsers.add_parser(
        "meta-train", help="meta-train phi over source tasks (one process, or many under torchrun)",
        description="Meta-train the MetaPerturb perturbation function phi jointly over tasks cut from a source "
                    "dataset. Run many processes with `torchrun --nproc_per_node=N -m workbench meta-train ...`.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of MetaTrainConfig fields "
                                                         "(see configs/meta_train_default.yaml)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config field, e.g. --set steps=100 (repeatable)")
    parser.add_argument("--resume", metavar="RUN", help="continue a run (its id or folder) from its last checkpoint")
    parser.add_argument("--artifacts", metavar="DIR", help="artifacts root (default: $WORKBENCH_ARTIFACTS or "
                                                           "./artifacts of the checkout)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli)
    check = subparsers.add_parser(
        "phi-check", help="say whether a meta-training run's phi learned (writes its diagnostics record)",
        description="Probe a finished meta-training run's phi against the phi it started from (a fresh network of "
                    "its architecture, held-out source images, fixed noise) and write records/phi_diagnostics.json, "
                    "which the notebooks and the dashboard read. Runs write it themselves since it exists; this "
                    "command checks older ones.")
    check.add_argument("run", metavar="RUN", help="a meta_train or meta_select run id (or run folder)")
    check.add_argument("--artifacts", metavar="DIR", help="artifacts root (default: $WORKBENCH_ARTIFACTS or "
                                                          "./artifacts of the checkout)")
    check.set_defaults(func=_cli_check)


__all__ = ["MetaTrainConfig", "MetaTrainer", "MetaTrainResult", "NonFiniteLoss", "SourceData", "TaskRNG",
           "batchnorm_eval", "derive_seed", "diagnose_run", "frozen", "initial_phi", "meta_train", "prepare_source", "register_cli",
           "resolve_device", "transfer_score"]
