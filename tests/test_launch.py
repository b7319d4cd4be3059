"""The launchers' shared parts, without Flower processes.

The ``flwr`` CLI helper (against a stand-in ``flwr`` script), and the process tree and
teardown of ``sims.launch.procs``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import parse_config_args

from sims.launch import flwr_cli
from sims.launch.flwr_cli import APP_DIR, FlwrCli
from sims.launch.procs import ProcessSet, descendants, is_alive, process_tree
from sims.launch.run import federation_config

# Stands in for the flwr CLI: records its arguments, answers as Flower 1.39 does.
FAKE_FLWR = """\
#!{python}
import json, os, sys, time
with open(os.environ["FAKE_FLWR_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
command = sys.argv[1]
if command == "run":
    print(json.dumps({{"success": True, "run-id": 7}}))
elif command == "log":
    time.sleep(float(os.environ.get("FAKE_FLWR_LOG_S", "0")))
    print("[fedquant] round 1: ...", flush=True)
    print("[fedquant] round 2: ...", flush=True)
elif command == "ls":
    print(json.dumps({{"runs": [{{"run-id": int(sys.argv[4]), "status": "finished:completed"}}]}}))
elif command == "stop":
    pass
else:
    sys.exit(3)
"""


@pytest.fixture
def fake_cli(tmp_path: Path) -> FlwrCli:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "flwr"
    script.write_text(FAKE_FLWR.format(python=sys.executable))
    script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["FAKE_FLWR_CALLS"] = str(tmp_path / "calls.jsonl")
    return FlwrCli(env, "test-link")


def _calls(cli: FlwrCli) -> list[list[str]]:
    text = Path(cli.env["FAKE_FLWR_CALLS"]).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_connect_writes_the_connection_flwr_reads(tmp_path: Path) -> None:
    env = {"FLWR_HOME": str(tmp_path)}
    cli = flwr_cli.connect(tmp_path, name="plain", address="127.0.0.1:9093", env=env)
    assert cli == FlwrCli(env, "plain")
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"] == {
        "default": "plain",
        "plain": {"address": "127.0.0.1:9093", "insecure": True},
    }
    ca = tmp_path / "certs" / 'ca "1".pem'  # a path TOML must escape
    flwr_cli.connect(tmp_path, name="tls", address="127.0.0.1:1", env=env, root_certificates=ca)
    connection = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["tls"]
    assert connection == {"address": "127.0.0.1:1", "root-certificates": str(ca.resolve())}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bits": 2, "lr": -0.5, "dp": False, "resume": True},
        {"out-dir": "/tmp/a dir\\with a backslash", "aggregator": "trimmed-mean"},
        {"out-dir": '/tmp/a "quoted" dir', "client-state-dir": "it's"},
    ],
)
def test_run_config_arg_parses_back_to_the_overrides(overrides: dict[str, Any]) -> None:
    arg = flwr_cli.run_config_arg(overrides)
    assert (parse_config_args([arg]) if arg else {}) == overrides


def test_run_config_arg_refuses_a_string_flower_cannot_parse() -> None:
    with pytest.raises(ValueError, match="both kinds of quote"):
        flwr_cli.run_config_arg({"out-dir": 'it\'s "quoted"'})


def test_submit_and_follow_streams_the_log_and_returns_the_status(
    fake_cli: FlwrCli, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    ticks: list[int] = []
    status = flwr_cli.submit_and_follow(
        fake_cli,
        {"bits": 4, "out-dir": "/x"},
        federation_config="num-supernodes=3",
        on_line=lines.append,
        on_tick=ticks.append,
    )
    assert status == {"run-id": 7, "status": flwr_cli.COMPLETED}
    assert [line.split(":")[0] for line in lines] == ["[fedquant] round 1", "[fedquant] round 2"]
    assert "[fedquant] round 2" in capsys.readouterr().out  # stream=True copies the log
    assert ticks and set(ticks) == {7}
    run, log, ls = _calls(fake_cli)
    assert run == [
        "run", str(APP_DIR), "test-link", "--format", "json",
        "--run-config", 'bits=4 out-dir="/x"',
        "--federation-config", "num-supernodes=3",
    ]  # fmt: skip
    assert log == ["log", "7", "test-link", "--stream"]
    assert ls == ["ls", "test-link", "--run-id", "7", "--format", "json"]


def test_follow_stops_a_run_past_its_timeout(fake_cli: FlwrCli) -> None:
    cli = FlwrCli({**fake_cli.env, "FAKE_FLWR_LOG_S": "60"}, fake_cli.connection)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="run 7"):
        flwr_cli.follow(cli, 7, stream=False, timeout_s=0.5)
    assert time.monotonic() - start < 30  # the log follower was ended, not waited for
    assert ["stop", "7", "test-link"] in _calls(cli)


def test_a_failing_flwr_command_names_its_output(fake_cli: FlwrCli) -> None:
    with pytest.raises(RuntimeError, match=r"flwr nope failed \(3\)"):
        fake_cli("nope")
    assert fake_cli("nope", check=False).returncode == 3


def test_federation_config_of_a_simulation() -> None:
    local = federation_config(num_supernodes=5, client_cpus=1, client_gpus=0.0, ray_attached=False)
    assert local == "num-supernodes=5 client-resources-num-cpus=1"
    attached = federation_config(
        num_supernodes=5, client_cpus=2, client_gpus=0.5, ray_attached=True
    )
    assert parse_config_args([attached]) == {
        "num-supernodes": 5,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": 0.5,
        "init-args-logging-level": "INFO",
    }


# A leader that starts a child in a session of its own (as Flower's SuperExec is), which
# starts a grandchild; the leader prints both PIDs and waits.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; "
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
         "print(g.pid, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    grandchild = int(child.stdout.readline())
    print(child.pid, grandchild, flush=True)
    time.sleep(300)
    """
)


def test_process_set_stops_children_in_other_sessions(tmp_path: Path) -> None:
    processes = ProcessSet()
    leader = processes.start(
        "tree", [sys.executable, "-c", TREE], env=os.environ, log=tmp_path / "tree.log"
    )
    try:
        deadline = time.monotonic() + 30
        while not leader.log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        child, grandchild = map(int, leader.log.read_text().split())
        assert os.getsid(child) != os.getsid(leader.process.pid)  # another session
        below = descendants(leader.process.pid)
        assert below[:1] == [child] and grandchild in below  # breadth first
        assert process_tree(leader.process.pid) == [leader.process.pid, *below]
    finally:
        processes.stop_all(grace_s=5.0)
    assert processes.alive() == []
    assert not any(is_alive(pid) for pid in (leader.process.pid, child, grandchild))
    assert leader.process.returncode is not None


def test_is_alive_says_no_for_an_ended_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not is_alive(proc.pid)
    assert is_alive(os.getpid())
