"""Transfer: train a fresh network on a target task with frozen phi (MetaPerturb) or with a baseline regularizer.

One training loop for every method (paper-notes 1.8 and 2.4, the original ``train_tgt.py``): Adam (lr 1e-3, L2
weight decay 5e-4), batch 128, ``steps`` updates (10,000 in the original), the learning rate multiplied by 0.3 at
40%, 70% and 90% of the steps; random crop + horizontal flip (where valid) + normalisation. A method changes the
loop only through its regularizer's hooks (``workbench/regularizers``): MetaPerturb attaches the frozen phi and
ramps its noise coefficient ``min(1, step / (0.4 * steps))`` with clip 100 while training, and evaluates with
coefficient 1, no clip and Monte-Carlo prediction (5 samples during training, 100 at the end).

Process settings: ``threads`` sets torch's thread count for the run (restored afterwards), and glibc is told to
keep freed memory (``_runtime.steady_allocator``; ``WORKBENCH_MALLOC=default`` leaves malloc alone): a Conv-4
MetaPerturb transfer on Fashion-MNIST-sized inputs trained about 18% faster with it on a 2-core CPU.

Everything that can fail on bad input (an unknown method or setting, a phi file of the wrong format, a fine-tuning
source of another architecture, a target with fewer images per class than asked for, a resume from another config)
fails with one line before anything is written.

Artifacts (run kind ``transfer``, or ``source`` for :func:`train_source_network`; tags source/phi, target, arch,
method, seed): see :data:`ARRAY_NAMES` and ``artifacts/README.md``. The Python API is :func:`transfer`; the CLI is
``workbench transfer`` and ``workbench source-train``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from .artifacts import Run, RunStore
from .config import parse_overrides, require, require_seed, require_threads
from ._runtime import config_difference, cpu_copy, load_resume_checkpoint, resolve_device, steady_allocator
from .errors import WorkbenchError
from .evaluate import EvalResult, evaluate
from .graphs import AccelerationSettings
from .phi_diagnostics import official_phi_path
from .regularizers import (
    NOISE_WARMUP,
    TRAIN_CLIP,
    Regularizer,
    SourceNetwork,
    TrainContext,
    available_regularizers,
    build_regularizer,
    noise_coefficient,
)

CHECKPOINT_SCHEMA = "workbench.transfer.checkpoint"
CHECKPOINT_VERSION = 1
NETWORK_FORMAT = "workbench.network"
NETWORK_VERSION = 1
OFFICIAL_PHI = "official"
TRANSFER_KIND = "transfer"
SOURCE_KIND = "source"
FINAL_STAGES = ("final", "train_eval")  # metric stages of the final phase, dropped before it runs again on resume
# Config fields that may differ when resuming (they do not change what is computed).
RESUME_MUTABLE = ("device", "artifacts_root", "checkpoint_every", "threads", "run_name", "data_root", "compile_sites",
                  "cuda_graphs")

#: Arrays a transfer run writes (``run.load_arrays(name)``), for readers of the run store.
ARRAY_NAMES = {
    "predictions": "per test image: confidence, predicted, label, correct (bool), probs (N x classes, float32) of "
                   "the final MC prediction",
    "reliability": "15 equal-width confidence bins: lower, upper, count, confidence, accuracy",
    "site_scales": "MetaPerturb sites: site_names, channels (per site), scale (sites x max channels, NaN-padded: the "
                   "per-channel scale s in eval mode averaged over the test set), multiplier_mean, multiplier_std",
    "robustness": "when robustness is on: norms, and per norm <norm>_eps and <norm>_accuracy (PGD/EoT accuracy on "
                  "robust_examples seeded test images, their indices: examples); clean_accuracy (on the same "
                  "images, MC prediction with robust_mc_samples)",
}


# ============================================================================================ configuration
#: Fractions of the steps at which the learning rate drops by ``lr_gamma`` (the original target recipe).
LR_MILESTONES = (0.4, 0.7, 0.9)


@dataclasses.dataclass
class TransferRecipe(AccelerationSettings):
    """How a target network is trained and evaluated (defaults: the original target recipe): every setting of a
    transfer run except which cell it is (:class:`TransferConfig` adds that). A study's grid holds one recipe
    for all its cells (``workbench.study.TransferStudyConfig`` derives from this class).

    data_root: where to look for datasets. per_class: training images per class (None: all); pick: ``random``
        (seeded) or ``first`` (the original's s-CIFAR100 rule). test_per_class: evaluate on the first this-many test
        images of each class (None: all). image_size: side the images are resized to. channels: 1 or 3 (None: the
        dataset's; a fine-tuning source fixes it to its own input channels).
    finetune_from: a ``source`` run id or network file, for the fine-tuning methods.
    steps, batch_size, lr, weight_decay, lr_milestones (fractions of steps), lr_gamma: the optimisation.
    noise_warmup, clip: MetaPerturb's noise-coefficient ramp (fraction of steps) and training clamp (defaults:
        ``workbench.regularizers.metaperturb``).
    eval_every: steps between evaluations on the test split (0: only at the end), with eval_mc_samples MC
        samples; final_mc_samples for the final evaluation (stochastic methods only; deterministic ones use 1).
    train_eval_examples: after training, the final network is also evaluated (as on the test split, with
        eval_mc_samples) on this many seeded training images, for the training accuracy and the train-test gap
        that tell whether the run overfits (0: off). The last batches' accuracy is no substitute: it is measured
        with augmentation, noise ramps and a moving network.
    robust_norms: PGD norms to attack after training (``linf``, ``l2``, ``l1``; empty: off) with radii
        robust_eps_<norm> (pixel units in [0, 1]), robust_steps, robust_eot_samples gradient samples and
        robust_mc_samples prediction samples (stochastic methods), on robust_examples test images (a seeded
        random subset).
    normalization: ``dataset`` (the training split's per-channel statistics) or ``0.5`` (the original's).
    checkpoint_every / log_every: steps between checkpoints (null: only at the end of training) / training-curve
        rows. device: auto, cpu, cuda[:N]. threads: torch CPU threads (null: torch's default).
    compile_sites, cuda_graphs, precision: how the training steps run on the device
        (:class:`~workbench.graphs.AccelerationSettings`).
    """

    data_root: Optional[str] = None
    per_class: Optional[int] = None
    pick: Literal["random", "first"] = "random"
    test_per_class: Optional[int] = None
    image_size: int = 32
    channels: Optional[int] = None
    finetune_from: Optional[str] = None
    steps: int = 10000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lr_milestones: list[float] = dataclasses.field(default_factory=lambda: list(LR_MILESTONES))
    lr_gamma: float = 0.3
    noise_warmup: float = NOISE_WARMUP
    clip: Optional[float] = TRAIN_CLIP
    eval_every: int = 200
    eval_mc_samples: int = 5
    final_mc_samples: int = 100
    eval_batch_size: int = 500
    train_eval_examples: int = 1000
    robust_norms: list[str] = dataclasses.field(default_factory=list)
    robust_eps_linf: list[float] = dataclasses.field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    robust_eps_l2: list[float] = dataclasses.field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    robust_eps_l1: list[float] = dataclasses.field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0])
    robust_steps: int = 200
    robust_eot_samples: int = 10
    robust_mc_samples: int = 10
    robust_examples: int = 500
    robust_batch_size: int = 100
    normalization: Literal["dataset", "0.5"] = "dataset"
    device: str = "auto"
    threads: Optional[int] = None
    checkpoint_every: Optional[int] = 1000
    log_every: int = 50
    artifacts_root: Optional[str] = None

    @classmethod
    def recipe_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TransferRecipe))

    def recipe(self) -> dict[str, Any]:
        """This config's recipe settings (for a subclass: only those it shares with :class:`TransferRecipe`)."""
        return {name: getattr(self, name) for name in self.recipe_fields()}

    def validate(self) -> None:
        from .models import check_image_size

        super().validate()
        for name in ("steps", "batch_size", "eval_batch_size", "log_every", "robust_batch_size", "robust_examples"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.checkpoint_every is None or self.checkpoint_every >= 1,
                f"checkpoint_every must be >= 1 or null (only at the end of training), got {self.checkpoint_every}")
        require(self.batch_size >= 2, f"batch_size must be at least 2 (BatchNorm and the perturbation use batch "
                                      f"statistics), got {self.batch_size}")
        check_image_size(self.image_size)
        require_threads(self.threads)
        resolve_device(self.device, check_available=False)
        require(self.eval_every >= 0, f"eval_every must be >= 0 (0: evaluate only at the end), got {self.eval_every}")
        require(self.train_eval_examples >= 0, f"train_eval_examples must be >= 0 (0: off), got "
                                               f"{self.train_eval_examples}")
        for name in ("eval_mc_samples", "final_mc_samples", "robust_eot_samples", "robust_mc_samples"):
            value = getattr(self, name)
            require(value >= 1, f"{name} is a number of Monte-Carlo samples and must be >= 1, got {value}")
        require(self.robust_steps >= 0, f"robust_steps must be >= 0, got {self.robust_steps}")
        require(self.per_class is None or self.per_class >= 1, f"per_class must be >= 1 or null, got {self.per_class}")
        require(self.test_per_class is None or self.test_per_class >= 1,
                f"test_per_class must be >= 1 or null, got {self.test_per_class}")
        require(self.channels in (None, 1, 3), f"channels must be 1, 3 or null (the dataset's), got {self.channels}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        require(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        require(all(0 < m < 1 for m in self.lr_milestones),
                f"lr_milestones are fractions of the steps in (0, 1), got {self.lr_milestones}")
        require(list(self.lr_milestones) == sorted(self.lr_milestones),
                f"lr_milestones must be increasing, got {self.lr_milestones}")
        require(0 <= self.noise_warmup <= 1, f"noise_warmup is a fraction of the steps in [0, 1], got {self.noise_warmup}")
        require(self.clip is None or (math.isfinite(self.clip) and self.clip > 0),
                f"clip must be a finite number > 0 or null (no clamp), got {self.clip}")
        from .robustness import check_norm

        self.robust_norms = [check_norm(n) for n in self.robust_norms]
        for norm in ("linf", "l2", "l1"):
            eps = getattr(self, f"robust_eps_{norm}")
            require(all(e >= 0 for e in eps), f"robust_eps_{norm} must hold radii >= 0, got {eps}")


@dataclasses.dataclass
class TransferConfig(TransferRecipe):
    """Settings of one target training run: a :class:`TransferRecipe` and the cell it trains.

    target: dataset spec (``cifar10``, ``mnist_test10k``, ``npz:PATH``, ``tv:NAME`` ...).
    arch: a registered model (``workbench.models.available()``). method: a registered regularizer
        (``workbench.regularizers.available_regularizers()``), ``method_options`` its settings.
    phi: ``official`` (the authors' released phi under ``../shared/reference``), a phi file, or a meta-train run
        id (its ``phi.pt``); used by methods with phi. seed: the run's seed. run_name: the run id (null: generated).
    """

    target: str = "cifar10"
    arch: str = "resnet20"
    method: str = "metaperturb"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    phi: str = OFFICIAL_PHI
    seed: int = 0
    run_name: Optional[str] = None

    def validate(self) -> None:
        from .data import check_spec
        from .models import check_name

        super().validate()
        check_spec(self.target, "target")
        check_name(self.arch)
        require(bool(self.phi.strip()), "phi must be 'official', a phi file or a meta-train run id, got ''")
        require_seed("seed", self.seed)
        build_regularizer(self.method, self.method_options)  # unknown method / setting: one line, now

    def epsilons(self) -> dict[str, list[float]]:
        return {n: list(getattr(self, f"robust_eps_{n}")) for n in self.robust_norms}


# ============================================================================================ schedules
def lr_milestone_steps(steps: int, fractions=LR_MILESTONES) -> list[int]:
    """The steps at which the learning rate drops: ``round(f * steps)`` (4000/7000/9000 of 10,000)."""
    return [int(round(f * steps)) for f in fractions]


def lr_at(step: int, config: TransferConfig) -> float:
    """The learning rate used by update ``step`` (0-based): ``lr * gamma ** (milestones <= step)``."""
    drops = sum(1 for m in lr_milestone_steps(config.steps, config.lr_milestones) if m <= step)
    return config.lr * config.lr_gamma ** drops


# ============================================================================================ phi and source
def resolve_phi(spec: str, store: RunStore | None = None, initial: bool = False):
    """(phi, label, path) for ``official``, a phi file, or a meta-train run id (its ``phi.pt``).

    initial: the phi the named meta-training run started from instead (the untrained-phi control; for a
    ``meta_select`` run, its chosen run's). ``official`` and files have no run: a fresh phi as a seed-0 run draws it.
    """
    if initial:
        return _resolve_initial_phi(str(spec).strip(), store)
    from .perturb import MetaPerturb

    spec = str(spec).strip()
    if spec == OFFICIAL_PHI:
        path = official_phi_path()
        if not path.is_file():
            raise WorkbenchError(f"the authors' phi was not found at {path}; set WORKBENCH_REFERENCE to its folder or "
                                 "pass phi=PATH")
        return MetaPerturb.load(path), OFFICIAL_PHI, path
    path = Path(spec).expanduser()
    if path.is_file():
        return MetaPerturb.load(path), path.stem, path.resolve()
    if path.is_dir() and (path / "phi.pt").is_file():
        return MetaPerturb.load(path / "phi.pt"), path.name, (path / "phi.pt").resolve()
    store = store or RunStore()
    if os.sep not in spec and (store.runs_dir / spec).is_dir():
        run = store.open_run(spec)
        phi_file = run.path / "phi.pt"
        if not phi_file.is_file():
            raise WorkbenchError(f"run {spec} has no phi.pt (is it a finished meta-train run?); pass another phi")
        return MetaPerturb.load(phi_file), spec, phi_file
    raise WorkbenchError(f"phi {spec!r} is neither 'official', a phi file, nor a run id under {store.runs_dir}; "
                         "pass phi=official, phi=PATH or phi=<meta-train run id>")


def _resolve_initial_phi(spec: str, store: RunStore | None):
    from .phi_diagnostics import PHI_INIT_FILE, PHI_INIT_STD, initial_phi, trained_by
    from .perturb import MetaPerturb

    _, label, phi_path = resolve_phi(spec, store)  # the spec must name a phi that exists
    run_dir = Path(phi_path).parent
    if spec == OFFICIAL_PHI or not (run_dir / "run.json").is_file():
        return initial_phi(0), label, None
    runs = RunStore(run_dir.parent.parent)
    trained = trained_by(runs, run_dir.name)
    if trained is None:
        raise WorkbenchError(f"selection run {run_dir.name} names no chosen run; its untrained control is undefined")
    run = runs.open_run(trained)
    path = run.path / PHI_INIT_FILE
    if path.is_file():
        return MetaPerturb.load(path), label, path.resolve()
    # runs made before phi_init.pt was written: the initialisation is a function of the run's seed and init std
    return initial_phi(int(run.config.get("seed", 0)), float(run.config.get("phi_init_std", PHI_INIT_STD))), label, None


def _load_network_file(path: Path, origin: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged or foreign file: one line
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise WorkbenchError(f"cannot read network file {origin} ({first[:160]}); is it a workbench network?") from None
    if not isinstance(payload, dict) or payload.get("format") != NETWORK_FORMAT:
        raise WorkbenchError(f"{origin} is not a workbench network file (format '{NETWORK_FORMAT}'); train a source "
                             "network with `workbench source-train` and pass its run id")
    if payload.get("version") != NETWORK_VERSION:
        raise WorkbenchError(f"{origin} is a network file of version {payload.get('version')}; this workbench reads "
                             f"version {NETWORK_VERSION}")
    return payload


def load_network_payload(ref: str, store: RunStore | None = None) -> tuple[dict[str, Any], str]:
    """The saved network (``checkpoints/model.pt`` of a run, or a network file) and a label for messages."""
    ref = str(ref).strip()
    path = Path(ref).expanduser()
    if path.is_file():
        return _load_network_file(path, str(path)), str(path)
    if path.is_dir() and (path / "checkpoints" / "model.pt").is_file():
        return _load_network_file(path / "checkpoints" / "model.pt", str(path)), path.name
    store = store or RunStore()
    if os.sep not in ref and (store.runs_dir / ref).is_dir():
        run = store.open_run(ref)
        if not run.has_checkpoint("model"):
            raise WorkbenchError(f"run {ref} has no trained network (checkpoints/model.pt); is it a finished run?")
        return _load_network_file(run.path / "checkpoints" / "model.pt", f"run {ref}"), ref
    raise WorkbenchError(f"network {ref!r} is neither a network file nor a run id under {store.runs_dir}; pass a "
                         "source run id (workbench source-train) or a checkpoints/model.pt file")


def resolve_source(ref: Optional[str], store: RunStore | None = None) -> SourceNetwork:
    """The source network for fine-tuning (a ``source`` run id or a network file)."""
    if not ref:
        raise WorkbenchError("this method fine-tunes a network trained on the source; set finetune_from to a source "
                             "run id (train one with `workbench source-train`) or a network file")
    payload, label = load_network_payload(ref, store)
    return SourceNetwork(state_dict=payload["state_dict"], arch=str(payload["arch"]),
                         in_channels=int(payload["in_channels"]), num_classes=int(payload["num_classes"]),
                         image_size=int(payload["image_size"]), origin=label)


# ============================================================================================ results
@dataclasses.dataclass
class TransferResult:
    """What :func:`transfer` returns: the run id, the summary (final metrics), the trained model and more."""

    run_id: Optional[str]
    summary: dict[str, Any]
    model: nn.Module
    regularizer: Regularizer
    evaluation: Optional[EvalResult] = None
    robustness: Optional[dict[str, dict[str, list[float]]]] = None
    run: Optional[Run] = None


@dataclasses.dataclass
class _Setup:
    """Everything built before the run folder exists (so bad input writes nothing)."""

    config: TransferConfig
    device: torch.device
    view: Any
    augment: Any
    model: nn.Module
    regularizer: Regularizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    batches: Any
    phi: Any
    phi_label: Optional[str]
    phi_path: Optional[Path]
    source: Optional[SourceNetwork]
    train_step: Any = None  # workbench.graphs.TrainStep: one update (eager or a replayed CUDA graph, fp32 or bf16)


def _build(config: TransferConfig, store: RunStore, dataset=None) -> _Setup:
    from .data import Augment, BatchIterator, load_dataset, target_view
    from .models import build

    device = resolve_device(config.device)
    regularizer = build_regularizer(config.method, config.method_options)
    phi = phi_label = phi_path = None
    if regularizer.needs_phi:
        phi, phi_label, phi_path = resolve_phi(config.phi, store, initial=regularizer.initial_phi)
    source = resolve_source(config.finetune_from, store) if regularizer.needs_source else None
    channels = config.channels
    if source is not None:
        if channels is not None and channels != source.in_channels:
            raise WorkbenchError(f"channels={channels} but the fine-tuning source {source.origin} takes "
                                 f"{source.in_channels}-channel images; leave channels unset")
        channels = source.in_channels
    ds = dataset if dataset is not None else load_dataset(config.target, root=config.data_root)
    view = target_view(ds, per_class=config.per_class, image_size=config.image_size, channels=channels,
                       seed=config.seed, pick=config.pick)
    if config.test_per_class is not None:
        from .data.views import pick_per_class

        keep = pick_per_class(view.test.y, view.num_classes, config.test_per_class, config.seed, "first",
                              what="test_per_class", name=config.target, split="test")
        view = dataclasses.replace(view, test=view.test.subset(keep))
    augment = Augment.for_view(view, stats="dataset" if config.normalization == "dataset" else "half")
    torch.manual_seed(config.seed)  # the network's initialisation
    model = build(config.arch, view.num_classes, in_channels=view.channels, image_size=view.image_size)
    ctx = TrainContext(arch=config.arch, num_classes=view.num_classes, in_channels=view.channels,
                       image_size=view.image_size, total_steps=config.steps, train_size=len(view.train),
                       device=device, phi=phi, source=source, noise_warmup=config.noise_warmup, clip=config.clip)
    # channels_last: the faster layout on CPU for these networks and for the perturbation's depthwise stencils
    model = regularizer.prepare(model, ctx).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(regularizer.param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=lr_milestone_steps(config.steps, config.lr_milestones), gamma=config.lr_gamma)
    batches = BatchIterator(view.train, config.batch_size, augment, seed=config.seed, device=device)
    train_step = _train_step(config, device, model, regularizer, optimizer)
    return _Setup(config, device, view, augment, model, regularizer, optimizer, scheduler, batches, phi, phi_label,
                  phi_path, source, train_step)


def _train_step(config: TransferConfig, device: torch.device, model: nn.Module, regularizer: Regularizer,
                optimizer: torch.optim.Optimizer):
    """The update of one training step as the config's ``compile_sites``, ``cuda_graphs`` and ``precision`` ask
    (their defaults on a CPU: the sites' fused kernel, eager steps, float32: the loop as it always was)."""
    from . import compiled, graphs

    compiled.apply(config.compile_sites, device, [model], what="transfer")
    decision = graphs.decide(config.cuda_graphs, device, models=[model], optimizers=[optimizer],
                             method=config.method, what="transfer")
    return graphs.TrainStep(model, regularizer, optimizer, device, precision=config.precision, graphs=decision)


def _tags(config: TransferConfig, setup: _Setup, kind: str) -> dict[str, Any]:
    tags: dict[str, Any] = {"target": config.target, "arch": config.arch, "method": config.method,
                            "seed": config.seed}
    if setup.phi_label is not None:
        tags["phi"] = setup.phi_label
    if setup.source is not None:
        tags["finetune_from"] = setup.source.origin
    source = setup.phi_label if setup.phi_label is not None else (setup.source.origin if setup.source else None)
    if kind == SOURCE_KIND:
        source = config.target
    if source is not None:
        tags["source"] = source
    return {k: v for k, v in tags.items() if v is not None}


# ============================================================================================ the loop
@contextlib.contextmanager
def _threads(count: Optional[int]) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu().to(torch.uint8))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8), device)




