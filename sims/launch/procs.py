"""Processes the launchers start, and the process tree below them.

Free loopback ports, Flower's environment, waiting for a listener, and stopping: a
process group by its leader's PID, a list of PIDs, or a :class:`ProcessSet` with
everything its processes started in other sessions. Nothing here matches processes
by name. The tree comes from ``/proc`` (Linux), else from ``ps``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedquant.config import ConfigError

STARTUP_TIMEOUT_S = 60.0
_PROC = Path("/proc")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_DATASETS_OFFLINE="1",
    )
    bin_dir = str(Path(sys.executable).parent)  # the venv's flwr, flower-superlink
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def wait_for_port(host: str, port: int, process: subprocess.Popen[Any], log: Path) -> None:
    """Wait until ``process`` listens on host:port; raise if it exits or times out."""
    name = Path(str(process.args[0] if isinstance(process.args, list) else process.args)).name
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on {host}:{port}; see {log}")


# -- the process tree ------------------------------------------------------------------


def parent_pids() -> dict[int, int]:
    """Pid -> parent pid for every process visible now (Linux /proc, else ``ps``)."""
    parents: dict[int, int] = {}
    if (_PROC / "self" / "stat").exists():
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
        return parents
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        with contextlib.suppress(ValueError):
            pid, ppid = map(int, line.split())
            parents[pid] = ppid
    return parents


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` now, in any session (breadth first)."""
    children: dict[int, list[int]] = {}
    for child, parent in parent_pids().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found += frontier
    return found


def process_tree(root: int) -> list[int]:
    """``root`` followed by all its descendants (:func:`descendants`)."""
    return [root, *descendants(root)]


def is_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (a zombie counts as ended)."""
    if (_PROC / "self" / "stat").exists():
        try:
            return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- stopping --------------------------------------------------------------------------


def stop_process_group(proc: subprocess.Popen[Any], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (by its PID), then SIGKILL.

    The group is signalled even when its leader has already exited: children it
    started (a ServerApp, Ray workers) may still be running in it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace_s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_pids(pids: Sequence[int], *, grace_s: float) -> None:
    """SIGTERM each PID that still runs, wait up to ``grace_s``, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [pid for pid in pids if is_alive(pid)]
        for pid in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [pid for pid in running if is_alive(pid)]
        if not running:
            return


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM in the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class Launched:
    """A process started here, in a new session, with its log file."""

    name: str
    process: subprocess.Popen[Any]
    log: Path


@dataclass
class ProcessSet:
    """Processes started together; ``stop_all`` ends them and their children.

    Flower's SuperLink and SuperNodes start a SuperExec in a session of its own
    (``start_new_session``), which starts the app processes, so killing a leader's
    process group misses them. ``stop`` notes a leader's descendants first, stops the
    group by the leader's PID, then ends any noted descendant still running (SIGTERM,
    then SIGKILL), by PID. ``seen`` keeps every PID it started or stopped.
    """

    launched: list[Launched] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def start(
        self, name: str, command: Sequence[str], *, env: Mapping[str, str], log: Path
    ) -> Launched:
        """Start ``command`` in a new session, its output in ``log``."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(command),
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        item = Launched(name, process, log)
        self.launched.append(item)
        self.seen.add(process.pid)
        return item

    def stop(self, item: Launched, *, grace_s: float = 10.0) -> None:
        """Stop one started process, its process group and its descendants."""
        below = descendants(item.process.pid) if item.process.poll() is None else []
        self.seen.update(below)
        stop_process_group(item.process, grace_s=grace_s)
        stop_pids(below, grace_s=grace_s)

    def stop_all(self, *, grace_s: float = 10.0) -> None:
        """Stop every process, the last started first (SuperNodes before the SuperLink).

        A second Ctrl-C or SIGTERM while this runs is ignored (in the main thread), so
        that it cannot cut the teardown short and leave processes behind.
        """
        with signals_ignored():
            for item in reversed(self.launched):
                self.stop(item, grace_s=grace_s)

    def alive(self) -> list[int]:
        """PIDs of started processes (and noted descendants) that still run."""
        return sorted(pid for pid in self.seen if is_alive(pid))


LAUNCH_ERRORS = (ConfigError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError)
"""What a launcher reports as a failed launch, not a crash."""


def report_launch_error(err: BaseException) -> int:
    """Print ``err`` for the user; the exit status: 2 for a bad config, else 1."""
    print(f"error: {err}", file=sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1
