"""Fan a grid of independent cells out over local worker processes or a Ray cluster.

A study's transfer grid and meta-training's ``num_runs`` are lists of :class:`Cell` s: independent jobs, each
writing one run into the artifacts root under a run id fixed in advance. :func:`run_cells` executes them

- in this process, one after another (``workers=1``, the way a notebook steps through them);
- in ``N`` worker processes on this machine (``executor="local"``): each worker is a fresh interpreter (spawn)
  with its own torch threads (one by default on a CPU: two threads per process were measured up to 12x slower on
  a busy 2-core machine) and, on GPUs, its own device;
- or as tasks on a Ray cluster (``executor="ray"``; ``address`` or ``$RAY_ADDRESS``, else a local Ray instance that
  this call starts and stops), each asking for the CPUs (and GPU) a cell needs. Every node must see the artifacts
  root at the same path, as on a cluster's shared file system.

A cell whose function raises, or whose worker dies (kill -9, a lost node), is tried again up to ``retries`` times,
then reported as failed without stopping the others; cells that depend on it (``after``) are skipped. One
progress bar covers the grid: cells done, running, failed, and the ETA.

Cell functions are module-level functions ``fn(payload, context) -> value`` (picklable by reference); ``context``
is a :class:`WorkerContext` naming the threads and device the cell should use. They must be idempotent in the
artifacts: a retried cell finds the run its earlier attempt left and resumes or restarts it.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence

from .artifacts.formatting import _exception_line
from .config import SharedSettings
from .errors import WorkbenchError

EXECUTORS = ("local", "ray")
RAY_ADDRESS_ENV = "RAY_ADDRESS"
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Cell:
    """One independent job: ``key`` is its stable identity (the run id it writes), ``label`` what progress shows,
    ``payload`` the picklable argument of the cell function, ``after`` keys of cells that must finish first."""

    key: str
    label: str
    payload: Any
    after: tuple[str, ...] = ()


@dataclass
class CellOutcome:
    key: str
    status: str  # finished | failed | skipped
    value: Any = None
    error: Optional[str] = None
    attempts: int = 0


@dataclass(frozen=True)
class WorkerContext:
    """What a cell runs on: ``threads`` torch threads and ``device`` (``cpu``, ``cuda:1`` ...)."""

    threads: int
    device: str
    worker: int = 0

    def place(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A cell's config values with this worker's threads, and its device where the config leaves the CUDA
        device to the plan (``auto``, ``cuda``, ``cuda:N``)."""
        placed = {**values, "threads": self.threads}
        device = str(values.get("device"))
        if device == "auto" or device.startswith("cuda"):
            placed["device"] = self.device
        return placed


@dataclass(frozen=True)
class WorkerPlan:
    """How many cells run at once, with how many threads each, on which devices (one per worker slot)."""

    workers: int
    threads: int
    devices: tuple[str, ...]
    executor: str = "local"
    address: Optional[str] = None

    @property
    def parallel(self) -> bool:
        return self.executor == "ray" or self.workers > 1

    def describe(self) -> str:
        where = "Ray " + (self.address or "(local instance)") if self.executor == "ray" else "this machine"
        if not self.parallel:
            return f"1 worker (this process), {self.threads} thread(s), {self.devices[0]}"
        devices = sorted(set(self.devices))
        return (f"{self.workers} workers on {where}, {self.threads} thread(s) each, "
                f"{', '.join(devices) if len(devices) <= 4 else f'{len(devices)} devices'}")


@dataclass
class FanOutSettings(SharedSettings):
    """Where a grid's cells run, never what they compute (so a resumed grid may change them): ``workers`` at once
    (null: what is fastest here: one per core with one thread each on a CPU, one per GPU on GPUs; 1: one after
    another in this process), ``executor`` ``local`` (worker processes on this machine) or ``ray`` (tasks on the
    Ray cluster at ``ray_address``, else ``$RAY_ADDRESS``, else a local Ray instance; every node must see the
    artifacts root at the same path), and ``retries``: further attempts for a cell that fails or whose worker dies,
    before it is reported as failed."""

    workers: Optional[int] = None
    executor: str = "local"
    ray_address: Optional[str] = None
    retries: int = 1

    def validate(self) -> None:
        check_execution(self.workers, self.executor, self.retries)
        super().validate()


