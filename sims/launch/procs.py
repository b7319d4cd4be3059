"""Processes the launchers start: free loopback ports, Flower's environment, and
stopping a process group by its leader's PID (never by a name pattern)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 60.0


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


def stop_process_group(proc: subprocess.Popen[Any], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (by its PID), then SIGKILL.

    The group is signalled even when its leader has already exited: children it
    started (a ServerApp, Ray workers) may still be running in it.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
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
