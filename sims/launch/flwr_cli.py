"""The ``flwr`` CLI, as both launchers drive it: connection, submit, follow, status.

A launcher owns a private ``FLWR_HOME`` whose ``config.toml`` names one connection to
its SuperLink's control API (:func:`connect`). :func:`submit_and_follow` submits the
app (this repository) with ``flwr run``, streams its log with ``flwr log --stream``
until the run ends, and returns the run's entry in ``flwr ls``. The status, not the
exit code, says how the run ended: ``flwr run --stream`` exits 0 even when the
ServerApp fails, so callers check for ``"finished:completed"``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app ``flwr run`` submits: this repository (its pyproject.toml)."""

COMPLETED = "finished:completed"
"""The ``flwr ls`` status of a run whose ServerApp returned normally."""

SUBMIT_TIMEOUT_S = 120.0  # ``flwr run`` builds and uploads the app bundle
CLI_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FlwrCli:
    """The ``flwr`` CLI bound to one connection of a private ``FLWR_HOME``."""

    env: Mapping[str, str]
    connection: str

    def __call__(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` (RuntimeError with its output if it fails and ``check``)."""
        out = subprocess.run(
            ["flwr", *args], env=dict(self.env), capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise RuntimeError(
                f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
            )
        return out


def connect(
    flwr_home: Path,
    *,
    name: str,
    address: str,
    env: Mapping[str, str],
    root_certificates: Path | None = None,
) -> FlwrCli:
    """Write the connection ``name`` to ``flwr_home/config.toml``; the CLI bound to it.

    ``address``: the SuperLink's control API (HOST:PORT). With ``root_certificates``
    the CLI verifies the SuperLink's TLS certificate against that CA; without, it
    connects in plaintext (``insecure = true``). ``env`` must set ``FLWR_HOME`` to
    ``flwr_home`` (``sims.launch.procs.flower_env``).
    """
    transport = (
        f"root-certificates = {json.dumps(str(root_certificates.resolve()))}\n"
        if root_certificates is not None
        else "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f"[superlink.{name}]\naddress = {json.dumps(address)}\n{transport}"
    )
    return FlwrCli(env, name)


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """Overrides as one ``flwr run --run-config`` string ("k=v ..." with TOML values)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        # Flower splits the string with a regex that ends a quoted value at the next
        # quote of its kind, escaped or not: a value holding '"' goes as a TOML literal
        # string ('...'); one holding both kinds of quote (or a newline) cannot be passed.
        if '"' not in value:
            return json.dumps(value)  # a TOML basic string
        if "'" in value or "\n" in value:
            raise ValueError(f"a run-config string cannot hold both kinds of quote: {value!r}")
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def submit(
    cli: FlwrCli, overrides: Mapping[str, Any], *, federation_config: str | None = None
) -> int:
    """``flwr run`` the app with these run-config overrides; returns the run id."""
    command = ["run", str(APP_DIR), cli.connection, "--format", "json"]
    if run_config := run_config_arg(overrides):
        command += ["--run-config", run_config]
    if federation_config:
        command += ["--federation-config", federation_config]
    out = cli(*command, timeout=SUBMIT_TIMEOUT_S)
    return int(json.loads(out.stdout)["run-id"])


def run_status(cli: FlwrCli, run_id: int) -> dict[str, Any]:
    """The run's entry from ``flwr ls --run-id ID --format json``."""
    out = cli("ls", cli.connection, "--run-id", str(run_id), "--format", "json")
    return dict(json.loads(out.stdout)["runs"][0])


def follow(
    cli: FlwrCli,
    run_id: int,
    *,
    stream: bool = True,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    on_tick: Callable[[int], None] | None = None,
) -> None:
    """Follow the run's log (``flwr log --stream``) until the run ends.

    ``stream`` copies the log to stdout; ``on_line`` is called with each line as it
    arrives; ``on_tick`` with the run id about once a second while the run lasts.
    ``timeout_s`` bounds the wait: past it the run is stopped (``flwr stop``) and
    TimeoutError raised.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    log = subprocess.Popen(
        ["flwr", "log", str(run_id), cli.connection, "--stream"],
        env=dict(cli.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    )
    reader = threading.Thread(
        target=_read_lines, args=(log, stream, on_line), name="flwr-log", daemon=True
    )
    reader.start()
    try:
        while log.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                log.wait(timeout=1.0)
            if on_tick is not None:
                on_tick(run_id)
            if deadline is not None and time.monotonic() > deadline:
                cli("stop", str(run_id), cli.connection, check=False)
                raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s")
    finally:
        if log.poll() is None:
            log.terminate()
            log.wait()
        reader.join(timeout=5.0)


def _read_lines(
    log: subprocess.Popen[str], stream: bool, on_line: Callable[[str], None] | None
) -> None:
    if log.stdout is None:  # not reached: stdout is a pipe
        return
    for line in log.stdout:
        if stream:
            sys.stdout.write(line)
            sys.stdout.flush()
        if on_line is not None:
            on_line(line)


def submit_and_follow(
    cli: FlwrCli,
    overrides: Mapping[str, Any],
    *,
    federation_config: str | None = None,
    stream: bool = True,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
    on_tick: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`submit`, :func:`follow` until the run ends, and return :func:`run_status`."""
    run_id = submit(cli, overrides, federation_config=federation_config)
    follow(cli, run_id, stream=stream, timeout_s=timeout_s, on_line=on_line, on_tick=on_tick)
    return run_status(cli, run_id)