def _network_payload(setup: _Setup) -> dict[str, Any]:
    """The trained network, self-describing (what fine-tuning and :func:`load_network` read)."""
    cfg, view = setup.config, setup.view
    return {
        "format": NETWORK_FORMAT,
        "version": NETWORK_VERSION,
        "arch": cfg.arch,
        "num_classes": view.num_classes,
        "in_channels": view.channels,
        "image_size": view.image_size,
        "method": cfg.method,
        "method_options": dict(cfg.method_options),
        "mean": list(setup.augment.mean),
        "std": list(setup.augment.std),
        "phi": cpu_copy(setup.phi.state_dict()) if setup.phi is not None else None,
        "state_dict": cpu_copy(setup.model.state_dict()),
        "config": json.loads(json.dumps(cfg.to_dict())),
    }


def _checkpoint(run: Run, setup: _Setup, step: int, train_seconds: float) -> None:
    run.save_checkpoint({
        "schema": CHECKPOINT_SCHEMA,
        "version": CHECKPOINT_VERSION,
        "config": json.loads(json.dumps(setup.config.to_dict())),
        "step": step,
        "train_seconds": float(train_seconds),  # training time up to this step, summed over sessions
        "model": cpu_copy(setup.model.state_dict()),
        "optimizer": cpu_copy(setup.optimizer.state_dict()),
        "scheduler": _scheduler_state(setup.scheduler),
        "regularizer": cpu_copy(setup.regularizer.state_dict()),
        "batches": cpu_copy(setup.batches.state_dict()),
        "rng": _rng_state(setup.device),
        "torch": str(torch.__version__),
    }, "last")