#: Execution settings: they choose where cells run, never what they compute, so a study resumed with other
#: values continues the same grid.
EXECUTION_FIELDS = tuple(f.name for f in fields(FanOutSettings))


def usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cuda_devices(device: str) -> list[str]:
    """The CUDA devices a grid on ``device`` may use ([] for a CPU grid)."""
    if device == "cpu" or device.startswith("mps"):
        return []
    import torch

    if not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise WorkbenchError(f"device {device!r} asked for, but torch sees no CUDA device; use device=cpu or auto")
        return []
    if device.startswith("cuda:"):
        return [device]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_execution(workers: Optional[int], executor: str, retries: int) -> None:
    """One-line errors for bad execution settings (before anything runs)."""
    if executor not in EXECUTORS:
        raise WorkbenchError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise WorkbenchError(f"workers must be a positive integer or null (one per core, or per GPU), got {workers!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise WorkbenchError(f"retries must be a non-negative integer (0: no second attempt), got {retries!r}")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise WorkbenchError("executor 'ray' needs Ray: pip install -e '.[ray]' (or pip install ray), or use "
                                 "executor local") from None


#: Starting a local worker (a fresh interpreter importing torch and the workbench) took about 4 s on the 2-core
#: machine this was written on; a grid whose serial time would not repay that runs in this process by default.
WORKER_START_SECONDS = 4.0


