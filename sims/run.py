"""Run a fedquant simulation on Flower's simulation runtime (Ray).

    python -m sims.run --run-config "bits=2 num-server-rounds=5"

The overrides use Flower's syntax and are validated here first: a bad key or value
stops before any process starts. The launcher then starts its own SuperLink in
simulation mode on free 127.0.0.1 ports with a private FLWR_HOME, submits the app
with ``flwr run``, streams the run's log, checks that the run finished as
"completed" (``flwr run --stream`` exits 0 even when the ServerApp fails), and stops
the SuperLink (and the processes it started) by PID, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
from flwr.common.config import parse_config_args

from fedquant.config import ConfigError, RunConfig
from sims.procs import flower_env, free_port, stop_process_group, wait_for_port

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedquant-sim"


def default_run_config() -> dict[str, Any]:
    """The run config defaults from the app's pyproject.toml."""
    with (APP_DIR / "pyproject.toml").open("rb") as f:
        return dict(tomli.load(f)["tool"]["flwr"]["app"]["config"])


def resolve_run_config(overrides: Sequence[str]) -> tuple[RunConfig, dict[str, Any]]:
    """Merge Flower-syntax overrides into the defaults and validate everything.

    Returns the validated config and the overrides to pass to ``flwr run``
    (``out-dir`` made absolute, since the ServerApp runs in another directory).
    """
    from sims.server_app import validate_privacy_plan
    from strategies.quantized import strategy_from_config

    parsed = parse_config_args(list(overrides)) if overrides else {}
    defaults = default_run_config()
    for key, value in parsed.items():
        if key not in defaults:
            raise ConfigError(key, value, f"unknown key; known keys: {', '.join(sorted(defaults))}")
    merged = {**defaults, **parsed}
    cfg = RunConfig.from_flower(merged, strict=True)
    strategy_from_config(cfg)  # validates the aggregator spec
    validate_privacy_plan(cfg)  # an unreachable (epsilon, delta) target stops here
    parsed["out-dir"] = str(Path(cfg.out_dir).expanduser().resolve())
    return cfg, parsed


@dataclass
class LocalSuperLink:
    """A SuperLink in simulation mode that this process owns."""

    process: subprocess.Popen[Any]
    address: str
    flwr_home: Path
    env: dict[str, str]


@contextlib.contextmanager
def simulation_superlink(workdir: Path) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink on free loopback ports; stop it by PID on exit."""
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )
    env = flower_env(flwr_home)
    log_file = workdir / "superlink.log"
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_port("127.0.0.1", port, process, log_file)
        yield LocalSuperLink(process, address, flwr_home, env)
    finally:
        stop_process_group(process)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def submit_and_follow(
    link: LocalSuperLink,
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int,
    client_cpus: int = 1,
    stream: bool = True,
) -> dict[str, Any]:
    """``flwr run`` the app on ``link``, follow its log, return its final status."""
    run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())
    command = ["flwr", "run", str(APP_DIR), CONNECTION, "--format", "json"]
    if run_config:
        command += ["--run-config", run_config]
    # Flower's default reserves 2 CPUs per simulated client: one at a time on 2 cores.
    # Clients here run torch on one thread, so one CPU each runs two at once.
    command += [
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}",
    ]
    out = subprocess.run(command, env=link.env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"flwr run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    run_id = int(json.loads(out.stdout)["run-id"])
    log_command = ["flwr", "log", str(run_id), CONNECTION, "--stream"]
    subprocess.run(
        log_command,
        env=link.env,
        check=False,
        stdout=None if stream else subprocess.DEVNULL,
        stderr=None if stream else subprocess.DEVNULL,
    )
    return run_status(link, run_id)


def run_status(link: LocalSuperLink, run_id: int) -> dict[str, Any]:
    """The run's entry from ``flwr ls --run-id ID --format json``."""
    out = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=link.env,
        capture_output=True,
        text=True,
        check=True,
    )
    runs = json.loads(out.stdout)["runs"]
    return dict(runs[0])


def run_simulation(overrides: Sequence[str], *, stream: bool = True) -> tuple[RunConfig, dict[str, Any]]:
    """Validate, run, and return (config, final run status). Raises if it failed."""
    cfg, parsed = resolve_run_config(overrides)
    with tempfile.TemporaryDirectory(prefix="fedquant-sim-") as tmp:
        with simulation_superlink(Path(tmp)) as link:
            status = submit_and_follow(link, parsed, num_supernodes=cfg.num_supernodes, stream=stream)
        if status.get("status") != "finished:completed":
            log_text = (Path(tmp) / "superlink.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"run ended as {status.get('status')!r}:\n{log_text}")
    return cfg, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sims.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help='overrides in Flower syntax, e.g. "bits=2 num-server-rounds=5" (repeatable)',
    )
    args = parser.parse_args(argv)
    try:
        cfg, status = run_simulation(args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = Path(cfg.out_dir).resolve() / "results.json"
    summary = json.loads(results.read_text())["summary"]
    print(f"run {status.get('run-id')} {status.get('status')}; results in {results.parent}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