def _scheduler_state(scheduler) -> dict[str, Any]:
    """MultiStepLR's position (its milestones are a Counter, which weights_only loading refuses; they are rebuilt
    from the config anyway)."""
    return {"last_epoch": int(scheduler.last_epoch), "last_lr": [float(v) for v in scheduler.get_last_lr()]}


def _load_scheduler_state(scheduler, state: Mapping[str, Any]) -> None:
    scheduler.last_epoch = int(state["last_epoch"])
    scheduler._last_lr = list(state["last_lr"])






def _claim_resume(store: RunStore, run_id: str, kind: str, config: TransferConfig) -> Run:
    """``run_id`` opened to be resumed by this process with ``config``, holding its writer lock: refused when it is
    of another kind (naming the command that resumes it), another process writes it (naming its pid and host), it
    was started with another config, or it finished."""
    run = store.resume_run(run_id, kind)
    if run.status == "finished":
        run.release_lock()
        if config_difference(run.config, config, RESUME_MUTABLE):  # the more useful answer: say what differs
            load_resume_checkpoint(run, config, RESUME_MUTABLE, CHECKPOINT_SCHEMA, CHECKPOINT_VERSION, "transfer")
        accuracy = run.summary.get("test_accuracy")
        shown = f" (test accuracy {accuracy:.4f})" if isinstance(accuracy, (int, float)) else ""
        raise WorkbenchError(f"run {run_id} is finished{shown}; there is nothing to resume: start a new run to train "
                             "again")
    return run


