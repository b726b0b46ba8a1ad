"""What a run records about where it ran: :func:`environment_info`.

Versions (python, torch, torchvision, numpy, workbench), platform, host, CPU model, GPU names (from torch when CUDA
is already initialised, else ``nvidia-smi``, so no CUDA context is made), the git revision and dirty flag of the
source checkout, and the time. ``_HOSTNAME`` is this host, as records and writer locks name it.
"""
from __future__ import annotations

import copy
import functools
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .formatting import _iso, _now
from .layout import _checkout_root

_HOSTNAME = socket.gethostname()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi_names() -> list[str]:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "torchvision": _package_version("torchvision"),
        "workbench": _package_version("metaperturb-workbench"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": _HOSTNAME,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    package = sys.modules.get(__name__.split(".")[0])  # the workbench package, for its __version__
    if getattr(package, "__version__", None):
        info["workbench"] = package.__version__
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        info.update(torch=None, cuda_available=False, cuda_version=None, gpus=[])
        return info
    info["torch"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    gpus: list[str] = []
    if info["cuda_available"]:
        # Asking torch for device names would create a CUDA context in a process that may never use the GPU.
        if torch.cuda.is_initialized():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        else:
            gpus = _nvidia_smi_names()
    info["gpus"] = gpus
    return info


def _git_info(root: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"git_revision": None, "git_dirty": None}
    if root is None or not (root / ".git").exists():
        return out
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode == 0 and rev.stdout.strip():
            out["git_revision"] = rev.stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=20
        )
        if status.returncode == 0:
            out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def environment_info() -> dict[str, Any]:
    """Versions (python, torch, torchvision, numpy, workbench), platform, host, CPU, GPUs, the git revision and
    dirty flag of the source checkout (None when not running from one), and the current UTC time."""
    info = copy.deepcopy(_static_environment())
    torch = sys.modules.get("torch")
    info["torch_threads"] = torch.get_num_threads() if torch is not None else None
    info.update(_git_info(_checkout_root()))
    info["time"] = _iso(_now())
    return info

