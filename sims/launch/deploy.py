"""Deploy fedquant over gRPC on this machine: one SuperLink and N SuperNodes.

    python -m sims.launch.deploy --supernodes 2 --run-config "num-server-rounds=2 bits=4"
    python -m sims.launch.deploy --supernodes 2 --secure      # TLS + SuperNode authentication

Unlike ``sims.launch.run`` (Flower's simulation runtime), this starts Flower's deployment
runtime, the same processes a multi-machine deployment runs: a ``flower-superlink``
whose Fleet API speaks gRPC, and N ``flower-supernode`` processes, each with its own
MNIST partition (``--node-config "partition-id=i num-partitions=N state-dir=..."``;
the ClientApp keeps the node's privacy accountant in ``state-dir``). The app (this
repository) is submitted with ``flwr run``, its log followed with ``flwr log
--stream``, and the run must end as "finished:completed" in ``flwr ls`` (``flwr run
--stream`` exits 0 even when the ServerApp fails).

Every listener binds 127.0.0.1 on a free port (Flower's defaults: 0.0.0.0 for the
Fleet API, fixed ports for the HTTP APIs): the SuperLink's Fleet API
(``--fleet-api-address``) and its Runtime + Control HTTP API (``--host/--port``,
Flower 1.39 serves both on one port; the health server stays off), and each
SuperNode's Runtime HTTP API (``--host/--port``). Apps run in subprocess isolation
with runtime dependency installation off.

With ``--secure``, a private CA and a server certificate for 127.0.0.1/localhost are
made (``sims.launch.certs``); the SuperLink serves TLS and requires SuperNode
authentication; each SuperNode gets an ECDSA P-384 key whose public half is
registered with ``flwr supernode register`` before it starts; SuperNodes and the
``flwr`` CLI verify the SuperLink against the CA (``root-certificates``).

Run-config overrides are validated before anything starts (``num-supernodes`` is set
to N). Every process started here is stopped by PID, together with its process
group and the processes it started in other sessions (Flower's SuperExec and the
app processes), also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedquant.config import ConfigError, RunConfig
from sims.launch import flwr_cli
from sims.launch.certs import AuthKeys, TlsFiles, write_supernode_keys, write_tls_files
from sims.launch.flwr_cli import COMPLETED, FlwrCli
from sims.launch.procs import (
    LAUNCH_ERRORS,
    Launched,
    ProcessSet,
    flower_env,
    free_port,
    report_launch_error,
    wait_for_port,
)
from sims.launch.run import resolve_run_config

CONNECTION = "fedquant-deploy"
HOST = "127.0.0.1"
CERT_HOSTS = ("127.0.0.1", "localhost")
NODE_WAIT_S = 60.0  # SuperNodes must all be online this soon after they start
# A SuperNode that cannot reach the SuperLink (or is refused) gives up after this
# long instead of retrying forever (Flower's default: no limit).
SUPERNODE_MAX_WAIT_S = 30.0
DEFAULT_OUT_DIR = "outputs/deploy"


# -- the deployment ----------------------------------------------------------------


@dataclass
class SuperNode:
    """One SuperNode started here."""

    index: int
    launched: Launched
    state_dir: Path
    keys: AuthKeys | None
    node_id: int | None  # from registration (secure mode only)


@dataclass
class Deployment:
    """A SuperLink (and the SuperNodes started on it) that this process owns."""

    workdir: Path
    flwr_home: Path
    cli: FlwrCli  # the ``flwr`` CLI, connected to the SuperLink's control API
    fleet_address: str
    control_address: str
    tls: TlsFiles | None
    superlink: Launched
    processes: ProcessSet
    supernodes: list[SuperNode] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)  # handed out to listeners so far

    def free_port(self) -> int:
        """A free loopback port not yet handed to another listener of this deployment."""
        port = free_port()
        while port in self.ports:
            port = free_port()
        self.ports.add(port)
        return port

    @property
    def secure(self) -> bool:
        """Whether the SuperLink serves TLS and requires SuperNode authentication."""
        return self.tls is not None


def _deployment_env(flwr_home: Path) -> dict[str, str]:
    env = flower_env(flwr_home)
    # Flower starts a second, gRPC control API (default 0.0.0.0:9093) only when asked.
    env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    return env


def superlink_command(*, fleet_port: int, http_port: int, tls: TlsFiles | None) -> list[str]:
    """``flower-superlink`` in deployment mode, every listener on 127.0.0.1."""
    command = ["flower-superlink"]
    if tls is None:
        command += ["--insecure"]
    else:
        command += [
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
            "--enable-supernode-auth",
        ]  # fmt: skip
    return command + [
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", f"{HOST}:{fleet_port}",
        "--host", HOST,  # Runtime (ServerApp) and Control (flwr CLI) HTTP API
        "--port", str(http_port),
    ]  # fmt: skip


@contextlib.contextmanager
def deployment_superlink(workdir: Path, *, secure: bool) -> Iterator[Deployment]:
    """Start a deployment SuperLink on free loopback ports; stop all it owns on exit.

    The SuperNodes started with ``start_supernode`` on the yielded deployment are
    stopped too (before the SuperLink), as is everything they started.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    tls = write_tls_files(workdir / "certs", hosts=CERT_HOSTS) if secure else None
    fleet_port, http_port = free_port(), free_port()
    while http_port == fleet_port:
        http_port = free_port()
    control_address = f"{HOST}:{http_port}"
    env = _deployment_env(flwr_home)
    cli = flwr_cli.connect(
        flwr_home,
        name=CONNECTION,
        address=control_address,
        env=env,
        root_certificates=tls.ca_cert if tls is not None else None,
    )
    processes = ProcessSet()
    try:
        link = processes.start(
            "superlink",
            superlink_command(fleet_port=fleet_port, http_port=http_port, tls=tls),
            env=env,
            log=workdir / "superlink.log",
        )
        wait_for_port(HOST, http_port, link.process, link.log)
        wait_for_port(HOST, fleet_port, link.process, link.log)
        yield Deployment(
            workdir,
            flwr_home,
            cli,
            f"{HOST}:{fleet_port}",
            control_address,
            tls,
            link,
            processes,
            ports={fleet_port, http_port},
        )
    finally:
        processes.stop_all()