def _evaluate(setup: _Setup, samples: int, seed: int, progress: bool = False) -> EvalResult:
    reg, cfg = setup.regularizer, setup.config
    if reg.needs_recalibration:
        # fresh training batches of a stream of their own (seeded by the evaluation), so the training batches
        # stay those of a run that never evaluates
        from .data import BatchIterator

        reg.recalibrate(setup.model, BatchIterator(setup.view.train, cfg.batch_size, setup.augment, seed=seed,
                                                   device=setup.device))
    reg.on_eval(setup.model)
    sites, names = reg.sites()
    return evaluate(setup.model, setup.view.test.x, setup.view.test.y, transform=setup.augment.eval,
                    samples=samples if reg.stochastic_eval else 1, batch_size=cfg.eval_batch_size,
                    device=setup.device, sites=sites, site_names=names, tile_at=reg.tile_at(), seed=seed,
                    progress=progress)


def _evaluate_train(setup: _Setup) -> Optional[EvalResult]:
    """The final network on a seeded subset of its own training images (eval transform, eval_mc_samples)."""
    cfg, reg = setup.config, setup.regularizer
    if not cfg.train_eval_examples:
        return None
    train = setup.view.train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_eval_examples]
    reg.on_eval(setup.model)
    index = pick.sort().values
    return evaluate(setup.model, train.x[index], train.y[index],
                    transform=setup.augment.eval, samples=cfg.eval_mc_samples if reg.stochastic_eval else 1,
                    batch_size=cfg.eval_batch_size, device=setup.device, tile_at=reg.tile_at(), seed=cfg.seed + 1)


