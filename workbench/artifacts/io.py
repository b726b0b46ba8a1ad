"""Atomic writes and defensive reads of the store's files.

Writers: every file except ``metrics.jsonl`` is written to a temporary file in the same folder, fsynced and
renamed over the target (``os.replace``), so a reader sees the old or the new file, never half of one
(:func:`atomic_write_text`, :func:`atomic_write_json` after :func:`to_jsonable`, :func:`atomic_savez` for
uncompressed npz files without pickles, :func:`atomic_torch_save` after :func:`check_weights_only`).

Readers: a JSON object file, with a one-line reason instead of an exception (``_read_json_object``), and the
header of an ``.npy`` member of an npz file, without its data (``_npy_header``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np

from ..errors import WorkbenchError
from .formatting import _one_line


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; the renamed file should get the permissions a plain open() would give it.
_FILE_MODE = 0o666 & ~_read_umask()


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


# ---------------------------------------------------------------------------------------------------- reading
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

