"""The launcher attaches a simulation to a running Ray cluster instead of starting Ray.

A real head node (``ray start --head --block``) on loopback, with every port it lets
us choose set explicitly, a private temp dir, and its own process group; the test
stops that group by the head's PID and checks nothing of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sims.launch.procs import free_port, parent_pids, process_tree
from sims.launch.run import run_simulation

pytestmark = pytest.mark.slow  # ~2 min on 2 cores: `make test-slow` (CI runs it)

RAY = Path(sys.executable).parent / "ray"
HEAD_START_TIMEOUT_S = 60.0
# Ray puts unix sockets at TEMP/session_<date>_<pid>/sockets/plasma_store (~66 more
# characters); Linux allows 107 bytes in a socket path.
MAX_TEMP_DIR_LEN = 40


@dataclass
class RayHead:
    process: subprocess.Popen[bytes]
    address: str
    temp_dir: Path
    log: Path

    def session_dir(self) -> Path:
        (session,) = self.temp_dir.glob("session_2*")  # one head, one session
        return session


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _all_pids() -> list[int]:
    return list(parent_pids())


def _group_members(pgid: int) -> set[int]:
    return {pid for pid in _all_pids() if _pgid(pid) == pgid}


def _session_pids(head: RayHead) -> set[int]:
    """PIDs the head's session logged: ``..._PID.log`` and ``...-PID.out/.err`` files.

    Drivers (``python-core-driver-*``) are left out: they are clients of the cluster
    that belong to whoever started them (here the simulation's SuperLink group).
    """
    pids = set()
    with contextlib.suppress(ValueError, OSError):
        for f in (head.session_dir() / "logs").iterdir():
            m = re.search(r"[_-](\d+)\.(log|out|err)$", f.name)
            if m and not f.name.startswith("python-core-driver-"):
                pids.add(int(m.group(1)))
    return pids


def _mentions(pid: int, text: str) -> bool:
    with contextlib.suppress(OSError):
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return False


def _ray_processes(head: RayHead) -> set[int]:
    """Every live process of this head.

    Its process tree, and any process named in its session's logs or running with its
    temp dir on the command line.
    """
    pids = set(process_tree(head.process.pid))
    pids |= {p for p in _session_pids(head) if _pgid(p) is not None}
    pids |= {p for p in _all_pids() if _mentions(p, str(head.temp_dir))}
    return {p for p in pids if _pgid(p) is not None}


def _stop_head(head: RayHead, grace_s: float = 20.0) -> set[int]:
    """Stop the head's process group (TERM, then KILL); any escaped daemon by PID.

    Returns the PIDs that were outside the head's process group.
    """
    known = _ray_processes(head)
    escaped = {p for p in known if _pgid(p) != head.process.pid}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_members(head.process.pid):
        head.process.poll()  # reap the leader
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=10)
    for pid in escaped | (_session_pids(head) - {os.getpid()}):
        # Still ours only if it still shows our temp dir or our group.
        if _mentions(pid, str(head.temp_dir)) or _pgid(pid) == head.process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return escaped


@pytest.fixture
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    temp_dir = tmp_path_factory.mktemp("ray")
    short = len(str(temp_dir)) > MAX_TEMP_DIR_LEN
    if short:
        temp_dir = Path(tempfile.mkdtemp(prefix="fqray-", dir="/tmp"))
    port = free_port()
    worker_ports = sorted({free_port() for _ in range(24)})
    command = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--num-cpus", "2",
        "--include-dashboard", "false",
        "--disable-usage-stats",
        "--temp-dir", str(temp_dir),
        "--ray-client-server-port", str(free_port()),
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--worker-port-list", ",".join(map(str, worker_ports)),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    log = temp_dir / "head.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(process, f"127.0.0.1:{port}", temp_dir, log)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield head
    finally:
        escaped = _stop_head(head)
        left = _group_members(process.pid)
        if short:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the head's group survived: {sorted(left)}"
        assert not escaped, f"ray processes outside the head's process group: {sorted(escaped)}"


@contextlib.contextmanager
def _sample_processes(head: RayHead, every_s: float = 0.5) -> Iterator[dict[int, tuple[str, int]]]:
    """While the block runs, record {pid: (cmdline, pgid)} of the head's processes."""
    seen: dict[int, tuple[str, int]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            for pid in _ray_processes(head):
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    pgid = _pgid(pid)
                    if pgid is not None:
                        seen[pid] = (cmd.decode(errors="replace")[:80], pgid)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def test_simulation_attaches_to_running_ray_cluster(
    ray_head: RayHead, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with _sample_processes(ray_head) as seen:
        _, status = run_simulation(
            [
                "num-supernodes=4 fraction-train=1.0 num-server-rounds=2 local-steps=3",
                'batch-size=32 dp=false quant-policy="none" eval-every=2',
                f'out-dir="{out}"',
            ],
            stream=True,  # the run's log (Ray's driver lines included) goes to our stdout
            ray_address=ray_head.address,
            workdir=tmp_path / "sim",
        )
    run_log = capfd.readouterr().out
    assert status["status"] == "finished:completed"
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["accepted"] for r in rounds] == [4, 4]

    # Evidence that the clients ran on this head, not on a Ray the run started itself:
    # (1) Ray's driver in flwr-simulation says it joined an existing cluster, at our port;
    port = ray_head.address.rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port}", run_log), (
        run_log
    )
    assert "Started a local Ray instance" not in run_log
    # (2) the head's session logged a driver other than us and the client actors' workers.
    logs = ray_head.session_dir() / "logs"
    drivers = [int(f.stem.rsplit("_", 1)[1]) for f in logs.glob("python-core-driver-*.log")]
    assert drivers and os.getpid() not in drivers
    actor_logs = [
        f for f in logs.glob("worker-*.out") if ":actor_name:ClientAppActor" in f.read_text()
    ]
    assert len(actor_logs) >= 1
    # (3) the head ran the actors, and every process it had, actor workers included,
    # was in its process group (so killpg of the head's PID reaches them all).
    assert any("ClientAppActor" in cmd for cmd, _ in seen.values()), seen
    outside = {pid: v for pid, v in seen.items() if v[1] != ray_head.process.pid}
    assert not outside, outside
