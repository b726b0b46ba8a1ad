"""``workbench dashboard``: start the Streamlit app that reads an artifacts root.

The app itself lives in ``app/`` (entry point ``app/main.py``, pages in ``app/pages/``); it only reads artifacts
through :mod:`workbench.dashboard_data`. This module builds the ``streamlit run`` command line, starts it, and
waits until the server answers. The server binds to 127.0.0.1 unless another address is asked for: the app
shows every run's configuration and paths, which is nothing to publish on a shared network by accident.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .artifacts import default_root
from .errors import WorkbenchError

APP_DIR = Path(__file__).resolve().parent.parent / "app"
APP_MAIN = APP_DIR / "main.py"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8501
ARTIFACTS_ENV = "WORKBENCH_ARTIFACTS"


def free_port(address: str = DEFAULT_ADDRESS) -> int:
    """A TCP port that is free on ``address`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def build_command(
    artifacts: str | Path | None = None,
    *,
    port: int = DEFAULT_PORT,
    address: str = DEFAULT_ADDRESS,
    python: str | None = None,
) -> list[str]:
    """The ``streamlit run`` command line for the app.

    Headless (no browser is opened), usage statistics off, no file watcher (the app code does not change
    while it is being looked at), a minimal toolbar (no "Deploy" button), bound to ``address`` (loopback by
    default). The artifacts root travels as a
    script argument after ``--`` (``--artifacts DIR``); without it the app falls back to ``WORKBENCH_ARTIFACTS``
    and then to :func:`workbench.artifacts.default_root`.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise WorkbenchError(f"port {port!r} is not a TCP port; pass a number between 1 and 65535, e.g. --port 8501")
    if not address or any(ch.isspace() for ch in address):
        raise WorkbenchError(f"address {address!r} is not a host address; pass e.g. --address 127.0.0.1")
    command = [
        python or sys.executable, "-m", "streamlit", "run", str(APP_MAIN),
        "--server.address", address,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
    ]
    if artifacts is not None:
        command += ["--", "--artifacts", str(Path(artifacts).expanduser().resolve())]
    return command


def _check_port_free(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise WorkbenchError(
                f"cannot listen on {address}:{port} ({exc.strerror or exc}); pass another --port or --address"
            ) from None


def _check_artifacts(artifacts: str | Path | None) -> Path | None:
    if artifacts is None:
        return None
    path = Path(artifacts).expanduser()
    if not path.exists():
        raise WorkbenchError(
            f"artifacts directory {path} does not exist; run a study first (see artifacts/README.md) "
            "or pass --artifacts with an existing directory"
        )
    if not path.is_dir():
        raise WorkbenchError(f"--artifacts {path} is a file, not a directory; pass the artifacts root directory")
    return path.resolve()


def _url(address: str, port: int) -> str:
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_until_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Poll Streamlit's health endpoint until it answers ``ok``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise WorkbenchError(
                f"the dashboard server exited with status {process.returncode} before it was ready; "
                "run `workbench dashboard --verbose` to see Streamlit's log"
            )
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise WorkbenchError(f"the dashboard did not answer at {url} within {timeout:.0f} s; try another --port")


def launch(
    artifacts: str | Path | None = None,
    *,
    port: int | None = None,
    address: str = DEFAULT_ADDRESS,
    wait: bool = True,
    timeout: float = 60.0,
    quiet: bool = True,
) -> tuple[subprocess.Popen, str]:
    """Start the dashboard server in a subprocess and return ``(process, url)``.

    ``port=None`` picks a free port. With ``wait=True`` this returns once the server answers its health check.
    The caller owns the process: ``process.terminate()`` stops it. ``quiet`` sends the server's own log to
    /dev/null (Streamlit prints its URLs, which would repeat ours).
    """
    root = _check_artifacts(artifacts)
    if port is None:
        port = free_port(address if address not in ("0.0.0.0", "::") else DEFAULT_ADDRESS)
    command = build_command(root, port=port, address=address)
    _check_port_free(address, port)
    env = dict(os.environ)
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    if root is not None:
        env[ARTIFACTS_ENV] = str(root)
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
    url = _url(address, port)
    if wait:
        try:
            wait_until_ready(url, process, timeout=timeout)
        except BaseException:
            stop(process)
            raise
    return process, url


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a server started by :func:`launch` (and wait for it)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def interruptible() -> Iterator[None]:
    """While serving, Ctrl-C (SIGINT) and ``kill`` (SIGTERM) both raise KeyboardInterrupt, so the server is stopped.

    SIGINT is set explicitly: a process started in the background by a shell without job control (``cmd &`` in a
    script, CI runners) inherits SIGINT as *ignored*, and Python then never turns it into KeyboardInterrupt.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    # `kill <pid>` of this command must not leave the server behind: SIGTERM unwinds like Ctrl-C.
    process = None
    with interruptible():
        try:
            process, url = launch(args.artifacts, port=args.port, address=args.address, wait=True,
                                  quiet=not args.verbose)
            root = Path(args.artifacts).resolve() if args.artifacts else default_root()
            print(f"dashboard running at {url} (artifacts: {root}); Ctrl-C stops it", flush=True)
            if args.address not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: listening on {args.address}, reachable from other machines", file=sys.stderr)
            return process.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            if process is not None:
                stop(process)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench dashboard [--artifacts DIR] [--port 8501] [--address 127.0.0.1]``."""
    from .cli import add_command

    parser = add_command(
        subparsers, "dashboard", _run, help="open the Streamlit dashboard on an artifacts root",
        description="Start the dashboard (studies and runs, accuracy across targets, per-layer scales, "
        "calibration, curves and robustness). It only reads artifacts; it never trains.")
    parser.add_argument("--artifacts", default=None,
                        help=f"artifacts root to read (default: ${ARTIFACTS_ENV}, else the project's artifacts/)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="address to bind (default %(default)s, loopback only; 0.0.0.0 exposes it)")
    parser.add_argument("--verbose", action="store_true", help="show Streamlit's own log")