def register_supernode(dep: Deployment, public_key: Path) -> int:
    """``flwr supernode register``: allow the key to join; returns the node id."""
    out = dep.cli("supernode", "register", str(public_key), CONNECTION, "--format", "json")
    reply = json.loads(out.stdout)
    if not reply.get("success"):
        raise RuntimeError(f"registering {public_key} failed: {reply}")
    return int(reply["node-id"])


def supernode_command(
    dep: Deployment,
    *,
    index: int,
    num_partitions: int,
    state_dir: Path,
    port: int,
    keys: AuthKeys | None,
    insecure: bool,
    max_retries: int | None,
    max_wait_s: float,
) -> list[str]:
    """``flower-supernode`` for partition ``index``, its Runtime API on 127.0.0.1:port."""
    node_config = (
        f"partition-id={index} num-partitions={num_partitions} "
        f"state-dir={json.dumps(str(state_dir))}"
    )
    command = ["flower-supernode", "--grpc-rere", "--superlink", dep.fleet_address]
    if insecure:
        command += ["--insecure"]
    elif dep.tls is not None:
        command += ["--root-certificates", str(dep.tls.ca_cert)]
    if keys is not None:
        command += ["--auth-supernode-private-key", str(keys.private_key)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command + [
        "--max-wait-time", str(max_wait_s),
        "--node-config", node_config,
        "--isolation", "subprocess",
        "--host", HOST,  # the SuperNode's Runtime HTTP API (its ClientApps connect here)
        "--port", str(port),
    ]  # fmt: skip


def start_supernode(
    dep: Deployment,
    index: int,
    *,
    num_partitions: int,
    register: bool = True,
    insecure: bool | None = None,
    max_retries: int | None = None,
    max_wait_s: float = SUPERNODE_MAX_WAIT_S,
    name: str | None = None,
) -> SuperNode:
    """Start a SuperNode for partition ``index`` (not waiting for it to connect).

    In secure mode it gets its own key pair in ``workdir/keys``; with ``register``
    its public key is registered first (``register=False`` makes a node the
    SuperLink must refuse). ``insecure`` defaults to the deployment's mode
    (``insecure=True`` on a secure deployment makes a plaintext node, also refused).
    """
    name = name or f"supernode-{index}"
    plaintext = not dep.secure if insecure is None else insecure
    keys, node_id = None, None
    if dep.secure and not plaintext:
        keys = write_supernode_keys(dep.workdir / "keys", name)
        if register:
            node_id = register_supernode(dep, keys.public_key)
    state_dir = dep.workdir / name
    state_dir.mkdir(parents=True, exist_ok=True)
    # Each SuperNode caches the app bundles it runs in a FLWR_HOME of its own.
    node_home = dep.workdir / "flwr-home-nodes" / name
    node_home.mkdir(parents=True, exist_ok=True)
    command = supernode_command(
        dep,
        index=index,
        num_partitions=num_partitions,
        state_dir=state_dir.resolve(),
        port=dep.free_port(),
        keys=keys,
        insecure=plaintext,
        max_retries=max_retries,
        max_wait_s=max_wait_s,
    )
    launched = dep.processes.start(
        name, command, env=_deployment_env(node_home), log=dep.workdir / f"{name}.log"
    )
    node = SuperNode(index, launched, state_dir, keys, node_id)
    dep.supernodes.append(node)
    return node


def list_supernodes(dep: Deployment) -> list[dict[str, Any]]:
    """``flwr supernode list --format json``: the nodes the SuperLink knows."""
    out = dep.cli("supernode", "list", CONNECTION, "--format", "json")
    return list(json.loads(out.stdout).get("nodes", []))


def online_node_ids(dep: Deployment) -> set[int]:
    """IDs of the nodes whose status is "online"."""
    return {int(n["node-id"]) for n in list_supernodes(dep) if n.get("status") == "online"}


def wait_for_supernodes(
    dep: Deployment, nodes: Sequence[SuperNode], *, timeout_s: float = NODE_WAIT_S
) -> set[int]:
    """Wait until ``len(nodes)`` nodes are online; raise if one of ``nodes`` exits."""
    deadline = time.monotonic() + timeout_s
    online: set[int] = set()
    while time.monotonic() < deadline:
        for node in nodes:
            if node.launched.process.poll() is not None:
                tail = node.launched.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"{node.launched.name} exited with {node.launched.process.returncode}:\n{tail}"
                )
        online = online_node_ids(dep)
        if len(online) >= len(nodes):
            return online
        time.sleep(1.0)
    raise TimeoutError(
        f"{len(online)} of {len(nodes)} SuperNodes online after {timeout_s:.0f} s; "
        f"see the logs in {dep.workdir}"
    )


