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

The package's parts: ``config`` (:class:`MetaTrainConfig`, kinds and file names), ``trainer`` (the joint step,
:class:`MetaTrainer`), ``runs`` (one run's lifecycle: create or resume, train, checkpoint, finish), ``selection``
(``num_runs`` candidates and the choice among them), ``api`` (:func:`meta_train`) and ``cli``.
"""
from .._runtime import derive_seed, resolve_device
from ..phi_diagnostics import PHI_INIT_FILE, initial_phi
from .api import meta_train
from .cli import register_cli
from .config import (CHECKPOINT_SCHEMA, CHECKPOINT_VERSION, PHI_FILE, PROBE_IMAGES, RESUME_KINDS,
                     RESUME_MUTABLE, RUN_KIND, SELECT_KIND, MetaTrainConfig)
from .runs import MetaTrainResult, diagnose_run
from .selection import candidate_run_id, run_candidate, selection_dataset, selection_transfer_config, transfer_score
from .trainer import (MetaTrainer, NonFiniteLoss, SourceData, TaskRNG, TaskSlot, batchnorm_eval, frozen,
                      gradient_agreement, prepare_source)

__all__ = ["CHECKPOINT_SCHEMA", "CHECKPOINT_VERSION", "MetaTrainConfig", "MetaTrainResult", "MetaTrainer",
           "NonFiniteLoss", "PHI_FILE", "PHI_INIT_FILE", "PROBE_IMAGES", "RESUME_KINDS", "RESUME_MUTABLE", "RUN_KIND",
           "SELECT_KIND", "SourceData", "TaskRNG", "TaskSlot", "batchnorm_eval", "candidate_run_id", "derive_seed",
           "diagnose_run", "frozen", "gradient_agreement", "initial_phi", "meta_train", "prepare_source",
           "register_cli", "resolve_device", "run_candidate", "selection_dataset", "selection_transfer_config",
           "transfer_score"]
