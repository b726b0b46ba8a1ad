"""The run store: one folder per run under an artifacts root, written atomically, read defensively.

Every stage writes through this module (meta-training, transfer, studies) and every reader goes through it
(notebooks, the dashboard). The layout and the file formats are documented in ``artifacts/README.md``::

    <root>/runs/<run_id>/run.json          identity, status, heartbeat, environment (schema_version 1)
                         config.json       the stage's typed config
                         metrics.jsonl     one JSON object per line: {"step", "stage", "wall_time", values...}
                         summary.json      final scalar metrics
                         arrays/<name>.npz checkpoints/<name>.pt records/<name>.json
    <root>/studies/<study_id>/study.json   a papermill study: notebook, profile, parameters, run ids
                              <notebook>.ipynb  the executed notebook

Guarantees:

* every file except ``metrics.jsonl`` is written to a temporary file in the same folder, fsynced and renamed
  over the target (``os.replace``), so a reader sees the old or the new file, never half of one;
* ``metrics.jsonl`` is appended one whole line per call; a reader skips the torn last line of a killed process;
* listing never raises for a bad folder: a run is reported with status ``"corrupt"`` and a one-line reason when
  any file a reader would open fails its schema (``run.json``, ``summary.json``, ``config.json``, the rows of
  ``metrics.jsonl``, ``arrays/*.npz``: types included, e.g. a tag holding a list), leads outside the root, or is a
  file where a folder belongs (or the reverse); a ``"running"`` record whose process is gone is reported as
  ``"stale"``; a finished run that lacks an array its stage always writes keeps its status and says so in
  :attr:`RunRecord.notice`. The content checks of the larger files (metrics rows, npz headers; never array data)
  are cached by file identity, size and mtime, so listing again costs a ``stat`` per file;
* nothing is read outside the root: every reader checks that the file it opens resolves inside it
  (:meth:`RunStore.resolve` refuses ``..``, absolute paths and symlinks out);
* one writer per run: the process that creates or resumes a run holds an exclusive ``flock`` on
  ``<run>/.writer.lock`` until it marks the run finished or failed (or dies: the OS drops the lock), and
  :meth:`RunStore.resume_run` refuses a run another process holds, naming its pid and host.

In a distributed job only rank 0 should create the run and write to it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import json
import math
import numbers
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import numpy as np

from .errors import WorkbenchError

try:  # POSIX advisory locks serialise read-modify-write of run.json / study.json between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: updates are still atomic, only concurrent edits may race
    fcntl = None

__all__ = [
    "SCHEMA_VERSION",
    "ENV_VAR",
    "default_root",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_savez",
    "to_jsonable",
    "check_weights_only",
    "environment_info",
    "RunStore",
    "Run",
    "RunRecord",
    "Study",
    "StudyRecord",
    "slug",
]

SCHEMA_VERSION = 1
ENV_VAR = "WORKBENCH_ARTIFACTS"

RUN_STATUSES = ("running", "finished", "failed")
REPORTED_STATUSES = ("running", "finished", "failed", "stale", "corrupt")
DEFAULT_STALE_AFTER = 900.0  # seconds without a heartbeat before a "running" record is reported as stale
HEARTBEAT_INTERVAL = 30.0  # Run.heartbeat() writes at most this often unless forced
MAX_REASON_CHARS = 500

# Tags that make up the readable part of a generated run id, in this order (seed is written as s<seed>).
ID_TAGS = ("source", "target", "arch", "architecture", "model", "method", "seed")
METRIC_RESERVED = ("step", "stage", "wall_time")
LOCK_FILE = ".writer.lock"  # held (flock) by the one process writing a run; a dot name, so never listed

# The entries of a run folder that readers open: files, and folders with the suffix of their members.
RUN_FILES = ("run.json", "config.json", "summary.json", "metrics.jsonl")
RUN_FOLDERS = {"arrays": ".npz", "checkpoints": ".pt", "records": ".json"}

# Arrays of the stages, as readers (the dashboard, notebooks) rely on them: member -> (dtype kinds, ndim or None,
# required). numpy kinds: b bool, i/u integers, f floats, U/S strings.
_NUMBER, _INTEGER, _TEXT, _BOOL = "iuf", "iu", "US", "b"
ARRAY_SCHEMAS: dict[str, dict[str, tuple[str, int | None, bool]]] = {
    "predictions": {"confidence": (_NUMBER, 1, True), "predicted": (_INTEGER, 1, False),
                    "label": (_INTEGER, 1, False), "correct": (_BOOL, 1, False), "probs": (_NUMBER, 2, False)},
    "reliability": {name: (_NUMBER, 1, True) for name in ("lower", "upper", "count", "confidence", "accuracy")},
    "site_scales": {"site_names": (_TEXT, 1, True), "scale": (_NUMBER, 2, True), "channels": (_INTEGER, 1, False),
                    "multiplier_mean": (_NUMBER, 1, False), "multiplier_std": (_NUMBER, 1, False)},
    "robustness": {"norms": (_TEXT, 1, True), "clean_accuracy": (_NUMBER, None, False), "examples": (_INTEGER, 1, False)},
    "site_stats": {"steps": (_INTEGER, 1, True), "scale_mean": (_NUMBER, None, True),
                   "multiplier_mean": (_NUMBER, None, False), "multiplier_std": (_NUMBER, None, False),
                   "site_names": (_TEXT, 1, False), "task_names": (_TEXT, 1, False)},
}
_TRANSFER_ARRAYS = ("predictions", "reliability", "site_scales", "robustness")
# Which of those schemas apply to a run of each kind (arrays of other kinds are only checked to be plain npz files)
ARRAYS_BY_KIND = {"transfer": _TRANSFER_ARRAYS, "source": _TRANSFER_ARRAYS, "meta_train": ("site_stats",)}
# Arrays a finished run of the kind always has; a finished run without one gets a notice.
FINISHED_ARRAYS = {"transfer": ("predictions", "reliability"), "source": ("predictions", "reliability"),
                   "meta_train": ("site_stats",)}
# summary.json keys that readers treat as numbers (null allowed: a non-finite value is written as null), integers
# and strings; ``robust_<norm>_<eps>`` keys are numbers too.
SUMMARY_NUMBERS = ("test_accuracy", "test_nll", "test_ece", "train_eval_accuracy", "train_eval_nll",
                   "generalization_gap", "mean_scale", "heldout_acc_mean", "chance", "chosen_score", "seconds",
                   "seconds_per_step", "phi_norm")
SUMMARY_INTEGERS = ("steps", "mc_samples", "test_examples", "train_examples", "train_eval_examples", "sites")
SUMMARY_STRINGS = ("method", "arch", "target", "chosen_run_id", "phi_path")

# How each kind is resumed, for the message that sends a run to its own command.
RESUME_COMMANDS = {
    "transfer": ("a transfer run", "workbench transfer --resume"),
    "source": ("a source-training run", "workbench source-train --resume"),
    "meta_train": ("a meta-train run", "workbench meta-train --resume"),
    "meta_select": ("a meta-train selection run", "workbench meta-train --resume"),
}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TAG_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_HOSTNAME = socket.gethostname()


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; the renamed file should get the permissions a plain open() would give it.
_FILE_MODE = 0o666 & ~_read_umask()


# --------------------------------------------------------------------------------------------- roots and time
@functools.lru_cache(maxsize=1)
def _checkout_root() -> Path | None:
    """The repository folder when the package runs from a source checkout (editable install), else None."""
    candidate = Path(__file__).resolve().parent.parent
    try:
        text = (candidate / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    if re.search(r"""^name\s*=\s*["']metaperturb-workbench["']""", text, re.MULTILINE):
        return candidate
    return None


def default_root(flag: str | os.PathLike | None = None) -> Path:
    """The artifacts root: ``flag`` if given, else ``$WORKBENCH_ARTIFACTS``, else ``<checkout>/artifacts``
    when running from a source checkout, else ``./artifacts``. Returned as an absolute path (not created)."""
    if flag is not None and str(flag) != "":
        chosen = Path(flag)
    elif os.environ.get(ENV_VAR):
        chosen = Path(os.environ[ENV_VAR])
    elif _checkout_root() is not None:
        chosen = _checkout_root() / "artifacts"
    else:
        chosen = Path.cwd() / "artifacts"
    return chosen.expanduser().resolve()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(moment: _dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _parse_iso(text: Any) -> _dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


def _human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def _one_line(text: Any, limit: int = MAX_REASON_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` - what a failed run records as its reason."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return _one_line(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def slug(text: str) -> str:
    """``text`` as it may appear inside a run or study id (what generated ids use for their tags)."""
    return _slug(text)


def _inside(root_real: str, path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    try:
        return os.path.commonpath([root_real, target]) == root_real
    except ValueError:  # different drives on Windows
        return False


# ------------------------------------------------------------------------------------------- atomic writing
def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    If ``write`` (or anything before the rename) raises, the temporary file is removed and ``path`` keeps its
    previous content.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    if not isinstance(text, str):
        raise WorkbenchError(f"atomic_write_text needs a str for {path}, got {type(text).__name__}")
    data = text.encode(encoding)
    return _atomic_write(path, lambda handle: handle.write(data))


def to_jsonable(obj: Any, *, nonfinite: str = "null", where: str = "value") -> Any:
    """Convert ``obj`` into plain JSON types.

    numpy scalars and arrays, 0-d or small torch tensors, ``Path`` (-> str), tuples (-> list) and objects with a
    ``to_dict()`` method (stage configs) are converted. NaN and +-inf become ``None`` when ``nonfinite="null"``
    and raise a WorkbenchError naming the offending entry when ``nonfinite="error"``. Anything else raises a
    WorkbenchError naming where it sits (``where`` is the name used for the top-level object).
    """
    if nonfinite not in ("null", "error"):
        raise WorkbenchError(f"nonfinite must be 'null' or 'error', got {nonfinite!r}")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), nonfinite=nonfinite, where=where)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        if math.isfinite(value):
            return value
        if nonfinite == "error":
            raise WorkbenchError(
                f"{where} is {value} (not a finite number) and JSON has no NaN or Infinity; fix the value or drop it"
            )
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, numbers.Integral)):
                raise WorkbenchError(f"{where} has a key {key!r} of type {type(key).__name__}; JSON keys must be strings")
            out[str(key)] = to_jsonable(value, nonfinite=nonfinite, where=f"{where}[{str(key)!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nonfinite=nonfinite, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise WorkbenchError(f"{where} is an object array; store numbers or strings")
        return to_jsonable(obj.tolist(), nonfinite=nonfinite, where=where)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # a torch tensor, without importing torch here
        return to_jsonable(obj.detach().cpu().tolist(), nonfinite=nonfinite, where=where)
    if callable(getattr(obj, "to_dict", None)):
        return to_jsonable(obj.to_dict(), nonfinite=nonfinite, where=where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), nonfinite=nonfinite, where=where)
    raise WorkbenchError(
        f"{where} has type {type(obj).__name__}, which cannot be stored as JSON; convert it to a number, string, "
        "list or dict"
    )


def _dumps(obj: Any, *, nonfinite: str, where: str) -> str:
    clean = to_jsonable(obj, nonfinite=nonfinite, where=where)
    return json.dumps(clean, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, nonfinite: str = "null") -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2, UTF-8) atomically.

    The whole document is serialised before the temporary file is opened, so a value that cannot be stored
    leaves ``path`` untouched. Non-finite floats become ``null`` (``nonfinite="null"``, the default) or raise
    a WorkbenchError (``nonfinite="error"``); see :func:`to_jsonable`.
    """
    return atomic_write_text(path, _dumps(obj, nonfinite=nonfinite, where=Path(path).name))


_WEIGHTS_ONLY_LEAVES = (type(None), bool, int, float, complex, str, bytes)


def check_weights_only(obj: Any, where: str = "state") -> None:
    """Raise a WorkbenchError naming the first entry of ``obj`` that ``torch.load(weights_only=True)`` refuses.

    Allowed: tensors (and parameters), None, bool, int, float, complex, str, bytes, ``torch.Size``,
    ``torch.dtype``, ``torch.device``, and dict / OrderedDict / list / tuple / set of those.
    """
    import torch

    if isinstance(obj, torch.Tensor) or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return
    if type(obj) in _WEIGHTS_ONLY_LEAVES:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            check_weights_only(key, f"{where} key {key!r}")
            check_weights_only(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple, set):
        for i, value in enumerate(obj):
            check_weights_only(value, f"{where}[{i}]")
        return
    hint = "convert it with torch.as_tensor(...)" if isinstance(obj, (np.ndarray, np.generic)) else (
        "store plain tensors, numbers, strings, lists and dicts (e.g. .state_dict(), .tolist(), float(x))"
    )
    raise WorkbenchError(
        f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which loading with "
        f"weights_only=True refuses; {hint}"
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, after checking that it will load with ``weights_only=True``."""
    import torch

    check_weights_only(obj)
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def _as_array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise WorkbenchError(
            f"array {name!r} has dtype object, which cannot be loaded without pickle; store a numeric or string array"
        )
    return array


def atomic_savez(path: str | os.PathLike, /, **arrays: Any) -> Path:
    """Write ``arrays`` (numpy arrays or tensors, any names) to an uncompressed ``.npz`` file atomically.

    The file is exactly what ``np.savez`` writes (one ``<name>.npy`` member per array, no pickles), so
    ``np.load(path, allow_pickle=False)`` reads it. Object arrays are refused.
    """
    if not arrays:
        raise WorkbenchError(f"atomic_savez for {path} got no arrays; pass them as keyword arguments")
    converted = {name: _as_array(name, value) for name, value in arrays.items()}

    def write(handle: IO[bytes]) -> None:
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in converted.items():
                with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    return _atomic_write(path, write)


# ---------------------------------------------------------------------------------------------- environment
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
    package = sys.modules.get(__package__ or "workbench")
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


# ------------------------------------------------------------------------------------------ small helpers
@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on a record folder for read-modify-write of its metadata file."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_holder(fd: int, wait: float = 2.0) -> dict[str, Any]:
    """What the holder of a writer lock wrote into the lock file (pid, host, since); {} if unreadable.

    The holder writes its name just after it took the lock, over what a killed holder may have left: until the
    file names a process that is not gone, it is read again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read_holder(fd)
        pid, host = holder.get("pid"), holder.get("host")
        if pid is not None and _process_state(pid, host, holder.get("pid_start")) != "gone":
            return holder
        if time.monotonic() >= deadline:
            return holder
        time.sleep(0.01)


def _held_message(run_id: str, pid: Any, host: Any, since: Any = None) -> str:
    when = f" since {since}" if isinstance(since, str) else ""
    return (f"run {run_id} is being written by process {pid if pid is not None else '?'} on host {host or '?'}{when}; "
            "a run has one writer at a time: wait for that process to end (or stop it), then resume")


def _acquire_writer_lock(folder: Path, run_id: str) -> int | None:
    """A descriptor holding an exclusive ``flock`` on ``folder/.writer.lock``, with this process's pid and host
    written into the file; WorkbenchError naming the holder when another process (or another handle of this one)
    has it. None where there is no fcntl (the lock is then not enforced). The OS drops the lock when the process
    dies, so a killed writer never leaves a run locked."""
    if fcntl is None:  # pragma: no cover
        return None
    path = folder / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        why = "it is a symlink" if os.path.islink(path) else _one_line(exc.strerror or exc, 120)
        raise WorkbenchError(f"run {run_id}: cannot open its writer lock {LOCK_FILE} ({why})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise WorkbenchError(_held_message(run_id, holder.get("pid"), holder.get("host"), holder.get("since"))) from None
    except OSError as exc:
        os.close(fd)
        raise WorkbenchError(f"run {run_id}: cannot lock {LOCK_FILE} ({_one_line(exc.strerror or exc, 120)})") from None
    data = json.dumps({**_owner_fields(), "since": _iso(_now())}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:  # the lock is what matters; the holder's name is only for the message
        pass
    return fd


def _process_start(pid: int) -> tuple[int | None, str | None]:
    """(start time in clock ticks since boot, state letter) from /proc on Linux; (None, None) elsewhere."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
        fields = data[data.rindex(")") + 2 :].split()  # the command name may contain spaces and parentheses
        return int(fields[19]), fields[0]
    except (OSError, ValueError, IndexError):
        return None, None


def _process_state(pid: Any, host: Any, start: Any) -> str:
    """"alive", "gone" or "unknown" for the process that wrote a record.

    Only a process on this host can be checked. A recorded start time (Linux) tells a reused pid from the
    original process; without it a live pid proves nothing and the heartbeat decides.
    """
    if host != _HOSTNAME or os.name == "nt" or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return "unknown"  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except OSError:  # EPERM: it exists, owned by someone else
        pass
    current, state = _process_start(pid)
    if current is None or not isinstance(start, int):
        return "unknown"
    if current != start or state in ("Z", "X"):
        return "gone"
    return "alive"


def _owner_fields() -> dict[str, Any]:
    """pid, host and process start time of the current process, recorded with every running record."""
    return {"pid": os.getpid(), "host": _HOSTNAME, "pid_start": _process_start(os.getpid())[0]}


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise WorkbenchError(
            f"{what} {value!r} is not valid; use 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return value


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value.endswith(".tmp"):
        raise WorkbenchError(
            f"{what} name {value!r} is not valid; use letters, digits, '-', '_' or '.' (no slashes), "
            "starting with a letter or digit, e.g. 'last' or 'predictions'"
        )
    return value


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise WorkbenchError(
            f"run kind {kind!r} is not valid; use a lowercase word such as 'meta_train', 'transfer' or 'meta_select'"
        )
    return kind


def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, Any]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise WorkbenchError(f"tags must be a dict of name -> value, got {type(tags).__name__}")
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
            raise WorkbenchError(f"tag name {key!r} is not valid; use a Python identifier such as 'target' or 'seed'")
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise WorkbenchError(
                f"tag {key!r} has a {type(value).__name__} value; tags must be strings, numbers, booleans or None"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise WorkbenchError(f"tag {key!r} is {value}; tags must be finite")
        out[key] = value
    return out


def _metric_value(name: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "numel"):  # torch tensor
        if value.numel() != 1:
            raise WorkbenchError(f"metric {name!r} is a tensor with {value.numel()} elements; log a single number")
        value = value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WorkbenchError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _flatten(prefix: str, mapping: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in mapping.items():
        column = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            _flatten(column, value, out)
        else:
            out[column] = value


def _read_json_object(path: Path, label: str) -> tuple[dict | None, str]:
    """(object, "") or (None, one-line reason). Never raises."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, f"{label} is missing"
    except IsADirectoryError:
        return None, f"{label} is a folder, not a file"
    except OSError as exc:
        return None, f"{label} cannot be read ({_one_line(exc.strerror or exc, 120)})"
    if not raw.strip():
        return None, f"{label} is empty (half-written?)"
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return None, f"{label} is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return None, f"{label} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except ValueError as exc:  # e.g. numbers too large
        return None, f"{label} is not valid JSON ({_one_line(exc, 120)})"
    if not isinstance(obj, dict):
        return None, f"{label} holds a JSON {type(obj).__name__}, not an object"
    return obj, ""


def _schema_problem(meta: dict, label: str) -> str:
    version = meta.get("schema_version")
    if version is None:
        return f"{label} has no schema_version (not written by the workbench run store)"
    if isinstance(version, bool) or not isinstance(version, int):
        return f"{label} has a schema_version of {version!r}, not an integer"
    if version > SCHEMA_VERSION:
        return (
            f"{label} has schema version {version}, newer than this workbench reads ({SCHEMA_VERSION}); "
            "upgrade the workbench to read it"
        )
    if version < 1:
        return f"{label} has unsupported schema version {version} (this workbench reads {SCHEMA_VERSION})"
    return ""


# ------------------------------------------------------------------------------------------- content checks
def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, list, string, boolean, null or number."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tag_problem(key: Any, value: Any) -> str:
    if not isinstance(key, str) or not _TAG_KEY_RE.match(key):
        return f"run.json has a tag named {key!r}, which is not an identifier"
    if value is None or isinstance(value, (bool, str)) or _finite_number(value):
        return ""
    return (f"run.json tag {key!r} holds a {_json_type(value)} ({_one_line(json.dumps(value), 60)}); a tag is a "
            "string, a finite number, a boolean or null")


def _clean_tags(tags: Any) -> dict[str, Any]:
    """The well-formed tags of a corrupt record (so filters still find it), without the ones that are not."""
    return {k: v for k, v in tags.items() if not _tag_problem(k, v)} if isinstance(tags, dict) else {}


def _field_problem(meta: dict, label: str, key: str, kind: type, what: str) -> str:
    """Why ``meta[key]`` is neither missing, null nor a ``kind`` ('' when it is one of those; bools are no ints)."""
    value = meta.get(key)
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return ""
    return f"{label} {key} is a {_json_type(value)}, not {what}"


def _summary_problem(summary: dict) -> str:
    """Why ``summary.json`` does not fit what readers expect of its known keys ('' when it does)."""
    for key, value in summary.items():
        if key in SUMMARY_NUMBERS or key.startswith("robust_"):
            if value is not None and not _finite_number(value):
                return f"summary.json {key} is a {_json_type(value)}, not a number"
        elif key in SUMMARY_INTEGERS:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"summary.json {key} is a {_json_type(value)}, not an integer"
        elif key in SUMMARY_STRINGS and not isinstance(value, str):
            return f"summary.json {key} is a {_json_type(value)}, not a string"
    return ""


def _metric_row_problem(row: Any) -> str:
    """Why one parsed line of ``metrics.jsonl`` is not a metrics row ('' when it is): an object with an integer
    ``step``, a ``stage`` name, and numbers (or null, for non-finite values) everywhere else."""
    if not isinstance(row, dict):
        return f"holds a JSON {_json_type(row)}, not an object"
    step, stage = row.get("step"), row.get("stage")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"step is a {_json_type(step)}, not an integer"
    if not isinstance(stage, str) or not stage:
        return f"stage is a {_json_type(stage)}, not a stage name"
    for key, value in row.items():
        if key not in ("step", "stage") and value is not None and not _finite_number(value):
            return f"{key!r} is a {_json_type(value)}, not a number"
    return ""


def _metric_rows(data: bytes, first_line: int = 1) -> tuple[list[dict], list[int], str]:
    """(rows, numbers of unparseable lines, problem) of ``metrics.jsonl`` content.

    A line that is not JSON is a torn write of a killed process (the last one, without a newline, is cut short and
    not counted); a line that is JSON but not a metrics row is a problem: ``"line N: ..."``.
    """
    lines = data.split(b"\n")
    rows: list[dict] = []
    torn: list[int] = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        number = first_line + index
        try:
            obj = json.loads(raw)
        except ValueError:
            if index < len(lines) - 1:
                torn.append(number)
            continue
        problem = _metric_row_problem(obj)
        if problem:
            return rows, torn, f"metrics.jsonl line {number}: {problem}"
        rows.append(obj)
    return rows, torn, ""


_KIND_WORDS = {_NUMBER: "a number type", _INTEGER: "an integer type", _TEXT: "a string type", _BOOL: "bool"}


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a ``.npy`` member, without reading its data (numpy's own header readers;
    version 3, utf-8 field names, has no public one)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    elif version == (3, 0):
        shape, _, dtype = getattr(np.lib, "_format_impl", np.lib.format)._read_array_header(handle, version)
    else:
        raise ValueError(f"unknown .npy format version {version}")
    return shape, dtype


def _npz_problem(path: Path, label: str, schema: Mapping[str, tuple[str, int | None, bool]] | None) -> str:
    """Why ``path`` is not an npz file of plain arrays fitting ``schema`` ('' when it is). Reads the zip directory
    and each member's ``.npy`` header, never the array data."""
    members: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    return f"{label} holds {info.filename!r}, which is not an array (not written by the workbench)"
                with archive.open(info) as handle:
                    members[info.filename[:-4]] = _npy_header(handle)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            RuntimeError, SyntaxError) as exc:
        return f"{label} is not a readable npz file ({_one_line(exc, 120)})"
    if not members:
        return f"{label} holds no arrays"
    for name, (_, dtype) in members.items():
        if dtype.hasobject:
            return f"{label} array {name!r} holds Python objects (loading it would need pickle); not read"
    for name, (kinds, ndim, required) in (schema or {}).items():
        if name not in members:
            if required:
                return f"{label} lacks the array {name!r}"
            continue
        shape, dtype = members[name]
        if dtype.kind not in kinds:
            return f"{label} array {name!r} has dtype {dtype}, not {_KIND_WORDS[kinds]}"
        if ndim is not None and len(shape) != ndim:
            return f"{label} array {name!r} has shape {tuple(shape)}, not {ndim}-D"
    return ""


def _array_file_problem(path: Path, kind: str | None, name: str) -> str:
    """:func:`_npz_problem` of ``arrays/<name>.npz`` of a run of ``kind`` (its schema, if the kind has one),
    remembered until the file changes."""
    schema = ARRAY_SCHEMAS.get(name) if name in ARRAYS_BY_KIND.get(kind or "", ()) else None
    label = f"arrays/{name}.npz"
    return _cached_problem(path, f"npz:{name if schema else ''}", lambda p: _npz_problem(p, label, schema))


def _folder_problem(folder: Path, root_real: str) -> str:
    """Why the entries of a run folder cannot be opened safely ('' when they can): an entry (or an entry of
    ``arrays/``, ``checkpoints/``, ``records/``) that is a symlink leading outside the root, a folder where a file
    belongs or the reverse, or no ``config.json``."""
    try:
        entries = {entry.name: entry for entry in os.scandir(folder) if not entry.name.startswith(".")}
    except OSError as exc:
        return f"the run folder cannot be read ({_one_line(exc.strerror or exc, 120)})"
    for name, entry in sorted(entries.items()):
        if entry.is_symlink() and not _inside(root_real, entry.path):
            return f"{name} is a symlink leading outside the artifacts root; not read"
    for name in RUN_FILES:
        entry = entries.get(name)
        if entry is not None and not entry.is_file():
            return f"{name} is a folder, not a file" if entry.is_dir() else f"{name} is not a regular file"
    if "config.json" not in entries:
        return "config.json is missing"
    for name, suffix in RUN_FOLDERS.items():
        entry = entries.get(name)
        if entry is None:
            continue
        if not entry.is_dir():
            return f"{name} is a file, not a folder"
        try:
            members = sorted(os.scandir(entry.path), key=lambda e: e.name)
        except OSError as exc:
            return f"{name}/ cannot be read ({_one_line(exc.strerror or exc, 120)})"
        for member in members:
            if member.name.startswith("."):
                continue
            if member.is_symlink() and not _inside(root_real, member.path):
                return f"{name}/{member.name} is a symlink leading outside the artifacts root; not read"
            if member.name.endswith(suffix) and not member.is_file():
                return f"{name}/{member.name} is a folder, not a file"
    return ""


# Content checks of the larger files, by path: (signature, problem). A file is checked again only when its identity,
# size or mtime changed; metrics.jsonl, which only grows while a run writes it, is checked from where it was left.
_CHECKED: "OrderedDict[tuple[str, str], tuple[tuple, str]]" = OrderedDict()
_CHECKED_MAX = 100_000
_CHECKED_LOCK = threading.Lock()


def _signature(path: Path) -> tuple | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _remember(key: tuple[str, str], signature: tuple | None, value: Any) -> None:
    with _CHECKED_LOCK:
        _CHECKED[key] = (signature, value)
        _CHECKED.move_to_end(key)
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)


def _cached_problem(path: Path, what: str, check: Callable[[Path], str]) -> str:
    key, signature = (os.fspath(path), what), _signature(path)
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
    if hit is not None and signature is not None and hit[0] == signature:
        return hit[1]
    problem = check(path)
    _remember(key, signature, problem)
    return problem


def _metrics_file_problem(path: Path) -> str:
    """The first wrong-typed row of ``metrics.jsonl`` as a problem ('' when every row fits); only the complete
    lines appended since the last check are read when the file grew."""
    key, signature = (os.fspath(path), "metrics"), _signature(path)
    if signature is None:
        return ""
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1][2]
    offset, line = 0, 1
    if hit is not None and hit[0] is not None and hit[0][:2] == signature[:2] and not hit[1][2] \
            and signature[2] >= hit[1][0]:
        offset, line = hit[1][0], hit[1][1]  # the same file, grown: check only what was appended
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError as exc:
        return f"metrics.jsonl cannot be read ({_one_line(exc.strerror or exc, 120)})"
    end = data.rfind(b"\n") + 1  # a last line without its newline may still be being written
    _, _, problem = _metric_rows(data[:end], line)
    _remember(key, signature, (offset + end, line + data[:end].count(b"\n"), problem))
    return problem


# ----------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True, kw_only=True)
class _FolderRecord:
    """What run and study listings share: when the folder was made and finished, and the liveness of its process
    (``stored_status`` is the status on disk; ``status`` may say stale where that is running)."""

    created: str | None = None
    finished: str | None = None
    stored_status: str | None = None
    heartbeat: str | None = None
    pid: int | None = None
    host: str | None = None
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"

    @staticmethod
    def fields_from(meta: dict) -> dict[str, Any]:
        """The shared fields from a folder's run.json / study.json."""
        environment = meta.get("environment")
        return dict(created=meta["created"], finished=meta.get("finished"), stored_status=meta["status"],
                    heartbeat=meta.get("heartbeat"), pid=meta.get("pid"), host=meta.get("host"),
                    environment=environment if isinstance(environment, dict) else {})


@dataclasses.dataclass(frozen=True)
class RunRecord(_FolderRecord):
    """What a listing knows about one run folder: its small JSON files, and the checks of the others.

    ``status`` is one of running, finished, failed, stale (stored as running but its process is gone or silent)
    and corrupt (see ``reason``). Fields that could not be read are None or empty. ``notice`` says what a readable
    run lacks (a finished run without an array its stage always writes), '' when nothing.
    """

    run_id: str
    path: Path
    status: str
    reason: str = ""
    kind: str | None = None
    tags: dict[str, Any] = dataclasses.field(default_factory=dict)
    study_id: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    notice: str = ""

    def row(self, root: Path) -> dict[str, Any]:
        """One flat row for :meth:`RunStore.runs_table`."""
        row = {
            "run_id": self.run_id,
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "notice": self.notice,
            "created": self.created,
            "finished": self.finished,
            "heartbeat": self.heartbeat,
            "study_id": self.study_id,
            "path": _relative(self.path, root),
        }
        _flatten("tags", self.tags, row)
        _flatten("summary", self.summary, row)
        return row


@dataclasses.dataclass(frozen=True)
class StudyRecord(_FolderRecord):
    """What a listing knows about one study folder (status running, finished, failed, stale or corrupt)."""

    study_id: str
    path: Path
    status: str
    reason: str = ""
    notebook: str | None = None
    profile: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_ids: tuple[str, ...] = ()
    executed_notebook: str | None = None
    executed_notebook_exists: bool = False
    git_revision: str | None = None
    git_dirty: bool | None = None

    def row(self, root: Path) -> dict[str, Any]:
        row = {
            "study_id": self.study_id,
            "status": self.status,
            "reason": self.reason,
            "notebook": self.notebook,
            "profile": self.profile,
            "created": self.created,
            "finished": self.finished,
            "runs": len(self.run_ids),
            "executed_notebook": self.executed_notebook if self.executed_notebook_exists else None,
            "git_revision": self.git_revision,
            "git_dirty": self.git_dirty,
            "path": _relative(self.path, root),
        }
        _flatten("parameters", self.parameters, row)
        return row


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- Run
class Run:
    """One run folder, opened for writing (by the process doing the work) or reading.

    Create with :meth:`RunStore.create_run` (usable as ``with store.create_run(...) as run:``) or open with
    :meth:`RunStore.open_run`.
    """

    heartbeat_interval = HEARTBEAT_INTERVAL

    def __init__(self, store: "RunStore", path: Path, meta: dict, config: dict):
        self.store = store
        self.path = path
        self._meta = meta
        self.config: dict[str, Any] = config
        self._last_heartbeat = time.monotonic()
        self._metrics_tail_checked = False
        self._lock_fd: int | None = None

    # identity ------------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self._meta["run_id"]

    @property
    def kind(self) -> str:
        return self._meta["kind"]

    @property
    def tags(self) -> dict[str, Any]:
        return dict(self._meta.get("tags") or {})

    @property
    def study_id(self) -> str | None:
        return self._meta.get("study_id")

    @property
    def created(self) -> str:
        return self._meta["created"]

    @property
    def environment(self) -> dict[str, Any]:
        return dict(self._meta.get("environment") or {})

    @property
    def status(self) -> str:
        """The stored status, read from disk now: running, finished or failed."""
        return self._read_meta()["status"]

    @property
    def reason(self) -> str | None:
        return self._read_meta().get("reason")

    def record(self) -> RunRecord:
        """A fresh :class:`RunRecord` (with the derived running/stale status)."""
        return self.store.run_record(self.run_id)

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, kind={self.kind!r}, path='{self.path}')"

    # one writer --------------------------------------------------------------------------------------------
    @property
    def holds_lock(self) -> bool:
        """Whether this handle holds the run's writer lock (:meth:`acquire_lock`)."""
        return self._lock_fd is not None

    def acquire_lock(self) -> None:
        """Become the run's one writer: take the exclusive lock on ``.writer.lock`` (WorkbenchError naming the pid
        and host of the process that holds it). :meth:`RunStore.create_run` and :meth:`RunStore.resume_run` take
        it; :meth:`mark_finished`, :meth:`mark_failed`, :meth:`release_lock` and the death of the process drop it."""
        if self._lock_fd is None:
            self._lock_fd = _acquire_writer_lock(self.path, self.run_id)

    def release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder's name left behind for the next writer's rivals to read
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release_lock()

    # path safety -----------------------------------------------------------------------------------------
    def _checked(self, relative: str) -> Path:
        """``self.path / relative`` after checking that it resolves inside the artifacts root."""
        path = self.path / relative
        if not _inside(os.path.realpath(self.store.root), path):
            raise WorkbenchError(
                f"run {self.path.name} is corrupt: {relative} leads outside the artifacts root (a symlink); not read"
            )
        return path

    # metadata --------------------------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        meta, reason = _read_json_object(self._checked("run.json"), "run.json")
        if meta is None:
            raise WorkbenchError(f"run {self.path.name} is corrupt: {reason}")
        return meta

    def _update_meta(self, **changes: Any) -> dict:
        with _folder_lock(self.path):
            meta = self._read_meta()
            meta.update(changes)
            atomic_write_json(self.path / "run.json", meta, nonfinite="error")
        self._meta = meta
        return meta

    def heartbeat(self, force: bool = False) -> bool:
        """Record that the process is alive. Writes at most once every ``heartbeat_interval`` seconds (30 s)
        unless ``force``; :meth:`log_metrics` calls it, so a loop that logs needs nothing else. Only a running
        run gets heartbeats. Returns whether it wrote."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_interval:
            return False
        self._last_heartbeat = now
        with _folder_lock(self.path):
            meta = self._read_meta()
            if meta.get("status") != "running":
                return False
            meta["heartbeat"] = _iso(_now())
            atomic_write_json(self.path / "run.json", meta, nonfinite="error")
        self._meta = meta
        return True

    def mark_running(self) -> None:
        """Set the run back to running in this process (resuming a failed or stale run from its checkpoint); takes
        the writer lock first (refused while another process holds it)."""
        self.acquire_lock()
        now = _iso(_now())
        self._update_meta(status="running", reason=None, finished=None, heartbeat=now, **_owner_fields())
        self._last_heartbeat = time.monotonic()

    def mark_finished(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write ``summary`` (if given), set the status to finished and release the writer lock."""
        if summary is not None:
            self.write_summary(summary)
        now = _iso(_now())
        self._update_meta(status="finished", reason=None, finished=now, heartbeat=now)
        self.release_lock()

    def mark_failed(self, reason: str) -> None:
        """Set the status to failed with a one-line ``reason`` (whitespace collapsed, at most 500 characters) and
        release the writer lock."""
        line = _one_line(reason) if reason is not None else ""
        if not line:
            raise WorkbenchError("mark_failed needs a reason, e.g. the exception's message")
        now = _iso(_now())
        self._update_meta(status="failed", reason=line, finished=now, heartbeat=now)
        self.release_lock()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            status = self.status
        except WorkbenchError:
            self.release_lock()
            return False
        if status == "running":
            if exc is None:
                self.mark_finished()
            else:
                self.mark_failed(_exception_line(exc))
        self.release_lock()
        return False  # never swallow the exception

    # metrics ---------------------------------------------------------------------------------------------
    def log_metrics(self, step: int, stage: str, **values: Any) -> None:
        """Append ``{"step", "stage", "wall_time", **values}`` as one line of ``metrics.jsonl``.

        ``values`` are numbers (Python, numpy, or one-element tensors); NaN and +-inf are written as null so a
        diverged loss is still logged. Anything else (strings, lists, multi-element tensors) is refused.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise WorkbenchError(f"metrics step must be an integer, got {type(step).__name__} {step!r}")
        if not isinstance(stage, str) or not stage:
            raise WorkbenchError(f"metrics stage must be a non-empty string such as 'train' or 'test', got {stage!r}")
        line: dict[str, Any] = {"step": int(step), "stage": stage, "wall_time": round(time.time(), 3)}
        for name, value in values.items():
            if name in METRIC_RESERVED:
                raise WorkbenchError(f"metric name {name!r} is reserved ({', '.join(METRIC_RESERVED)}); rename it")
            line[name] = _metric_value(name, value)
        text = json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n"
        path = self.path / "metrics.jsonl"
        if not self._metrics_tail_checked:
            self._terminate_torn_line(path)
            self._metrics_tail_checked = True
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)  # one write per line: a killed process leaves at most the last line torn
        self.heartbeat()

    @staticmethod
    def _terminate_torn_line(path: Path) -> None:
        """A process killed mid-line leaves a fragment without newline; end it so new lines stay parseable."""
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() == 0:
                    return
                handle.seek(-1, os.SEEK_END)
                last = handle.read(1)
        except FileNotFoundError:
            return
        if last != b"\n":
            with open(path, "ab") as handle:
                handle.write(b"\n")

    def truncate_metrics(self, after_step: int, drop_stages: tuple[str, ...] = ()) -> None:
        """Drop metric lines of steps after ``after_step`` (written by a process that stopped past its last
        checkpoint), and every line of ``drop_stages`` (those of a final phase that is run again), atomically, so a
        resumed run does not log those steps twice."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        rows = [row for row in self.read_metrics()
                if int(row.get("step", 0)) <= after_step and row.get("stage") not in drop_stages]
        atomic_write_text(path, "".join(json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n" for row in rows))

    def read_metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        """All metric lines (of one ``stage`` if given), in file order.

        A torn last line (a process killed while writing) is skipped silently; an unreadable line elsewhere (a
        torn line from an earlier, resumed process) is skipped with a RuntimeWarning. A line that is JSON but not a
        metrics row (an integer ``step``, a ``stage`` name, numbers or null) makes the run corrupt: WorkbenchError.
        """
        try:
            data = self._checked("metrics.jsonl").read_bytes()
        except FileNotFoundError:
            return []
        except IsADirectoryError:
            raise WorkbenchError(f"run {self.run_id} is corrupt: metrics.jsonl is a folder, not a file") from None
        rows, torn, problem = _metric_rows(data)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        if torn:
            warnings.warn(
                f"{self.path / 'metrics.jsonl'}: skipped {len(torn)} unreadable line(s) (first: {torn[:5]}); "
                "they are torn writes of a killed process",
                RuntimeWarning,
                stacklevel=2,
            )
        return rows if stage is None else [row for row in rows if row.get("stage") == stage]

    def metrics_table(self, stage: str | None = None):
        """:meth:`read_metrics` as a pandas DataFrame (columns step, stage, wall_time and the value names)."""
        import pandas as pd

        rows = self.read_metrics(stage)
        return pd.DataFrame(rows, columns=None if rows else list(METRIC_RESERVED))

    # summary and records ---------------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Replace ``summary.json`` with ``summary`` (small, mostly scalar final metrics; NaN/inf -> null)."""
        if not isinstance(summary, Mapping):
            raise WorkbenchError(f"summary must be a dict of metric name -> value, got {type(summary).__name__}")
        atomic_write_text(self._checked("summary.json"), _dumps(summary, nonfinite="null", where="summary"))

    @property
    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json``, or {} before one was written."""
        path = self._checked("summary.json")
        if not path.exists():
            return {}
        obj, reason = _read_json_object(path, "summary.json")
        if obj is None:
            raise WorkbenchError(f"run {self.run_id}: {reason}")
        problem = _summary_problem(obj)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        return obj

    def save_json(self, name: str, obj: Any) -> Path:
        """Store a small extra record as ``records/<name>.json`` (e.g. the task split, a selection reason)."""
        _check_name(name, "record")
        path = self._checked(f"records/{name}.json")
        return atomic_write_text(path, _dumps(obj, nonfinite="null", where=name))

    def load_json(self, name: str) -> Any:
        _check_name(name, "record")
        path = self._checked(f"records/{name}.json")
        try:
            return json.loads(path.read_bytes())
        except IsADirectoryError:
            raise WorkbenchError(f"run {self.run_id} is corrupt: records/{name}.json is a folder, not a file") from None
        except FileNotFoundError:
            raise WorkbenchError(
                f"run {self.run_id} has no record {name!r}; it has: {', '.join(self.list_json()) or 'none'}"
            ) from None
        except ValueError as exc:
            raise WorkbenchError(f"run {self.run_id}: records/{name}.json is not valid JSON ({_one_line(exc, 120)})") from None

    def list_json(self) -> list[str]:
        return self._list("records", ".json")

    # arrays and checkpoints ------------------------------------------------------------------------------
    def _list(self, folder: str, suffix: str) -> list[str]:
        directory = self._checked(folder)
        if not directory.is_dir():
            return []
        return sorted(p.name[: -len(suffix)] for p in directory.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))

    def save_arrays(self, name: str, /, **arrays: Any) -> Path:
        """Store named arrays (numpy or tensors, moved to the CPU; bfloat16 becomes float32) as
        ``arrays/<name>.npz`` atomically, replacing an earlier file of that name; returns the path."""
        _check_name(name, "array file")
        return atomic_savez(self._checked(f"arrays/{name}.npz"), **arrays)

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        """The arrays saved under ``name`` (loaded with ``allow_pickle=False``), after checking the file's members
        against the schema of the run's kind (:data:`ARRAY_SCHEMAS`); WorkbenchError if they do not fit."""
        _check_name(name, "array file")
        path = self._checked(f"arrays/{name}.npz")
        if not path.is_file():
            raise WorkbenchError(
                f"run {self.run_id} has no arrays {name!r}; it has: {', '.join(self.list_arrays()) or 'none'}"
            )
        problem = _array_file_problem(path, self.kind, name)
        if problem:
            raise WorkbenchError(f"run {self.run_id} is corrupt: {problem}")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise WorkbenchError(f"run {self.run_id}: arrays/{name}.npz cannot be read ({_one_line(exc, 160)})") from None

    def list_arrays(self) -> list[str]:
        return self._list("arrays", ".npz")

    def has_arrays(self, name: str) -> bool:
        return self._checked(f"arrays/{_check_name(name, 'array file')}.npz").is_file()

    def save_checkpoint(self, state: Mapping[str, Any], name: str = "last") -> Path:
        """``torch.save`` ``state`` to ``checkpoints/<name>.pt`` atomically. The state may hold only what
        ``weights_only=True`` loading accepts (tensors, numbers, strings, lists, dicts ...); anything else is
        refused here, naming the entry, rather than at load time."""
        _check_name(name, "checkpoint")
        if not isinstance(state, Mapping):
            raise WorkbenchError(f"checkpoint state must be a dict, got {type(state).__name__}")
        return atomic_torch_save(state, self._checked(f"checkpoints/{name}.pt"))

    def load_checkpoint(self, name: str = "last", map_location: Any = "cpu") -> dict[str, Any]:
        """Load ``checkpoints/<name>.pt`` with ``weights_only=True`` onto ``map_location``."""
        import torch

        _check_name(name, "checkpoint")
        path = self._checked(f"checkpoints/{name}.pt")
        if not path.is_file():
            raise WorkbenchError(
                f"run {self.run_id} has no checkpoint {name!r}; it has: {', '.join(self.list_checkpoints()) or 'none'}"
            )
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # pickle errors, truncated zip, refused globals: one line, no deep traceback
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise WorkbenchError(
                f"run {self.run_id}: checkpoint {name!r} cannot be loaded with weights_only=True ({_one_line(first, 200)})"
            ) from None

    def has_checkpoint(self, name: str = "last") -> bool:
        return self._checked(f"checkpoints/{_check_name(name, 'checkpoint')}.pt").is_file()

    def list_checkpoints(self) -> list[str]:
        return self._list("checkpoints", ".pt")


# -------------------------------------------------------------------------------------------------- Study
class Study:
    """One papermill study folder. Create with :meth:`RunStore.create_study`, open with :meth:`RunStore.open_study`.

    Every update re-reads ``study.json`` under a lock, so the study runner and the notebook kernel it executes
    can both add runs.
    """

    def __init__(self, store: "RunStore", path: Path, meta: dict):
        self.store = store
        self.path = path
        self._meta = meta

    @property
    def study_id(self) -> str:
        return self._meta["study_id"]

    @property
    def notebook(self) -> str:
        return self._meta["notebook"]

    @property
    def profile(self) -> str:
        return self._meta["profile"]

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self._meta.get("parameters") or {})

    @property
    def executed_notebook_path(self) -> Path:
        """Where the executed notebook is (to be) saved: ``studies/<study_id>/<notebook file name>``."""
        return self.path / self._meta["executed_notebook"]

    @property
    def run_ids(self) -> list[str]:
        return list(self._read_meta().get("run_ids") or [])

    @property
    def status(self) -> str:
        return self._read_meta()["status"]

    def record(self) -> StudyRecord:
        return self.store.study_record(self.study_id)

    def runs(self) -> list[RunRecord]:
        """Records of the study's runs, in the order they were added."""
        return [self.store.run_record(run_id) for run_id in self.run_ids]

    def __repr__(self) -> str:
        return f"Study({self.study_id!r}, notebook={self.notebook!r}, profile={self.profile!r})"

    def _read_meta(self) -> dict:
        meta, reason = _read_json_object(self.path / "study.json", "study.json")
        if meta is None:
            raise WorkbenchError(f"study {self.path.name} is corrupt: {reason}")
        return meta

    def _update(self, change: Callable[[dict], None]) -> None:
        with _folder_lock(self.path):
            meta = self._read_meta()
            change(meta)
            atomic_write_json(self.path / "study.json", meta, nonfinite="error")
        self._meta = meta

    def add_run(self, run_id: str) -> None:
        """Link an existing run to this study (idempotent)."""
        _check_id(run_id, "run id")
        if not (self.store.runs_dir / run_id / "run.json").is_file():
            raise WorkbenchError(f"cannot add run {run_id!r} to study {self.study_id}: no such run under {self.store.runs_dir}")

        def change(meta: dict) -> None:
            ids = list(meta.get("run_ids") or [])
            if run_id not in ids:
                ids.append(run_id)
            meta["run_ids"] = ids
            if meta.get("status") == "running":
                meta["heartbeat"] = _iso(_now())

        self._update(change)

    def heartbeat(self) -> None:
        """Record that the process driving the study is alive."""

        def change(meta: dict) -> None:
            if meta.get("status") == "running":
                meta["heartbeat"] = _iso(_now())

        self._update(change)

    def reopen(self) -> None:
        """Set a failed, interrupted or stale study back to running in this process, to run its notebook again
        (``workbench study resume``). Refused when it finished, or while the process that runs it is alive."""
        record = self.record()
        if record.status == "finished":
            raise WorkbenchError(f"study {self.study_id} is finished; there is nothing to resume (a new study runs "
                                 f"the notebook again: `workbench study run {Path(self.notebook).stem} --profile "
                                 f"{self.profile}`)")
        if record.status == "running":
            meta = self._read_meta()
            raise WorkbenchError(f"study {self.study_id} is running in process {meta.get('pid')} on host "
                                 f"{meta.get('host')}; wait for it to end (or stop it), then resume")
        if record.status == "corrupt":
            raise WorkbenchError(f"study {self.study_id} is corrupt: {record.reason}")
        now = _iso(_now())
        self._update(lambda meta: meta.update(status="running", reason=None, finished=None, heartbeat=now,
                                              **_owner_fields()))

    def mark_finished(self) -> None:
        now = _iso(_now())
        self._update(lambda meta: meta.update(status="finished", reason=None, finished=now, heartbeat=now))

    def mark_failed(self, reason: str) -> None:
        line = _one_line(reason) if reason is not None else ""
        if not line:
            raise WorkbenchError("mark_failed needs a reason, e.g. the failing cell's error")
        now = _iso(_now())
        self._update(lambda meta: meta.update(status="failed", reason=line, finished=now, heartbeat=now))


# ----------------------------------------------------------------------------------------------- RunStore
class RunStore:
    """The artifacts root: creates, opens and lists runs and studies.

    ``RunStore()`` uses :func:`default_root`. Nothing is created until something is written, and nothing is
    cached: every listing reads the small JSON files again (callers cache with their own TTL).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, stale_after: float = DEFAULT_STALE_AFTER):
        self.root = default_root(root)
        self.stale_after = float(stale_after)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def studies_dir(self) -> Path:
        return self.root / "studies"

    def __repr__(self) -> str:
        return f"RunStore('{self.root}')"

    # path safety -----------------------------------------------------------------------------------------
    def resolve(self, relative: str | os.PathLike) -> Path:
        """The absolute path of ``relative`` inside the root. Refuses absolute paths, any ``..`` component and
        anything that resolves outside the root through a symlink (WorkbenchError)."""
        if not isinstance(relative, (str, os.PathLike)):
            raise WorkbenchError(f"artifact path must be a string, got {type(relative).__name__}")
        text = os.fspath(relative)
        if not isinstance(text, str) or "\x00" in text:
            raise WorkbenchError(f"artifact path {relative!r} is not a valid path")
        candidate = Path(text)
        if candidate.is_absolute() or candidate.anchor or text.startswith(("/", "\\")):
            raise WorkbenchError(f"artifact path {text!r} is absolute; give a path relative to the artifacts root")
        if ".." in candidate.parts or ".." in text.replace("\\", "/").split("/"):
            raise WorkbenchError(f"artifact path {text!r} contains '..'; give a path inside the artifacts root")
        root_real = os.path.realpath(self.root)
        target = os.path.realpath(os.path.join(root_real, text))
        if not _inside(root_real, target):
            raise WorkbenchError(f"artifact path {text!r} leads outside the artifacts root through a symlink; refused")
        return Path(target)

    def _checked_folder(self, folder: Path, what: str) -> None:
        if folder.exists() and not _inside(os.path.realpath(self.root), folder):
            raise WorkbenchError(f"{folder} leads outside the artifacts root {self.root} (a symlink?); refusing to use it")

    def _root_problem(self) -> str:
        """Why the root cannot hold a store ('' when it can, or does not exist yet)."""
        if os.path.lexists(self.root) and not self.root.is_dir():
            return (f"the artifacts root {self.root} is a file, not a folder; pass --artifacts DIR (or set "
                    f"${ENV_VAR}) naming a folder")
        return ""

    def _make_folder(self, folder: Path, what: str) -> None:
        """Create ``folder`` (the ``runs`` or ``studies`` folder) if needed; one-line WorkbenchError when the root
        or the folder is a file, or it cannot be made."""
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        if os.path.lexists(folder) and not folder.is_dir():
            raise WorkbenchError(f"{folder} is a file, not a folder, so this artifacts root cannot hold {what}; move "
                                 "the file away or pass --artifacts DIR naming another root")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkbenchError(f"cannot create {folder} ({_one_line(exc.strerror or exc, 120)}); pass --artifacts "
                                 "DIR naming a folder you can write") from None
        self._checked_folder(folder, what)

    # runs ------------------------------------------------------------------------------------------------
    def create_run(
        self,
        kind: str,
        config: Mapping[str, Any] | Any,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        study_id: str | None = None,
    ) -> Run:
        """Create ``runs/<run_id>/`` with ``config.json`` and ``run.json`` (status running) and return the Run.

        Without ``run_id`` a readable unique one is generated: ``<UTC yyyymmdd-hhmmss>-<kind>-<key tags>-<4 hex>``,
        the key tags being source, target, arch/architecture/model, method and seed (``s<seed>``) when present.
        A given ``run_id`` that already exists is refused. ``config`` is a dict or a stage config (``to_dict()``);
        it must be JSON-serialisable with finite numbers. ``study_id`` links the run to an existing study (the
        run is added to the study's run list).
        """
        kind = _check_kind(kind)
        tags = _check_tags(tags)
        if isinstance(config, Mapping) or callable(getattr(config, "to_dict", None)):
            config_json = to_jsonable(config, nonfinite="error", where="config")
        else:
            raise WorkbenchError(f"config must be a dict or a stage config, got {type(config).__name__}")
        study = self.open_study(study_id) if study_id is not None else None
        if run_id is not None:
            _check_id(run_id, "run id")
        self._make_folder(self.runs_dir, "runs")
        created = _now()
        if run_id is not None:
            path = self.runs_dir / run_id
            try:
                path.mkdir()
            except FileExistsError:
                raise WorkbenchError(
                    f"run id {run_id!r} already exists under {self.runs_dir}; choose another run_id or omit it to get "
                    "a fresh one"
                ) from None
        else:
            for _ in range(100):
                run_id = _make_run_id(kind, tags, created)
                path = self.runs_dir / run_id
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - 65536 random suffixes per second
                raise WorkbenchError(f"could not find a free run id under {self.runs_dir}; pass run_id explicitly")
        stamp = _iso(created)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "kind": kind,
            "created": stamp,
            "status": "running",
            "reason": None,
            "finished": None,
            "tags": tags,
            "study_id": study_id,
            **_owner_fields(),
            "heartbeat": stamp,
            "environment": environment_info(),
        }
        # run.json last: a folder without it is a creation that did not complete, and is listed as such.
        run = Run(self, path, meta, config_json)
        try:
            run.acquire_lock()  # this process is the run's one writer until it marks it finished or failed
            atomic_write_json(path / "config.json", config_json, nonfinite="error")
            atomic_write_json(path / "run.json", meta, nonfinite="error")
        except BaseException:
            run.release_lock()
            shutil.rmtree(path, ignore_errors=True)  # the folder was made by this call and holds nothing else
            raise
        if study is not None:
            study.add_run(run_id)
        return run

    def open_run(self, run_id: str) -> Run:
        """Open an existing run (WorkbenchError if it does not exist or is corrupt)."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not os.path.lexists(folder):
            raise WorkbenchError(f"no run {run_id!r} under {self.runs_dir}; RunStore.list_runs() shows the existing ones")
        record, meta = self._scan_run(folder, run_id, os.path.realpath(self.root), time.time(), with_summary=True)
        if record.status == "corrupt":
            raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
        config, reason = _read_json_object(folder / "config.json", "config.json")
        if config is None:
            raise WorkbenchError(f"run {run_id} is corrupt: {reason}")
        return Run(self, folder, meta, config)

    def resume_run(self, run_id: str, kinds: tuple[str, ...] | str, what: str | None = None) -> Run:
        """Open ``run_id`` to write it again, as its one writer: its kind must be among ``kinds`` (else
        WorkbenchError naming the command that resumes it; ``what`` names the wanted kind, e.g. "a transfer run"),
        and no other process may hold its writer lock, nor be alive as its recorded writer (else WorkbenchError
        naming that process's pid and host). The returned Run holds the lock; marking it finished or failed, or
        :meth:`Run.release_lock`, releases it."""
        self.check_resume_kind(run_id, kinds, what)
        run = self.open_run(run_id)
        run.acquire_lock()
        try:
            meta = run._read_meta()
            pid, host = meta.get("pid"), meta.get("host")
            if meta.get("status") == "running" and not (pid == os.getpid() and host == _HOSTNAME) \
                    and _process_state(pid, host, meta.get("pid_start")) == "alive":
                raise WorkbenchError(_held_message(run_id, pid, host))  # a writer from before the lock existed
        except BaseException:
            run.release_lock()
            raise
        return run

    def discard_run(self, run_id: str) -> None:
        """Delete an unfinished run that no live process writes: a study's grid cell cut short before its first
        checkpoint, made again under the same id. Refused for a finished run and while another process holds it."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not _inside(os.path.realpath(self.root), folder) or os.path.islink(folder) or not folder.is_dir():
            raise WorkbenchError(f"cannot discard run {run_id!r}: no such run folder under {self.runs_dir}")
        record = self.run_record(run_id)
        if record.status == "finished":
            raise WorkbenchError(f"run {run_id} is finished; it is kept, not discarded")
        fd = _acquire_writer_lock(folder, run_id)  # refused, naming the holder, while a writer has it
        try:
            meta, _ = _read_json_object(folder / "run.json", "run.json")
            if meta and meta.get("status") == "running" and _process_state(
                    meta.get("pid"), meta.get("host"), meta.get("pid_start")) == "alive" \
                    and meta.get("pid") != os.getpid():
                raise WorkbenchError(_held_message(run_id, meta.get("pid"), meta.get("host")))
            shutil.rmtree(folder)
        finally:
            if fd is not None:
                os.close(fd)

    def check_resume_kind(self, run_id: str, kinds: tuple[str, ...] | str, what: str | None = None) -> RunRecord:
        """The record of ``run_id`` when it can be resumed as one of ``kinds``; WorkbenchError otherwise (no such
        run, corrupt, or another kind: "RUN is a transfer run, not a meta-train run; resume it with `workbench
        transfer --resume RUN`")."""
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        _check_id(run_id, "run id")
        if not os.path.lexists(self.runs_dir / run_id):
            raise WorkbenchError(f"no run {run_id!r} under {self.runs_dir}; RunStore.list_runs() shows the existing ones")
        record = self.run_record(run_id)
        if record.status == "corrupt":
            raise WorkbenchError(f"run {run_id} is corrupt: {record.reason}")
        if record.kind not in kinds:
            wanted = what or RESUME_COMMANDS.get(kinds[0], (f"a {kinds[0]} run", ""))[0]
            found, command = RESUME_COMMANDS.get(record.kind, (f"a {record.kind} run", ""))
            advice = f"resume it with `{command} {run_id}`" if command else "it cannot be resumed"
            raise WorkbenchError(f"{run_id} is {found}, not {wanted}; {advice}")
        return record

    def run_record(self, run_id: str) -> RunRecord:
        """The record of one run; a missing folder is reported as corrupt, never raised."""
        _check_id(run_id, "run id")
        folder = self.runs_dir / run_id
        if not os.path.lexists(folder):
            return RunRecord(run_id, folder, "corrupt", "no such run folder")
        return self._scan_run(folder, run_id, os.path.realpath(self.root), time.time(), with_summary=True)[0]

    def list_runs(self, kind: str | None = None, *, study_id: str | None = None, **tag_filters: Any) -> list[RunRecord]:
        """Records of all runs, oldest first (corrupt ones included when no filter is given).

        ``kind``, ``study_id`` and ``tag=value`` filters select runs; a filter value may be a list/tuple/set of
        accepted values, and values also match by their string form (``seed="0"`` matches seed 0). Reads
        ``run.json``, ``summary.json`` and ``config.json`` of each run that passes the filters and checks its other
        files (``metrics.jsonl`` rows, ``arrays/*.npz`` headers, symlinks, entry types; never array data or
        checkpoints), remembering those checks until a file changes.
        """
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        root_real = os.path.realpath(self.root)
        runs_dir = self.runs_dir
        if os.path.lexists(runs_dir) and not runs_dir.is_dir():
            return [RunRecord("runs", runs_dir, "corrupt", "the runs folder is a file, not a folder; not read")]
        if not runs_dir.is_dir():
            return []
        if not _inside(root_real, runs_dir):
            return [RunRecord("runs", runs_dir, "corrupt", "the runs folder leads outside the artifacts root; not read")]
        now = time.time()
        filtered = kind is not None or study_id is not None or bool(tag_filters)
        records = []
        for entry in sorted(os.scandir(runs_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            record, _ = self._scan_run(Path(entry.path), entry.name, root_real, now, with_summary=False, entry=entry)
            if filtered and not _matches(record, kind, study_id, tag_filters):
                continue
            record = self._check_contents(self._attach_summary(record), root_real)
            records.append(record)
        records.sort(key=lambda r: (r.created or "", r.run_id))
        return records

    def runs_table(self, kind: str | None = None, *, include_config: bool = False, study_id: str | None = None, **tag_filters: Any):
        """A pandas DataFrame with one row per run (same filters as :meth:`list_runs`).

        Columns: run_id, kind, status, reason, created, finished, heartbeat (UTC timestamps), study_id, path
        (relative to the root), then ``tags.<name>`` and ``summary.<metric>`` (nested dicts flattened with dots),
        and ``config.<field>`` with ``include_config=True`` (one more small file per run).
        """
        import pandas as pd

        records = self.list_runs(kind, study_id=study_id, **tag_filters)
        rows = []
        for record in records:
            row = record.row(self.root)
            if include_config and record.ok:
                config, _ = _read_json_object(record.path / "config.json", "config.json")
                _flatten("config", config or {}, row)
            rows.append(row)
        fixed = ["run_id", "kind", "status", "reason", "created", "finished", "heartbeat", "study_id", "path"]
        extra = sorted({key for row in rows for key in row} - set(fixed))
        frame = pd.DataFrame(rows, columns=fixed + extra)
        for column in ("created", "finished", "heartbeat"):
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
        return frame

    def _attach_summary(self, record: RunRecord) -> RunRecord:
        if record.status == "corrupt":
            return record
        path = record.path / "summary.json"
        if not os.path.lexists(path):
            return record
        if not _inside(os.path.realpath(self.root), path):
            return dataclasses.replace(record, status="corrupt", reason="summary.json is a symlink out of the artifacts root")
        summary, reason = _read_json_object(path, "summary.json")
        if summary is None:
            return dataclasses.replace(record, status="corrupt", reason=reason)
        reason = _summary_problem(summary)
        if reason:
            return dataclasses.replace(record, status="corrupt", reason=reason)
        return dataclasses.replace(record, summary=summary)

    def _check_contents(self, record: RunRecord, root_real: str) -> RunRecord:
        """``record`` made corrupt when a file a reader opens fails its check (a symlink out of the root, a file
        where a folder belongs or the reverse, config.json not an object, a metrics row or an npz file of the
        wrong schema), or given a notice when a finished run lacks an array its stage always writes."""
        if record.status == "corrupt":
            return record
        folder = record.path
        problem = _folder_problem(folder, root_real)
        if not problem:
            problem = _cached_problem(folder / "config.json", "config", _config_problem)
        if not problem and (folder / "metrics.jsonl").exists():
            problem = _metrics_file_problem(folder / "metrics.jsonl")
        arrays = folder / "arrays"
        try:
            names = sorted(entry.name[:-4] for entry in os.scandir(arrays)
                           if entry.name.endswith(".npz") and not entry.name.startswith(".")) if not problem else []
        except FileNotFoundError:
            names = []
        except OSError as exc:
            problem = f"arrays/ cannot be read ({_one_line(exc.strerror or exc, 120)})"
            names = []
        for name in names:
            problem = problem or _array_file_problem(arrays / f"{name}.npz", record.kind, name)
        if problem:
            return dataclasses.replace(record, status="corrupt", reason=problem)
        missing = [name for name in FINISHED_ARRAYS.get(record.kind or "", ()) if name not in names]
        if record.stored_status == "finished" and missing:
            listed = ", ".join(f"arrays/{name}.npz" for name in missing)
            one = len(missing) == 1
            return dataclasses.replace(record, notice=(
                f"{listed} {'is' if one else 'are'} missing although the run finished; the plots that need "
                f"{'it' if one else 'them'} leave this run out"))
        return record

    def _scan_run(self, folder: Path, name: str, root_real: str, now: float, *, with_summary: bool, entry=None):
        """(RunRecord, meta or None) for one entry of runs/. Never raises for a bad folder."""
        corrupt = functools.partial(RunRecord, name, folder, "corrupt")
        is_link = entry.is_symlink() if entry is not None else os.path.islink(folder)
        if is_link and not _inside(root_real, folder):
            return corrupt("a symlink leading outside the artifacts root; not read"), None
        is_dir = entry.is_dir() if entry is not None else folder.is_dir()
        if not is_dir:
            return corrupt("a file, not a run folder"), None
        meta_path = folder / "run.json"
        if os.path.islink(meta_path) and not _inside(root_real, meta_path):
            return corrupt("run.json is a symlink out of the artifacts root; not read"), None
        meta, reason = _read_json_object(meta_path, "run.json")
        if meta is None:
            if reason == "run.json is missing":
                reason = (
                    "run.json is missing (run creation was interrupted)" if (folder / "config.json").exists()
                    else "not a run folder: no run.json"
                )
            return corrupt(reason), None
        reason = _schema_problem(meta, "run.json")
        if reason:
            return corrupt(reason), None
        reason = _run_meta_problem(meta, name)
        if reason:  # readable under this schema: keep what it says, so filters can still find it
            return corrupt(
                reason,
                kind=meta.get("kind") if isinstance(meta.get("kind"), str) else None,
                created=meta.get("created") if isinstance(meta.get("created"), str) else None,
                tags=_clean_tags(meta.get("tags")),
            ), None
        status, reason = meta["status"], meta.get("reason") or ""
        if status == "running":
            status, reason, _ = _liveness(meta, now, self.stale_after)
        record = RunRecord(
            run_id=name,
            path=folder,
            status=status,
            reason=reason,
            kind=meta["kind"],
            tags=dict(meta.get("tags") or {}),
            study_id=meta.get("study_id"),
            **RunRecord.fields_from(meta),
        )
        if with_summary:
            record = self._check_contents(self._attach_summary(record), root_real)
        return record, meta

    # studies ---------------------------------------------------------------------------------------------
    def create_study(self, notebook: str, profile: str, parameters: Mapping[str, Any], study_id: str | None = None) -> Study:
        """Create ``studies/<study_id>/study.json`` (status running) for executing ``notebook`` with ``profile``.

        The executed notebook belongs at :attr:`Study.executed_notebook_path` (the notebook's file name inside
        the study folder). Runs created with ``study_id=`` are added to the study automatically.
        """
        if not isinstance(notebook, (str, os.PathLike)) or not str(notebook).strip():
            raise WorkbenchError(f"study notebook must be a notebook path such as 'notebooks/01_meta_train.ipynb', got {notebook!r}")
        notebook = os.fspath(notebook)
        if not isinstance(profile, str) or not profile.strip():
            raise WorkbenchError(f"study profile must be a profile name such as 'smoke', got {profile!r}")
        if not isinstance(parameters, Mapping):
            raise WorkbenchError(f"study parameters must be a dict, got {type(parameters).__name__}")
        parameters_json = to_jsonable(parameters, nonfinite="error", where="parameters")
        executed = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(notebook).name).lstrip("._-") or "study.ipynb"
        if study_id is not None:
            _check_id(study_id, "study id")
        self._make_folder(self.studies_dir, "studies")
        created = _now()
        if study_id is not None:
            path = self.studies_dir / study_id
            try:
                path.mkdir()
            except FileExistsError:
                raise WorkbenchError(
                    f"study id {study_id!r} already exists under {self.studies_dir}; choose another or omit it"
                ) from None
        else:
            for _ in range(100):
                study_id = _make_study_id(notebook, profile, created)
                path = self.studies_dir / study_id
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover
                raise WorkbenchError(f"could not find a free study id under {self.studies_dir}; pass study_id")
        environment = environment_info()
        stamp = _iso(created)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "study_id": study_id,
            "notebook": notebook,
            "profile": profile,
            "parameters": parameters_json,
            "status": "running",
            "reason": None,
            "created": stamp,
            "finished": None,
            "run_ids": [],
            "executed_notebook": executed,
            "git_revision": environment.get("git_revision"),
            "git_dirty": environment.get("git_dirty"),
            **_owner_fields(),
            "heartbeat": stamp,
            "environment": environment,
        }
        atomic_write_json(path / "study.json", meta, nonfinite="error")
        return Study(self, path, meta)

    def open_study(self, study_id: str) -> Study:
        """Open an existing study (WorkbenchError if it does not exist or is corrupt)."""
        _check_id(study_id, "study id")
        folder = self.studies_dir / study_id
        if not os.path.lexists(folder):
            raise WorkbenchError(
                f"no study {study_id!r} under {self.studies_dir}; RunStore.list_studies() shows the existing ones"
            )
        record, meta = self._scan_study(folder, study_id, os.path.realpath(self.root), time.time())
        if record.status == "corrupt":
            raise WorkbenchError(f"study {study_id} is corrupt: {record.reason}")
        return Study(self, folder, meta)

    def study_record(self, study_id: str) -> StudyRecord:
        _check_id(study_id, "study id")
        folder = self.studies_dir / study_id
        if not os.path.lexists(folder):
            return StudyRecord(study_id, folder, "corrupt", "no such study folder")
        return self._scan_study(folder, study_id, os.path.realpath(self.root), time.time())[0]

    def list_studies(self) -> list[StudyRecord]:
        """Records of all studies, oldest first, corrupt ones included with their reason."""
        problem = self._root_problem()
        if problem:
            raise WorkbenchError(problem)
        root_real = os.path.realpath(self.root)
        if os.path.lexists(self.studies_dir) and not self.studies_dir.is_dir():
            return [StudyRecord("studies", self.studies_dir, "corrupt", "the studies folder is a file, not a folder; not read")]
        if not self.studies_dir.is_dir():
            return []
        if not _inside(root_real, self.studies_dir):
            return [StudyRecord("studies", self.studies_dir, "corrupt", "the studies folder leads outside the artifacts root; not read")]
        now = time.time()
        records = [
            self._scan_study(Path(entry.path), entry.name, root_real, now, entry=entry)[0]
            for entry in sorted(os.scandir(self.studies_dir), key=lambda e: e.name)
            if not entry.name.startswith(".")
        ]
        records.sort(key=lambda r: (r.created or "", r.study_id))
        return records

    def studies_table(self):
        """A pandas DataFrame with one row per study: study_id, status, reason, notebook, profile, created,
        finished, runs (count), executed_notebook (relative to the study folder, None until written),
        git_revision, git_dirty, path, and ``parameters.<name>``."""
        import pandas as pd

        rows = [record.row(self.root) for record in self.list_studies()]
        fixed = [
            "study_id", "status", "reason", "notebook", "profile", "created", "finished", "runs",
            "executed_notebook", "git_revision", "git_dirty", "path",
        ]
        extra = sorted({key for row in rows for key in row} - set(fixed))
        frame = pd.DataFrame(rows, columns=fixed + extra)
        for column in ("created", "finished"):
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
        return frame

    def _scan_study(self, folder: Path, name: str, root_real: str, now: float, entry=None):
        corrupt = functools.partial(StudyRecord, name, folder, "corrupt")
        is_link = entry.is_symlink() if entry is not None else os.path.islink(folder)
        if is_link and not _inside(root_real, folder):
            return corrupt("a symlink leading outside the artifacts root; not read"), None
        if not (entry.is_dir() if entry is not None else folder.is_dir()):
            return corrupt("a file, not a study folder"), None
        meta_path = folder / "study.json"
        if os.path.islink(meta_path) and not _inside(root_real, meta_path):
            return corrupt("study.json is a symlink out of the artifacts root; not read"), None
        meta, reason = _read_json_object(meta_path, "study.json")
        if meta is None:
            return corrupt("not a study folder: no study.json" if reason == "study.json is missing" else reason), None
        reason = _schema_problem(meta, "study.json") or _study_meta_problem(meta, name)
        if reason:
            return corrupt(reason), None
        status, reason = meta["status"], meta.get("reason") or ""
        if status == "running":
            status, reason, cause = _liveness(meta, now, self.stale_after)
            if status == "stale" and cause == "heartbeat":
                # A study is alive while any of its runs is: the runner is blocked inside papermill meanwhile.
                for run_id in meta.get("run_ids") or []:
                    run = self.run_record(run_id)
                    if run.status == "running":
                        status, reason = "running", f"run {run_id} is running"
                        break
        executed = meta.get("executed_notebook")
        record = StudyRecord(
            study_id=name,
            path=folder,
            status=status,
            reason=reason,
            notebook=meta["notebook"],
            profile=meta["profile"],
            parameters=dict(meta.get("parameters") or {}),
            run_ids=tuple(meta.get("run_ids") or ()),
            executed_notebook=executed,
            executed_notebook_exists=bool(executed) and (folder / executed).is_file(),
            git_revision=meta.get("git_revision"),
            git_dirty=meta.get("git_dirty"),
            **StudyRecord.fields_from(meta),
        )
        return record, meta


# ------------------------------------------------------------------------------------------ record checks
def _run_meta_problem(meta: dict, folder_name: str) -> str:
    if meta.get("run_id") != folder_name:
        return f"run.json names run {meta.get('run_id')!r} but the folder is {folder_name!r} (renamed or copied?)"
    if not isinstance(meta.get("kind"), str):
        return "run.json has no kind"
    if meta.get("status") not in RUN_STATUSES:
        return f"run.json has an unknown status {meta.get('status')!r}"
    if not isinstance(meta.get("created"), str):
        return "run.json has no creation time"
    if not isinstance(meta.get("tags", {}), dict):
        return "run.json tags are not an object"
    if meta.get("study_id") is not None and not isinstance(meta.get("study_id"), str):
        return "run.json study_id is not a string"
    if not _KIND_RE.match(meta["kind"]):
        return f"run.json kind {_one_line(meta['kind'], 60)!r} is not a kind name"
    if _parse_iso(meta["created"]) is None:
        return f"run.json created {_one_line(meta['created'], 60)!r} is not an ISO time"
    for key, value in (meta.get("tags") or {}).items():
        problem = _tag_problem(key, value)
        if problem:
            return problem
    for key, kind, what in (("reason", str, "a string"), ("finished", str, "a time"), ("heartbeat", str, "a time"),
                            ("pid", int, "a process id"), ("pid_start", int, "an integer"), ("host", str, "a host name"),
                            ("environment", dict, "an object")):
        problem = _field_problem(meta, "run.json", key, kind, what)
        if problem:
            return problem
    return ""


def _config_problem(path: Path) -> str:
    config, reason = _read_json_object(path, "config.json")
    return reason if config is None else ""


def _study_meta_problem(meta: dict, folder_name: str) -> str:
    if meta.get("study_id") != folder_name:
        return f"study.json names study {meta.get('study_id')!r} but the folder is {folder_name!r} (renamed or copied?)"
    for key in ("notebook", "profile", "created"):
        if not isinstance(meta.get(key), str):
            return f"study.json has no {key}"
    if meta.get("status") not in RUN_STATUSES:
        return f"study.json has an unknown status {meta.get('status')!r}"
    if not isinstance(meta.get("run_ids", []), list):
        return "study.json run_ids is not a list"
    if not isinstance(meta.get("parameters", {}), dict):
        return "study.json parameters are not an object"
    executed = meta.get("executed_notebook")
    if executed is not None and (not isinstance(executed, str) or not _NAME_RE.match(executed)):
        return f"study.json executed_notebook {executed!r} is not a file name inside the study folder"
    return ""


def _liveness(meta: dict, now: float, stale_after: float) -> tuple[str, str, str]:
    """(status "running" | "stale", reason, cause "process" | "heartbeat") for a record stored as running."""
    pid, host = meta.get("pid"), meta.get("host")
    where = f"pid {pid} on {host}"
    state = _process_state(pid, host, meta.get("pid_start"))
    beat = _parse_iso(meta.get("heartbeat")) or _parse_iso(meta.get("created"))
    age = None if beat is None else now - beat.timestamp()
    last = "no readable heartbeat" if age is None else f"last heartbeat {_human_age(age)} ago"
    if state == "gone":
        return "stale", f"stale: process {pid} on {host} is gone without marking it finished or failed", "process"
    if state == "alive":
        return "running", f"process alive ({where}); {last}", "process"
    if age is None:
        return "stale", f"stale: no readable heartbeat ({where})", "heartbeat"
    if age > stale_after:
        return "stale", f"stale: no heartbeat for {_human_age(age)} ({where}); the process probably died", "heartbeat"
    return "running", f"{last} ({where})", "heartbeat"


def _matches(record: RunRecord, kind: str | None, study_id: str | None, tag_filters: Mapping[str, Any]) -> bool:
    if kind is not None and record.kind != kind:
        return False
    if study_id is not None and record.study_id != study_id:
        return False
    for key, wanted in tag_filters.items():
        if key not in record.tags:
            return False
        options = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else (wanted,)
        value = record.tags[key]
        if not any(value == option or str(value) == str(option) for option in options):
            return False
    return True


def _make_run_id(kind: str, tags: Mapping[str, Any], created: _dt.datetime) -> str:
    parts = [created.strftime("%Y%m%d-%H%M%S"), _slug(kind)]
    for key in ID_TAGS:
        value = tags.get(key)
        if value is None or value == "" or isinstance(value, bool):
            continue
        slug = _slug(str(value))[:24].strip("-")
        if slug:
            parts.append(f"s{slug}" if key == "seed" else slug)
    readable = "-".join(parts)[:110].rstrip("-")
    return f"{readable}-{secrets.token_hex(2)}"


def _make_study_id(notebook: str, profile: str, created: _dt.datetime) -> str:
    stem = _slug(Path(notebook).stem)[:40].strip("-") or "study"
    profile_slug = _slug(profile)[:24].strip("-")
    parts = [created.strftime("%Y%m%d-%H%M%S"), stem] + ([profile_slug] if profile_slug else [])
    return f"{'-'.join(parts)}-{secrets.token_hex(2)}"