def _site_arrays(result: EvalResult) -> dict[str, np.ndarray] | None:
    if not result.site_scales:
        return None
    names = list(result.site_scales)
    channels = np.asarray([len(result.site_scales[n]) for n in names], dtype=np.int64)
    scale = np.full((len(names), int(channels.max())), np.nan, dtype=np.float32)
    for i, n in enumerate(names):
        scale[i, : channels[i]] = result.site_scales[n]
    stats = result.multiplier_stats
    return {
        "site_names": np.asarray(names, dtype=str),
        "channels": channels,
        "scale": scale,
        "multiplier_mean": np.asarray([stats.get(n, {}).get("mean", np.nan) for n in names], dtype=np.float64),
        "multiplier_std": np.asarray([stats.get(n, {}).get("std", np.nan) for n in names], dtype=np.float64),
    }


def _robustness(setup: _Setup, progress: bool) -> tuple[dict[str, dict[str, list[float]]], torch.Tensor, float]:
    """PGD/EoT curves on a seeded subset of the test split, its indices, and the clean accuracy on that subset."""
    from .robustness import PixelModel, robustness_curve

    cfg, reg = setup.config, setup.regularizer
    reg.on_eval(setup.model)
    test = setup.view.test
    # a seeded subset spread over the classes (test splits are often sorted by class)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.robust_examples]
    pick = pick.sort().values
    pixel_model = PixelModel(setup.model, setup.augment.mean, setup.augment.std).to(setup.device)
    stochastic = reg.stochastic_eval
    curves = robustness_curve(
        pixel_model, test.x[pick], test.y[pick], norms=cfg.robust_norms,
        epsilons=cfg.epsilons(), steps=cfg.robust_steps,
        eot_samples=cfg.robust_eot_samples if stochastic else 1,
        mc_samples=cfg.robust_mc_samples if stochastic else 1,
        batch_size=cfg.robust_batch_size, device=setup.device, seed=cfg.seed, progress=progress)
    clean = robustness_curve(pixel_model, test.x[pick], test.y[pick], norms=["linf"], epsilons=[0.0], steps=0,
                             mc_samples=cfg.robust_mc_samples if stochastic else 1,
                             batch_size=cfg.robust_batch_size, device=setup.device, seed=cfg.seed)
    return curves, pick, clean["linf"]["accuracy"][0]


