"""Who writes a run or study, and whether that process still lives.

* ``_folder_lock``: an exclusive ``flock`` on a run's or study's folder around every read-modify-write of its
  ``run.json`` / ``study.json``;
* ``_acquire_writer_lock``: the one-writer lock of a run, an exclusive ``flock`` on ``<run>/.writer.lock`` that
  names its holder (pid, host, since); the OS drops it when the process dies;
* ``_owner_fields``, ``_process_state``, ``_liveness``: the pid, host and start time a running record stores, and
  whether that process is alive, gone or cannot be checked, which makes a running record ``"running"`` or
  ``"stale"``.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import WorkbenchError
from .environment import _HOSTNAME
from .formatting import _human_age, _iso, _now, _one_line, _parse_iso
from .layout import LOCK_FILE

try:  # POSIX advisory locks serialise read-modify-write of run.json / study.json between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: updates are still atomic, only concurrent edits may race
    fcntl = None


# ---------------------------------------------------------------------------------------------- folder locks
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


def _refuse_live_writer(run_id: str, meta: dict) -> None:
    """WorkbenchError naming the process when ``meta`` (a run.json) records a running writer that is another live
    process (a writer from before the lock existed, or one on a file system without locks)."""
    pid, host = meta.get("pid"), meta.get("host")
    if meta.get("status") == "running" and not (pid == os.getpid() and host == _HOSTNAME) \
            and _process_state(pid, host, meta.get("pid_start")) == "alive":
        raise WorkbenchError(_held_message(run_id, pid, host))


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

# ------------------------------------------------------------------------------------------ process liveness
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


