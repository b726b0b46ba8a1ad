"""Timestamps and one-line messages, as every record of the store writes them.

UTC ISO times with milliseconds (``_now``, ``_iso``) and their lenient parse, ages in words ("3 min"), and the
one-line texts (at most ``MAX_REASON_CHARS`` characters) that a failed run records as its reason and that readers
report as a problem.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any

MAX_REASON_CHARS = 500


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

