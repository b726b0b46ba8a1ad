"""Plumbing shared by the training stages (meta-training, transfer): devices, the allocator setting, CPU copies for
checkpoints, the config comparison that guards a resume, and seeds derived for each purpose of a run."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .errors import WorkbenchError


def resolve_device(spec: str, check_available: bool = True) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked unless told not)."""
    spec = (spec or "").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise WorkbenchError(f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise WorkbenchError(f"device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if check_available and device.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device {spec!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return device


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MALLOC_ENV = "WORKBENCH_MALLOC"


def keep_freed_memory() -> str:
    """Ask glibc to serve blocks up to 32 MiB from its heap and never trim it; returns a line saying what was set.

    By default glibc hands freed blocks above its mmap threshold back to the operating system, so every training step
    faults its large feature maps back in and the kernel zeroes each page again. How many blocks take that path
    depends on the process's allocation history, so the same step swung by up to 50% between runs (Conv-4 plain step:
    60 to 92 ms). Kept, the freed maps are reused. Process-wide, like ``torch.set_num_threads``; the price is that a
    process holds on to the memory of its largest step until it exits.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: default (no glibc mallopt)"
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30):
        return "allocator: glibc keeps freed memory (mmap threshold 32 MiB, no trim)"
    return "allocator: default (mallopt refused)"


def steady_allocator() -> str:
    """:func:`keep_freed_memory` for the training stages, unless ``$WORKBENCH_MALLOC`` is ``default``."""
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "default":
        return f"allocator: default (${MALLOC_ENV}=default)"
    return keep_freed_memory()


def cpu_copy(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor detached and cloned on the CPU (containers rebuilt), for checkpoints."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, Mapping):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj


def config_difference(stored: Mapping[str, Any], config: Any, mutable: Iterable[str] = ()) -> list[str]:
    """Fields of ``config`` whose value differs from the ``stored`` dict (as JSON would hold it), except ``mutable``."""
    given = json.loads(json.dumps(config.to_dict()))
    skip = set(mutable)
    return [k for k in given if k not in skip and stored.get(k) != given[k]]


def load_resume_checkpoint(run: Any, config: Any, mutable: Iterable[str], schema: str, version: int,
                           what: str) -> dict:
    """The ``last`` checkpoint of ``run`` for a resume with ``config``, after every check a resume needs: the run's
    config and the checkpoint's match ``config`` (except ``mutable`` fields), a checkpoint exists, and it is a
    ``what`` checkpoint of this ``schema`` and ``version``. Each mismatch is a one-line error."""
    differ = config_difference(run.config, config, mutable)
    if differ:
        given = json.loads(json.dumps(config.to_dict()))
        shown = ", ".join(f"{k}: {run.config.get(k)!r} -> {given[k]!r}" for k in differ[:4])
        raise WorkbenchError(f"run {run.run_id} was started with a different config ({shown}); resume it without "
                             "--config/--set, or start a new run")
    if not run.has_checkpoint("last"):
        raise WorkbenchError(f"run {run.run_id} has no checkpoint to resume from (checkpoints are written every "
                             f"checkpoint_every={config.checkpoint_every} steps); start a new run instead")
    checkpoint = run.load_checkpoint("last", map_location="cpu")
    if checkpoint.get("schema") != schema or checkpoint.get("version") != version:
        raise WorkbenchError(f"run {run.run_id}: checkpoints/last.pt is not a {what} checkpoint of version {version}; "
                             "start a new run")
    if config_difference(checkpoint.get("config", {}), config, mutable):
        raise WorkbenchError(f"run {run.run_id}: its checkpoint was written with a different config than "
                             "config.json; start a new run")
    return checkpoint


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for one purpose (and task) of a run, from the run seed."""
    state = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)