def _coerce_config(config: TransferConfig | Mapping[str, Any] | None) -> TransferConfig:
    if config is None:
        return TransferConfig()
    if isinstance(config, TransferConfig):
        config.validate()
        return config
    return TransferConfig.from_dict(config)


def transfer(config: TransferConfig | Mapping[str, Any] | None = None, store: RunStore | None = None,
             progress: bool = True, *, resume: Optional[str] = None, stop_at: Optional[int] = None,
             dataset: Any = None, kind: str = TRANSFER_KIND) -> TransferResult:
    """Train a network on the target with the configured method, evaluate it, write the artifacts.

    config: a :class:`TransferConfig` or a dict of its fields (with ``resume`` and no config: the run's own).
    store: the run store (default ``RunStore(config.artifacts_root)``). progress: tqdm bars.
    resume: a run id to continue from its last checkpoint (its config must match ``config``).
    stop_at: stop after this many steps (checkpointed, status ``failed`` with a resumable reason): a time slice.
    dataset: an ``ImageDataset`` to use instead of loading ``config.target`` (e.g. synthetic data in tests).
    """
    if resume is not None and config is None:
        store = store or RunStore()
        store.check_resume_kind(resume, kind)
        config = TransferConfig.from_dict(store.open_run(resume).config)
    config = _coerce_config(config)
    store = store or RunStore(config.artifacts_root)
    if stop_at is not None and stop_at < 1:
        raise WorkbenchError(f"stop_at must be >= 1, got {stop_at}")
    steady_allocator()  # freed feature maps are reused rather than faulted in again every step ($WORKBENCH_MALLOC)
    # A resumed run is claimed before anything is built: a second writer is refused at once.
    run = _claim_resume(store, resume, kind, config) if resume is not None else None
    try:
        with _threads(config.threads):
            setup = _build(config, store, dataset)
            start_step, seconds = 0, 0.0
            if run is not None:
                state = load_resume_checkpoint(run, config, RESUME_MUTABLE, CHECKPOINT_SCHEMA, CHECKPOINT_VERSION,
                                               "transfer")
                setup.model.load_state_dict(state["model"])
                setup.optimizer.load_state_dict(state["optimizer"])
                _load_scheduler_state(setup.scheduler, state["scheduler"])
                setup.regularizer.load_state_dict(state["regularizer"])
                setup.batches.load_state_dict(state["batches"])
                _set_rng_state(state["rng"], setup.device)
                start_step, seconds = int(state["step"]), float(state.get("train_seconds", 0.0))
                # steps past the checkpoint and a final phase cut short are written again, once
                run.truncate_metrics(start_step, drop_stages=FINAL_STAGES)
                run.mark_running()
            else:
                run = store.create_run(kind, config, tags=_tags(config, setup, kind), run_id=config.run_name)
                _write_records(run, setup)
            try:
                return _train(run, setup, start_step, progress, stop_at, seconds)
            except KeyboardInterrupt:
                run.mark_failed("interrupted; resume with --resume " + run.run_id)
                raise
            except Exception as exc:
                if run.status == "running":
                    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                    run.mark_failed(f"{type(exc).__name__}: {first}")
                raise
    finally:
        if run is not None:
            run.release_lock()


def _write_records(run: Run, setup: _Setup) -> None:
    run.save_json("data", setup.view.to_dict())
    run.save_json("regularizer", setup.regularizer.describe())
    if setup.phi is not None:
        digest = hashlib.sha256(Path(setup.phi_path).read_bytes()).hexdigest() if setup.phi_path else None
        run.save_json("phi", {"spec": setup.config.phi, "label": setup.phi_label, "path": str(setup.phi_path),
                              "sha256": digest, "parameters": sum(p.numel() for p in setup.phi.parameters()),
                              "initial": setup.regularizer.initial_phi})
    if setup.source is not None:
        run.save_json("finetune_source", {"origin": setup.source.origin, "arch": setup.source.arch,
                                          "in_channels": setup.source.in_channels,
                                          "num_classes": setup.source.num_classes})


