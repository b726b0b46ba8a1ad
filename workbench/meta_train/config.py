"""What defines a meta-training run: :class:`MetaTrainConfig`, the run kinds and file names, the seed purposes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from ..config import require, require_seed, require_threads
from .._runtime import resolve_device
from ..fanout import EXECUTION_FIELDS, FanOutSettings
from ..graphs import AccelerationSettings
from ..phi_diagnostics import PHI_INIT_STD, SEED_PHI
from ..regularizers import TRAIN_CLIP


RUN_KIND = "meta_train"


SELECT_KIND = "meta_select"


RESUME_KINDS = (RUN_KIND, SELECT_KIND)  # what `workbench meta-train --resume` continues


CHECKPOINT_SCHEMA = "workbench.meta_train.checkpoint"


CHECKPOINT_VERSION = 1


PHI_FILE = "phi.pt"


# Config fields that may differ when a run is resumed: where things are and how fast, never what is computed.
RESUME_MUTABLE = ("data_root", "artifacts_root", "threads", "device", "checkpoint_every", "run_name", *EXECUTION_FIELDS,
                  "compile_sites", "cuda_graphs")


# Purposes of the per-task seeds derived from the run seed (see derive_seed).
_SEED_MODEL, _SEED_NOISE, _SEED_TRAIN, _SEED_VALID, _SEED_EVAL, _SEED_SELECT, _SEED_PROBE = range(SEED_PHI + 1, SEED_PHI + 8)


PROBE_IMAGES = 64  # held-out source images the end-of-run diagnostics feed through a fresh network


_METRIC_NAMES = ("train_loss", "train_acc", "heldout_loss", "heldout_acc")


# ================================================================================================= config
@dataclass
class MetaTrainConfig(FanOutSettings, AccelerationSettings):
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
    compile_sites, cuda_graphs, precision: how the task networks' steps run on the device
        (:class:`~workbench.graphs.AccelerationSettings`): cuda_graphs captures each task's first-order step (its
        update and phi's gradient); the second-order look-ahead keeps the sites eager and the steps uncaptured (it
        needs a double backward); precision keeps phi's gradient in float32.
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
    phi_init_std: float = PHI_INIT_STD
    clip: Optional[float] = TRAIN_CLIP
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
    artifacts_root: Optional[str] = None
    run_name: Optional[str] = None

    def validate(self) -> None:
        from ..data import check_spec
        from ..models import check_image_size, check_name

        super().validate()

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
