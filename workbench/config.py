"""Typed configs: one dataclass per stage, loaded from dicts, YAML files or ``key=value`` flags.

Each stage declares its own ``@dataclass`` deriving from :class:`Config` (``MetaTrainConfig`` in
``meta_train.py``, ``TransferConfig`` in ``transfer.py`` ...). This module holds the shared machinery:
unknown keys and ill-typed values are refused with one clear sentence (papermill only warns about unknown
parameters; we refuse them), and every config is written back next to the artifacts it produced.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from .errors import WorkbenchError

C = TypeVar("C", bound="Config")
#: Seeds are integers in [0, MAX_SEED] (numpy's SeedSequence refuses negative ones; torch overflows past 2**64).
MAX_SEED = 2**32 - 1


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting only where it is lossless (int -> float, str -> Path)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except WorkbenchError as exc:
                errors.append(str(exc))
        raise WorkbenchError(errors[0] if errors else f"config field '{name}' has an invalid value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        text = _number_as_text(value)
        if text is not None and text in args:  # `--set normalization=0.5` arrives as the float 0.5
            return text
        kind = "" if isinstance(value, str) else f"{type(value).__name__} "
        raise WorkbenchError(f"config field '{name}' must be one of {list(args)}, got {kind}{value!r}")
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise WorkbenchError(f"config field '{name}' must be a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise WorkbenchError(f"config field '{name}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise WorkbenchError(f"config field '{name}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise WorkbenchError(f"config field '{name}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkbenchError(f"config field '{name}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, Mapping):
            raise WorkbenchError(f"config field '{name}' must be a string, got the mapping {dict(value)!r} (YAML reads "
                                 f"'key: value' as a mapping); quote the value, e.g. {name}: \"npz:/path/file.npz\"")
        if not isinstance(value, str):
            raise WorkbenchError(f"config field '{name}' must be a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise WorkbenchError(f"config field '{name}' must be a path, got {type(value).__name__} {value!r}")
        return Path(value)
    return value


@dataclasses.dataclass
class Config:
    """Base of every stage config. Subclasses add fields with defaults and may override :meth:`validate`."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields in the order of a notebook's parameters cell: the config's own, then each group of
        :class:`SharedSettings` it derives from."""
        names = [f.name for f in dataclasses.fields(cls)]
        shared = [n for group in reversed(cls.__mro__) if SharedSettings in group.__bases__
                  for n in _own_fields(group)]
        return [n for n in names if n not in shared] + shared

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any] | None = None, **overrides: Any) -> C:
        merged = {**(dict(values) if values else {}), **overrides}
        known = set(cls.field_names())
        unknown = sorted(set(merged) - known)
        if unknown:
            raise WorkbenchError(
                f"unknown {cls.__name__} parameter(s) {unknown}; valid names are: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {key: _coerce(key, value, hints[key]) for key, value in merged.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, **overrides: Any) -> C:
        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"config file {path} does not exist; pass the path of a YAML file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise WorkbenchError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, Mapping):
            raise WorkbenchError(f"config file {path} must hold a mapping of parameter names to values")
        return cls.from_dict(values, **overrides)

    def validate(self) -> None:
        """Raise WorkbenchError for values that type-check but make no sense (override in subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else (list(value) if isinstance(value, tuple) else value)
        return out

    def replace(self: C, **changes: Any) -> C:
        return type(self).from_dict(self.to_dict(), **changes)


@dataclasses.dataclass
class SharedSettings(Config):
    """A group of settings several stage configs share (they derive from it): defined, documented and validated
    once (``validate`` runs each group's check and then the next class's in the MRO)."""


def _own_fields(group: type) -> list[str]:
    inherited = {f.name for base in group.__bases__ if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    return [f.name for f in dataclasses.fields(group) if f.name not in inherited]


def _number_as_text(value: Any) -> str | None:
    """The text a YAML number was written as (``0.5`` -> ``"0.5"``, ``2`` -> ``"2"``); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return str(value)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["steps=10", "lr=1e-3"]`` into ``{"steps": 10, "lr": 0.001}`` (values parsed as YAML scalars).

    A value that ends in a colon (``target=npz:``) stays text: YAML would read it as the mapping ``{npz: null}``.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise WorkbenchError(f"override {pair!r} must look like key=value, e.g. steps=100")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if (isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None
                and not raw.lstrip().startswith("{")):
            value = raw.strip()
        out[key.strip()] = value
    return out


def require(condition: bool, message: str) -> None:
    """Shorthand for validation rules in ``Config.validate``."""
    if not condition:
        raise WorkbenchError(message)


def require_seed(name: str, value: int) -> None:
    """A seed field must be an integer in [0, MAX_SEED]."""
    require(0 <= value <= MAX_SEED, f"{name} must be an integer from 0 to {MAX_SEED}, got {value}; e.g. {name}=0")


def require_threads(value: int | None) -> None:
    """``threads`` is torch's CPU thread count for a run: a positive integer, or null to keep the process's."""
    require(value is None or value >= 1, f"threads must be a positive integer or null (keep torch's default), got "
                                         f"{value}; e.g. threads=2")