def _train(run: Run, setup: _Setup, start_step: int, progress: bool, stop_at: Optional[int],
           prior_seconds: float = 0.0) -> TransferResult:
    """Train from ``start_step`` (``prior_seconds``: the training time of earlier sessions up to that step)."""
    cfg, model, reg = setup.config, setup.model, setup.regularizer
    total = cfg.steps
    end = total if stop_at is None else min(total, stop_at)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=f"{cfg.method} {cfg.arch} {cfg.target}", leave=False)
    sums = torch.zeros(2, dtype=torch.float64, device=setup.device)
    count = 0
    extra: dict[str, float] = {}
    started = time.perf_counter()
    step = start_step
    try:
        while step < end:
            model.train()
            reg.on_train_step(model, step, total)
            x, y = next(setup.batches)
            loss, acc = setup.train_step(x, y, step)  # loss, zero_grad, backward, optimizer step
            setup.scheduler.step()
            step += 1
            sums += torch.stack([loss.detach().double(), acc.detach().double()])
            count += 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                means = (sums / max(count, 1)).tolist()
                if not math.isfinite(means[0]):
                    raise WorkbenchError(f"the training loss became {means[0]} by step {step}; lower lr or check the "
                                         "data and method settings")
                extra = reg.train_metrics()
                run.log_metrics(step, "train", loss=means[0], accuracy=means[1], lr=lr_at(step - 1, cfg), **extra)
                if bar is not None:
                    bar.set_postfix(loss=f"{means[0]:.3f}", acc=f"{means[1]:.3f}")
                sums.zero_()
                count = 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                result = _evaluate(setup, cfg.eval_mc_samples, seed=cfg.seed + step)
                run.log_metrics(step, "test", **{k: result.metrics[k] for k in ("accuracy", "nll", "ece", "mc_samples")})
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end:
                _checkpoint(run, setup, step, prior_seconds + time.perf_counter() - started)
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - started
    if step < total:
        run.mark_failed(f"stopped at step {step} of {total} (stop_at); resume with --resume {run.run_id}")
        return TransferResult(run.run_id, {"step": step, "stopped": True}, model, reg, run=run)
    return _finish(run, setup, step, train_seconds, progress, prior_seconds)


def _finish(run: Run, setup: _Setup, step: int, train_seconds: float, progress: bool,
            prior_seconds: float = 0.0) -> TransferResult:
    """The final phase: evaluation, arrays, records, summary. Idempotent: a resume after it was cut short runs it
    again over the same checkpoint, its metric rows (:data:`FINAL_STAGES`) dropped first."""
    cfg, reg = setup.config, setup.regularizer
    final = _evaluate(setup, cfg.final_mc_samples, seed=cfg.seed + 10**9, progress=progress)
    run.log_metrics(step, "final", **{k: final.metrics[k] for k in ("accuracy", "nll", "ece", "mc_samples")})
    run.save_arrays("predictions", **final.prediction_arrays(), probs=final.probs.numpy().astype(np.float32))
    run.save_arrays("reliability", **final.bins)
    sites = _site_arrays(final)
    if sites is not None:
        run.save_arrays("site_scales", **sites)
    robust = None
    if cfg.robust_norms:
        robust, pick, clean = _robustness(setup, progress)
        arrays = {"norms": np.asarray(list(robust), dtype=str), "examples": pick.numpy().astype(np.int64),
                  "clean_accuracy": np.asarray(clean)}
        for norm, curve in robust.items():
            arrays[f"{norm}_eps"] = np.asarray(curve["eps"], dtype=np.float64)
            arrays[f"{norm}_accuracy"] = np.asarray(curve["accuracy"], dtype=np.float64)
        run.save_arrays("robustness", **arrays)
        run.save_json("robustness", {"curves": robust, "clean_accuracy": clean, "steps": cfg.robust_steps,
                                     "eot_samples": cfg.robust_eot_samples if reg.stochastic_eval else 1,
                                     "mc_samples": cfg.robust_mc_samples if reg.stochastic_eval else 1,
                                     "examples": min(cfg.robust_examples, len(setup.view.test))})
    on_train = _evaluate_train(setup)
    if on_train is not None:
        run.log_metrics(step, "train_eval", **{k: on_train.metrics[k] for k in ("accuracy", "nll", "ece", "mc_samples")})
    run.save_checkpoint(_network_payload(setup), "model")
    summary = {
        "test_accuracy": final.metrics["accuracy"],
        "test_nll": final.metrics["nll"],
        "test_ece": final.metrics["ece"],
        "mc_samples": final.metrics["mc_samples"],
        "test_examples": final.metrics["n"],
        "train_examples": len(setup.view.train),
        "steps": step,
        "method": cfg.method,
        "arch": cfg.arch,
        "target": cfg.target,
        "stochastic_eval": reg.stochastic_eval,
        "parameters": sum(p.numel() for p in setup.model.parameters()),
        "train_seconds": round(prior_seconds + train_seconds, 3),
        "train_seconds_last_session": round(train_seconds, 3),
    }
    if on_train is not None:
        summary["train_eval_accuracy"] = on_train.metrics["accuracy"]
        summary["train_eval_nll"] = on_train.metrics["nll"]
        summary["train_eval_examples"] = on_train.metrics["n"]
        summary["generalization_gap"] = on_train.metrics["accuracy"] - final.metrics["accuracy"]
    last_train = run.read_metrics("train")
    if last_train:
        summary["final_train_loss"] = last_train[-1].get("loss")
        summary["final_train_accuracy"] = last_train[-1].get("accuracy")
    if final.site_scales:
        summary["sites"] = len(final.site_scales)
        summary["mean_scale"] = float(np.mean(np.concatenate(list(final.site_scales.values()))))
    if robust:
        for norm, curve in robust.items():
            for eps, acc in zip(curve["eps"], curve["accuracy"]):
                summary[f"robust_{norm}_{eps:.6g}"] = acc
    run.mark_finished(summary)
    return TransferResult(run.run_id, summary, setup.model, reg, evaluation=final, robustness=robust, run=run)


# ============================================================================================ source networks
def train_source_network(config: TransferConfig | Mapping[str, Any] | None = None, store: RunStore | None = None,
                         progress: bool = True, *, resume: Optional[str] = None, dataset: Any = None,
                         **overrides: Any) -> TransferResult:
    """Plain supervised training on the source dataset (default Tiny ImageNet 32x32, all 200 classes; the method
    must be ``base``, the default for a dict config), saved as a run of kind ``source`` whose network fine-tuning starts from (``finetune_from=<run id>``).

    The original fine-tuned from a 100k-step Tiny-ImageNet network with an unpublished recipe; this uses the
    transfer loop's recipe (our choice). ``overrides`` are TransferConfig fields (e.g. ``arch="conv4"``).
    """
    base = {"target": "tinyimagenet32", "method": "base"}
    if isinstance(config, TransferConfig):
        values = config.to_dict()
    else:
        values = {**base, **dict(config or {})}
    values.update(overrides)
    cfg = TransferConfig.from_dict(values)
    if cfg.method != "base":
        raise WorkbenchError(f"a source network is trained with plain supervised training (method=base), got "
                             f"method={cfg.method!r}; set method=base")
    return transfer(cfg, store, progress, resume=resume, dataset=dataset, kind=SOURCE_KIND)


