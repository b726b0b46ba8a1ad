"""Plumbing shared by the training stages (meta-training, transfer): devices, CPU copies for checkpoints, and the
config comparison that guards a resume."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

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