def submit_deployment(
    dep: Deployment,
    overrides: Mapping[str, Any],
    *,
    stream: bool = True,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the app on ``dep`` (``flwr_cli.submit_and_follow``); its final ``flwr ls`` entry.

    The SuperNodes need not be online yet: the ServerApp waits for
    ``num-supernodes`` of them. A SuperNode that exits during the run is reported
    (once) and the run goes on: the ServerApp counts its replies as missing and waits
    for it at most ``round-timeout`` per round. ``timeout_s`` bounds the whole run
    (``flwr stop``, then TimeoutError). ``on_line`` is called with each line of the
    log as it arrives.
    """
    reported: set[str] = set()

    def report_exited(run_id: int) -> None:
        for node in dep.supernodes:
            launched = node.launched
            if launched.process.poll() is not None and launched.name not in reported:
                reported.add(launched.name)
                print(
                    f"warning: {launched.name} exited with {launched.process.returncode}"
                    f" during run {run_id}; the run goes on without it (log: {launched.log})",
                    file=sys.stderr,
                )

    return flwr_cli.submit_and_follow(
        dep.cli,
        overrides,
        stream=stream,
        timeout_s=timeout_s,
        on_line=on_line,
        on_tick=report_exited,
    )


def deploy_overrides(
    overrides: Sequence[str], *, supernodes: int
) -> tuple[RunConfig, dict[str, Any]]:
    """Validate the overrides with ``num-supernodes`` set to the number of SuperNodes.

    ``out-dir`` defaults to outputs/deploy (made absolute). Raises ConfigError (the
    key and value named) before anything starts; also when the overrides set
    ``num-supernodes`` to another number than ``supernodes``, and for
    ``dp-noise-seeded = true``: real clients' noise must stay secret from the server.
    """
    if supernodes < 1:
        raise ConfigError("num-supernodes", supernodes, "--supernodes must be >= 1")
    from flwr.common.config import parse_config_args

    given = parse_config_args(list(overrides)) if overrides else {}
    if "num-supernodes" in given and given["num-supernodes"] != supernodes:
        raise ConfigError(
            "num-supernodes",
            given["num-supernodes"],
            f"is set by --supernodes in a deployment (here {supernodes})",
        )
    if given.get("dp-noise-seeded") is True:
        raise ConfigError(
            "dp-noise-seeded",
            True,
            "refused in a deployment: seeded DP noise can be reproduced by the server, "
            "so real clients' data would not be private against it",
        )
    extra = [f"num-supernodes={supernodes}"]
    if "out-dir" not in given:
        extra.append(f"out-dir={json.dumps(DEFAULT_OUT_DIR)}")
    return resolve_run_config([*overrides, *extra])


@dataclass(frozen=True)
class DeployResult:
    """A finished deployment run: its config, ``flwr ls`` status and results.json."""

    config: RunConfig
    status: dict[str, Any]
    results: dict[str, Any]
    wall_s: float  # from starting the SuperNodes until the run's log ended


def deploy_and_run(
    overrides: Sequence[str],
    *,
    supernodes: int,
    secure: bool = False,
    workdir: Path | None = None,
    stream: bool = True,
    timeout_s: float | None = None,
) -> DeployResult:
    """Validate, start the SuperLink and SuperNodes, run the app, stop everything.

    ``workdir`` keeps the SuperNodes' state (privacy accountants), logs, certificates
    and keys; without it a temporary folder is used and removed. Raises RuntimeError
    or TimeoutError if the run does not finish as completed.
    """
    cfg, parsed = deploy_overrides(overrides, supernodes=supernodes)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fedquant-deploy-"))
            )
        workdir = workdir.resolve()
        dep = stack.enter_context(deployment_superlink(workdir, secure=secure))
        start = time.monotonic()
        for i in range(supernodes):
            start_supernode(dep, i, num_partitions=supernodes)
        status = submit_deployment(dep, parsed, stream=stream, timeout_s=timeout_s)
        wall_s = time.monotonic() - start
        if status.get("status") != COMPLETED:
            log_text = dep.superlink.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"run ended as {status.get('status')!r}:\n{log_text}")
    results = json.loads((Path(parsed["out-dir"]) / "results.json").read_text())
    return DeployResult(cfg, status, results, wall_s)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parser() -> argparse.ArgumentParser:
    """The launcher's command line."""
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m sims.launch.deploy", description=doc)
    p.add_argument(
        "--supernodes", "-n", type=int, default=2, help="SuperNodes to start (default 2)"
    )
    p.add_argument(
        "--secure", action="store_true", help="TLS (a private CA) and SuperNode authentication"
    )
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help='overrides in Flower syntax, e.g. "bits=2 num-server-rounds=5" (repeatable)',
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep logs, certificates, keys and SuperNode state here (default: a temporary folder)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds the run may take (default: no limit)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Deploy and run once from the command line.

    Exit status: 0 when the run completed, 2 for a bad run-config value (nothing
    started; the message names the key and the value), 1 when the run failed, 130
    when interrupted (Ctrl-C or SIGTERM: every process started is stopped first).
    """
    args = parser().parse_args(argv)
    # Stop the processes on SIGTERM too; the caller's handler is back on return.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = deploy_and_run(
            args.run_config,
            supernodes=args.supernodes,
            secure=args.secure,
            workdir=args.workdir,
            timeout_s=args.timeout,
        )
    except LAUNCH_ERRORS as err:
        return report_launch_error(err)
    except KeyboardInterrupt:
        print("interrupted; stopped every process started", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    mode = "TLS + SuperNode auth" if args.secure else "insecure"
    out_dir = Path(result.config.run.out_dir)
    print(
        f"run {result.status.get('run-id')} {result.status.get('status')} over gRPC "
        f"({args.supernodes} SuperNodes, {mode}) in {result.wall_s:.1f} s; results in {out_dir}"
    )
    print(json.dumps(result.results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