def plan_workers(workers: Optional[int], threads: Optional[int], device: str, cells: int, *,
                 executor: str = "local", address: Optional[str] = None, workers_per_device: int = 1,
                 serial_seconds: Optional[float] = None) -> WorkerPlan:
    """Resolve ``workers`` (None: what is fastest here) and the threads per worker.

    CPU: one worker per usable core, one thread each; ``threads`` set: ``cores // threads`` workers; ``workers``
    set and ``threads`` not: the cores shared out among them. CUDA: one worker per GPU, or ``workers_per_device``
    on each; ``workers`` beyond that share the GPUs round-robin. Never more workers than cells. With ``workers``
    None and an estimate of the grid's serial time (``serial_seconds``) that fanning out would not save more
    than the workers' start-up, the cells run in this process.
    """
    gpus = _cuda_devices(device)
    cores = usable_cores()
    address = address or os.environ.get(RAY_ADDRESS_ENV) or None
    if gpus:
        count = workers or len(gpus) * workers_per_device
        per = threads or max(1, cores // count)
        devices = tuple(gpus[i % len(gpus)] for i in range(count))
    else:
        if workers is None and executor == "ray" and address:
            count = max(1, _ray_cluster_cpus(address) // (threads or 1))
        else:
            count = workers or max(1, cores // (threads or 1))
        per = threads or max(1, cores // count)
        devices = ("cpu" if device == "auto" else device,) * count
    count = max(1, min(count, cells))
    if workers is None and executor == "local" and serial_seconds is not None \
            and serial_seconds * (1 - 1 / count) <= WORKER_START_SECONDS:
        count = 1
    return WorkerPlan(count, per, devices[:count], executor, address)


def _ray_cluster_cpus(address: str) -> int:
    import ray

    _ray_connect(address)
    return int(ray.cluster_resources().get("CPU", 1))


# ------------------------------------------------------------------------------------------------- the grid
def run_cells(cells: Sequence[Cell], fn: Callable[[Any, WorkerContext], Any], plan: WorkerPlan, *,
              retries: int = 1, on_result: Optional[Callable[[Cell, Any], None]] = None,
              progress: bool = True, desc: str = "cells") -> dict[str, CellOutcome]:
    """Run every cell (``fn(cell.payload, context)``) as ``plan`` says; return the outcome of each, by key.

    ``on_result(cell, value)`` runs here, in this process, as each cell finishes (in completion order); an
    exception it raises stops the grid: the running cells are cancelled (their workers ended) and it propagates.
    """
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise WorkbenchError(f"two cells share a key: {sorted(k for k in keys if keys.count(k) > 1)[:3]}")
    unknown = {d for c in cells for d in c.after} - set(keys)
    if unknown:
        raise WorkbenchError(f"cells depend on keys that are not in the grid: {sorted(unknown)[:3]}")
    pool: _Pool
    if plan.executor == "ray":
        pool = _RayPool(fn, plan)
    elif plan.workers > 1:
        pool = _ProcessPool(fn, plan)
    else:
        pool = _InProcess(fn, plan)
    return _Scheduler(cells, pool, retries, on_result, progress, desc).run()


class _Scheduler:
    def __init__(self, cells, pool, retries, on_result, progress, desc):
        self.cells = {c.key: c for c in cells}
        self.pending = list(cells)
        self.pool = pool
        self.retries = retries
        self.on_result = on_result
        self.outcomes: dict[str, CellOutcome] = {}
        self.attempts: dict[str, int] = {}
        self.running: set[str] = set()
        self.progress = progress
        self.desc = desc

    def _ready(self, cell: Cell) -> Optional[bool]:
        """True: may start; False: waits; None: a cell it depends on did not finish (it is skipped)."""
        for dep in cell.after:
            outcome = self.outcomes.get(dep)
            if outcome is None:
                return False
            if outcome.status != "finished":
                return None
        return True

    def _submit_ready(self) -> None:
        for cell in list(self.pending):
            if self.pool.free_slots() <= 0:
                return
            ready = self._ready(cell)
            if ready is None:
                self.pending.remove(cell)
                self.outcomes[cell.key] = CellOutcome(cell.key, "skipped", error="a cell it waits for did not finish")
                self.bar.update(1)
            elif ready:
                self.pending.remove(cell)
                self.attempts[cell.key] = self.attempts.get(cell.key, 0) + 1
                self.running.add(cell.key)
                self.pool.submit(cell)

    def _postfix(self) -> None:
        failed = sum(o.status != "finished" for o in self.outcomes.values())
        self.bar.set_postfix_str(f"running {len(self.running)}, failed {failed}", refresh=False)

    def run(self) -> dict[str, CellOutcome]:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.cells), desc=self.desc, unit="cell", disable=not self.progress,
                        dynamic_ncols=True)
        try:
            with self.pool:
                while self.pending or self.running:
                    self._submit_ready()
                    self._postfix()
                    if not self.running:
                        if self.pending and not any(self._ready(c) for c in self.pending):
                            raise WorkbenchError("cells wait on each other in a cycle: "
                                                 f"{[c.key for c in self.pending][:3]}")
                        continue
                    for key, ok, value in self.pool.poll(POLL_SECONDS):
                        self.running.discard(key)
                        cell = self.cells[key]
                        if ok:
                            self.outcomes[key] = CellOutcome(key, "finished", value, attempts=self.attempts[key])
                            self.bar.update(1)
                            if self.on_result is not None:
                                self.on_result(cell, value)
                        elif self.attempts[key] <= self.retries:
                            self.bar.write(f"cell {cell.label}: attempt {self.attempts[key]} failed ({value}); "
                                           f"trying again")
                            self.pending.insert(0, cell)
                        else:
                            self.outcomes[key] = CellOutcome(key, "failed", error=value, attempts=self.attempts[key])
                            self.bar.write(f"cell {cell.label} failed after {self.attempts[key]} attempt(s): {value}")
                            self.bar.update(1)
                        self._postfix()
        finally:
            self._postfix()
            self.bar.close()
        return {key: self.outcomes[key] for key in self.cells}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException) -> str:
    """What a failed run records as its reason (``Type: first line``), without the colour codes Ray puts in."""
    return _ANSI.sub("", _exception_line(exc))


def _function_ref(fn: Callable) -> tuple[str, str]:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "." in name or "<" in name:
        raise WorkbenchError(f"cell function {fn!r} must be a module-level function of an importable module")
    return module, name


def _resolve(ref: tuple[str, str]) -> Callable:
    return getattr(importlib.import_module(ref[0]), ref[1])


def _run_one(fn: Callable, payload: Any, context: WorkerContext) -> tuple[bool, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(context.threads)
    try:
        return True, fn(payload, context)
    except Exception as exc:  # a cell's failure is data for the scheduler, with its last frame for the log
        return False, _one_line(exc)
    finally:
        torch.set_num_threads(threads)


class _Pool:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class _InProcess(_Pool):
    """``workers=1``: each cell runs here, when polled, so the notebook shows its output as it comes."""

    def __init__(self, fn, plan: WorkerPlan):
        self.fn, self.context, self.queue = fn, WorkerContext(plan.threads, plan.devices[0]), []

    def free_slots(self) -> int:
        return 0 if self.queue else 1

    def submit(self, cell: Cell) -> None:
        self.queue.append(cell)

    def poll(self, timeout: float):
        cell = self.queue.pop(0)
        ok, value = _run_one(self.fn, cell.payload, self.context)
        return [(cell.key, ok, value)]


# ----------------------------------------------------------------------------------- local worker processes
def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the process that started it dies (kill -9 included), so no
    orphan keeps writing a run that a resumed study wants to take over."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn, ref: tuple[str, str], context: WorkerContext, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the workers itself
    os.environ["OMP_NUM_THREADS"] = str(context.threads)
    import torch

    torch.set_num_threads(context.threads)
    fn = _resolve(ref)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, payload = message
        ok, value = _run_one(fn, payload, context)
        try:
            conn.send((key, ok, value))
        except Exception as exc:  # a value that does not pickle: the cell failed, say why
            conn.send((key, False, f"its result could not be sent back: {_one_line(exc)}"))


@dataclass
class _Worker:
    index: int
    process: Any
    conn: Any
    cell: Optional[str] = None


class _ProcessPool(_Pool):
    """N spawned worker processes, one cell at a time each; a worker that dies is replaced."""

    def __init__(self, fn, plan: WorkerPlan):
        self.ref = _function_ref(fn)
        self.plan = plan
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[Optional[_Worker]] = [None] * plan.workers

    def _start(self, index: int) -> _Worker:
        parent_conn, child_conn = self.ctx.Pipe()
        context = WorkerContext(self.plan.threads, self.plan.devices[index], index)
        process = self.ctx.Process(target=_worker_main, args=(child_conn, self.ref, context, os.getpid()),
                                   name=f"workbench-worker-{index}", daemon=True)
        process.start()
        child_conn.close()
        worker = _Worker(index, process, parent_conn)
        self.workers[index] = worker
        return worker

    def free_slots(self) -> int:
        return sum(w is None or w.cell is None for w in self.workers)

    def submit(self, cell: Cell) -> None:
        index = next(i for i, w in enumerate(self.workers) if w is None or w.cell is None)
        worker = self.workers[index] or self._start(index)
        worker.cell = cell.key
        try:
            worker.conn.send((cell.key, cell.payload))
        except (BrokenPipeError, OSError):  # it died while idle: a fresh one takes the cell
            self._discard(worker)
            worker = self._start(index)
            worker.cell = cell.key
            worker.conn.send((cell.key, cell.payload))

    def _discard(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        self.workers[worker.index] = None

    def poll(self, timeout: float):
        busy = [w for w in self.workers if w is not None and w.cell is not None]
        waitables = {}
        for w in busy:
            waitables[w.conn] = w
            waitables[w.process.sentinel] = w
        results = []
        for ready in multiprocessing.connection.wait(list(waitables), timeout):
            worker = waitables[ready]
            if worker.cell is None:
                continue
            key = worker.cell
            try:
                if worker.conn.poll():
                    got_key, ok, value = worker.conn.recv()
                    worker.cell = None
                    results.append((got_key, ok, value))
                    continue
            except (EOFError, OSError):
                pass
            if not worker.process.is_alive():
                worker.process.join(timeout=1)
                code = worker.process.exitcode
                cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                results.append((key, False, f"worker process {worker.process.pid} died ({cause})"))
                worker.cell = None
                self._discard(worker)
        return results

    def close(self) -> None:
        for worker in self.workers:
            if worker is None:
                continue
            if worker.cell is None:
                with contextlib.suppress(Exception):
                    worker.conn.send(None)
            else:
                worker.process.kill()  # a cell cut short: its run is resumed or restarted next time
        for worker in self.workers:
            if worker is not None:
                worker.process.join(timeout=10)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(timeout=5)
                with contextlib.suppress(Exception):
                    worker.conn.close()
        self.workers = [None] * len(self.workers)


# --------------------------------------------------------------------------------------------------- Ray
_RAY_STARTED_HERE = False


def _ray_connect(address: Optional[str]) -> None:
    """Connect to the cluster at ``address`` (or $RAY_ADDRESS); with neither, start a local Ray instance."""
    global _RAY_STARTED_HERE
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            # the workers import what this process can (a script's own modules too), as spawned workers do
            path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     num_cpus=usable_cores(), runtime_env={"env_vars": {"PYTHONPATH": path}})
            _RAY_STARTED_HERE = True
    except Exception as exc:  # ConnectionError, a bad address ...: one line that names the fix
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise WorkbenchError(f"could not connect to {where}: {_one_line(exc)}; start the head with `ray start "
                             f"--head` and pass its address (--address or ${RAY_ADDRESS_ENV})") from None


def _ray_task(ref: tuple[str, str], payload: Any, threads: int, device: str) -> tuple[bool, Any]:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return _run_one(_resolve(ref), payload, WorkerContext(threads, device))


class _RayPool(_Pool):
    """Cells as Ray tasks asking for ``threads`` CPUs (and one GPU on a GPU grid); at most ``workers`` at once."""

    def __init__(self, fn, plan: WorkerPlan):
        import ray

        _ray_connect(plan.address)
        self.ray = ray
        self.ref = _function_ref(fn)
        self.plan = plan
        gpu = plan.devices[0].startswith("cuda")
        self.device = "cuda" if gpu else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES: the task sees its GPU as cuda
        self.remote = ray.remote(_ray_task).options(num_cpus=plan.threads, num_gpus=1 if gpu else 0,
                                                    max_retries=0)
        self.tasks: dict[Any, str] = {}

    def free_slots(self) -> int:
        return self.plan.workers - len(self.tasks)

    def submit(self, cell: Cell) -> None:
        task = self.remote.remote(self.ref, cell.payload, self.plan.threads, self.device)
        self.tasks[task] = cell.key

    def poll(self, timeout: float):
        if not self.tasks:
            return []
        ready, _ = self.ray.wait(list(self.tasks), num_returns=1, timeout=timeout)
        results = []
        for task in ready:
            key = self.tasks.pop(task)
            try:
                ok, value = self.ray.get(task)
            except Exception as exc:  # the worker or its node died (WorkerCrashedError, NodeDiedError ...)
                cause = getattr(exc, "cause", None)  # RayTaskError: what the task raised before it ran the cell
                ok, value = False, _one_line(cause) if isinstance(cause, BaseException) else f"Ray task lost: {_one_line(exc)}"
            results.append((key, ok, value))
        return results

    def close(self) -> None:
        global _RAY_STARTED_HERE
        for task in list(self.tasks):
            with contextlib.suppress(Exception):
                self.ray.cancel(task, force=True)
        self.tasks.clear()
        if _RAY_STARTED_HERE:
            self.ray.shutdown()
            _RAY_STARTED_HERE = False


__all__ = ["Cell", "CellOutcome", "EXECUTION_FIELDS", "EXECUTORS", "FanOutSettings", "RAY_ADDRESS_ENV", "WorkerContext", "WorkerPlan",
           "check_execution", "plan_workers", "run_cells", "usable_cores"]