def load_network(ref: str, store: RunStore | None = None, device: str | torch.device = "cpu"):
    """Rebuild a trained network from a run id or network file: ``(model, regularizer, payload)``.

    The model has its method's modules (MetaPerturb sites with their running statistics and phi, DropBlock ...)
    and is in eval mode; ``payload`` holds arch, classes, normalisation (mean/std) and the run's config.
    """
    from .models import build
    from .perturb import MetaPerturb

    payload, label = load_network_payload(ref, store)
    reg = build_regularizer(payload["method"], payload.get("method_options") or {})
    phi = None
    if reg.needs_phi:
        phi = MetaPerturb.from_state_dict(payload["phi"], f"network {label}")
    source = None
    if reg.needs_source:  # the convs are overwritten by the saved state below
        source = SourceNetwork(payload["state_dict"], payload["arch"], payload["in_channels"],
                               payload["num_classes"], payload["image_size"], label)
    cfg = payload.get("config") or {}
    model = build(payload["arch"], payload["num_classes"], in_channels=payload["in_channels"],
                  image_size=payload["image_size"])
    ctx = TrainContext(arch=payload["arch"], num_classes=payload["num_classes"], in_channels=payload["in_channels"],
                       image_size=payload["image_size"], total_steps=int(cfg.get("steps", 1)),
                       train_size=1, device=torch.device(device), phi=phi, source=source,
                       noise_warmup=float(cfg.get("noise_warmup", NOISE_WARMUP)), clip=cfg.get("clip", TRAIN_CLIP))
    model = reg.prepare(model, ctx)
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    reg.on_eval(model)
    return model, reg, payload


# ============================================================================================ CLI
def _config_from_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> TransferConfig:
    overrides = parse_overrides(args.set)
    if args.artifacts:
        overrides["artifacts_root"] = args.artifacts
    if args.config:
        return TransferConfig.from_yaml(args.config, **{**(defaults or {}), **overrides})
    return TransferConfig.from_dict({**(defaults or {}), **overrides})


def _resume_config(args: argparse.Namespace, store: RunStore, kind: str = TRANSFER_KIND) -> TransferConfig:
    overrides = parse_overrides(args.set)
    if args.artifacts:
        overrides["artifacts_root"] = args.artifacts
    store.check_resume_kind(args.resume, kind)  # a run of another kind is sent to its command, not misread
    stored = dict(store.open_run(args.resume).config)
    if args.config:
        return TransferConfig.from_yaml(args.config, **overrides)
    return TransferConfig.from_dict({**stored, **overrides})


def _report(result: TransferResult, what: str) -> int:
    s = result.summary
    if s.get("stopped"):
        print(f"{what} stopped at step {s['step']}; run {result.run_id} can be resumed with --resume {result.run_id}")
        return 0
    print(f"{what} finished: run {result.run_id}; test accuracy {s['test_accuracy']:.4f}, NLL {s['test_nll']:.4f}, "
          f"ECE {s['test_ece']:.4f} ({s['mc_samples']} MC sample{'s' if s['mc_samples'] != 1 else ''})")
    return 0


def _cli_transfer(args: argparse.Namespace) -> int:
    store = RunStore(args.artifacts) if args.artifacts else None
    if args.resume:
        store = store or RunStore()
        config = _resume_config(args, store)
        result = transfer(config, store, progress=not args.no_progress, resume=args.resume)
    else:
        config = _config_from_args(args)
        result = transfer(config, store, progress=not args.no_progress)
    return _report(result, "transfer")


def _cli_source(args: argparse.Namespace) -> int:
    store = RunStore(args.artifacts) if args.artifacts else None
    if args.resume:
        store = store or RunStore()
        config = _resume_config(args, store, SOURCE_KIND)
        result = train_source_network(config, store, progress=not args.no_progress, resume=args.resume)
    else:
        config = _config_from_args(args, {"target": "tinyimagenet32", "method": "base"})
        result = train_source_network(config, store, progress=not args.no_progress)
    return _report(result, "source training")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench transfer`` and ``workbench source-train``."""
    from .cli import add_command, add_run_flags

    parser = add_command(
        subparsers, "transfer", _cli_transfer,
        help="train a network on a target with frozen phi or a baseline regularizer",
        description="Train a fresh network on a target dataset with MetaPerturb (frozen phi) or a baseline "
                    f"({', '.join(available_regularizers())}), then evaluate accuracy, NLL, ECE (and robustness "
                    "when robust_norms is set) and write the artifacts.")
    add_run_flags(parser, "TransferConfig", "--set steps=100 or --set method=dropblock")
    source = add_command(
        subparsers, "source-train", _cli_source,
        help="train a network on the source dataset (what fine-tuning starts from)",
        description="Plain supervised training on the source dataset (default tinyimagenet32, method base), saved "
                    "as a 'source' run; pass its id as finetune_from to the fine-tuning methods.")
    add_run_flags(source, "TransferConfig")


__all__ = [
    "ARRAY_NAMES", "LR_MILESTONES", "TransferConfig", "TransferRecipe", "TransferResult", "lr_at", "lr_milestone_steps", "load_network",
    "noise_coefficient", "official_phi_path", "register_cli", "resolve_phi", "resolve_source", "train_source_network",
    "transfer",
]
