"""End to end through Flower's deployment runtime: a SuperLink and SuperNodes over gRPC.

Real processes on free 127.0.0.1 ports with a private FLWR_HOME under tmp_path (the
two deployments are marked slow: ``make test-slow``, which CI runs). Every
process a test starts is stopped by PID in the ``started`` fixture's teardown, which
then asserts that none of them (nor the SuperExec and app processes they started)
still runs, whether or not the test passed.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedquant.config import ConfigError
from sims.launch import deploy as launch_deploy
from sims.launch.certs import subject_alt_names, write_supernode_keys, write_tls_files
from sims.launch.deploy import (
    Deployment,
    SuperNode,
    deploy_overrides,
    deployment_superlink,
    list_supernodes,
    online_node_ids,
    start_supernode,
    submit_deployment,
)
from sims.launch.procs import ProcessSet, descendants

# 2 rounds of plain local SGD with 4-bit updates: the fastest run that shows learning.
RUN_CONFIG = 'num-server-rounds=2 bits=4 local-steps=20 dp=false quant-policy="none"'
RUN_TIMEOUT_S = 150.0
REFUSED_EXIT_TIMEOUT_S = 60.0


@pytest.fixture
def started() -> Iterator[list[ProcessSet]]:
    """Collects each deployment's processes; stops them and checks none is left."""
    sets: list[ProcessSet] = []
    try:
        yield sets
    finally:
        for processes in sets:
            processes.stop_all()
        left = [pid for processes in sets for pid in processes.alive()]
        assert left == [], f"processes still running after teardown: {left}"


def _check_results(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == 2 and r["rejected"] == 0 for r in rounds)
    # Chance is 0.1; two rounds over gRPC must clearly beat the initial model.
    assert rounds[-1]["accuracy"] > 0.6
    assert rounds[-1]["accuracy"] > results["initial"]["accuracy"] + 0.3
    # 4-bit packed codes: about 4/32 of the float32 payload, as Flower serializes it.
    assert results["summary"]["uplink-fraction-of-float32"] <= 0.13
    assert results["config"]["num-supernodes"] == 2


def _listening_addresses(pids: set[int]) -> list[str]:
    """host:port of every TCP socket in LISTEN state that one of ``pids`` holds."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            links = [fd.readlink() for fd in fd_dir.iterdir()]
        except OSError:
            continue
        inodes |= {str(link)[8:-1] for link in links if str(link).startswith("socket:[")}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                found.append(_decode_proc_address(local))
    return found


def _decode_proc_address(hex_address: str) -> str:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # /proc/net/tcp* stores each 32-bit word of the address in host byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if sys.byteorder == "big":
        words = raw
    host = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)
    return f"{host}:{int(port_hex, 16)}"


def _assert_loopback_only(dep: Deployment) -> None:
    """Every socket the deployment's processes listen on is bound to 127.0.0.1."""
    if not Path("/proc/net/tcp").exists():
        return  # not Linux: the ports are still all passed explicitly
    leaders = {item.process.pid for item in dep.processes.launched}
    pids = leaders | {pid for leader in leaders for pid in descendants(leader)}
    addresses = _listening_addresses(pids)
    # The SuperLink's HTTP API and Fleet API, and one HTTP API per running SuperNode.
    running = sum(1 for n in dep.supernodes if n.launched.process.poll() is None)
    assert len(addresses) >= 2 + running, addresses
    hosts = {a.rsplit(":", 1)[0] for a in addresses}
    assert hosts <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses


def _tls_server_certificate(address: str, ca_cert: Path) -> dict[str, Any]:
    """Handshake with ``address`` verifying its certificate against the CA."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return dict(tls.getpeercert() or {})


def _wait_refused(node: SuperNode) -> str:
    """Wait for a SuperNode that must be refused to exit; return its log."""
    try:
        code = node.launched.process.wait(timeout=REFUSED_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{node.launched.name} was not refused within {REFUSED_EXIT_TIMEOUT_S} s")
    log = node.launched.log.read_text(errors="replace")
    assert code != 0, log
    assert "SuperNode ID:" not in log  # the line a SuperNode logs once it is activated
    return log


@pytest.mark.slow  # ~75 s on 2 cores: `make test-slow` (CI runs it)
def test_insecure_grpc_deployment(tmp_path: Path, started: list[ProcessSet]) -> None:
    out = tmp_path / "out"
    _, overrides = deploy_overrides([RUN_CONFIG, f'out-dir="{out}"'], supernodes=2)
    with deployment_superlink(tmp_path / "deploy", secure=False) as dep:
        started.append(dep.processes)
        config = tomllib.loads((dep.flwr_home / "config.toml").read_text())
        assert config["superlink"]["fedquant-deploy"]["insecure"] is True
        nodes = [start_supernode(dep, i, num_partitions=2) for i in range(2)]
        status = submit_deployment(dep, overrides, stream=False, timeout_s=RUN_TIMEOUT_S)
        assert status["status"] == "finished:completed"
        assert all(n.launched.process.poll() is None for n in nodes)
        assert len(online_node_ids(dep)) == 2
        _assert_loopback_only(dep)
    _check_results(out)


@pytest.mark.slow  # ~95 s on 2 cores: `make test-slow` (CI runs it)
def test_secure_grpc_deployment_refuses_unknown_and_plaintext_supernodes(
    tmp_path: Path, started: list[ProcessSet]
) -> None:
    out = tmp_path / "out"
    _, overrides = deploy_overrides([RUN_CONFIG, f'out-dir="{out}"'], supernodes=2)
    with deployment_superlink(tmp_path / "deploy", secure=True) as dep:
        started.append(dep.processes)
        assert dep.tls is not None
        connection = tomllib.loads((dep.flwr_home / "config.toml").read_text())
        connection = connection["superlink"]["fedquant-deploy"]
        assert "insecure" not in connection
        assert Path(connection["root-certificates"]) == dep.tls.ca_cert.resolve()
        # Both APIs serve TLS with a certificate the private CA vouches for.
        for address in (dep.fleet_address, dep.control_address):
            cert = _tls_server_certificate(address, dep.tls.ca_cert)
            assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]

        nodes = [start_supernode(dep, i, num_partitions=2) for i in range(2)]
        registered = {n.node_id for n in nodes}
        assert None not in registered and len(registered) == 2
        # A node with a valid TLS set-up and its own key that was never registered,
        # and a node that speaks plaintext gRPC: both must be refused.
        unknown = start_supernode(
            dep, 1, num_partitions=2, register=False, name="unregistered", max_retries=1
        )
        plaintext = start_supernode(
            dep, 0, num_partitions=2, insecure=True, name="plaintext", max_retries=1
        )
        assert unknown.keys is not None and plaintext.keys is None
        status = submit_deployment(dep, overrides, stream=False, timeout_s=RUN_TIMEOUT_S)
        assert status["status"] == "finished:completed"

        assert "Failed to activate SuperNode" in _wait_refused(unknown)
        assert "UNAVAILABLE" in _wait_refused(plaintext)
        # Only the two registered nodes ever joined the federation.
        assert {int(n["node-id"]) for n in list_supernodes(dep)} == registered
        assert online_node_ids(dep) == registered
        _assert_loopback_only(dep)
    _check_results(out)


@pytest.mark.parametrize(
    ("overrides", "supernodes", "key"),
    [
        (["bits=9"], 2, "bits"),
        (["no-such-key=1"], 2, "no-such-key"),
        (["num-supernodes=2"], 3, "num-supernodes"),  # set by --supernodes only
        ([], 0, "num-supernodes"),
        (["dp-noise-seeded=true"], 2, "dp-noise-seeded"),  # real clients keep noise secret
    ],
)
def test_deploy_overrides_name_the_bad_key(overrides: list[str], supernodes: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        deploy_overrides(overrides, supernodes=supernodes)
    assert err.value.key == key


def test_deploy_rejects_bad_config_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("a SuperLink was started for a config that must be rejected")

    monkeypatch.setattr(launch_deploy, "deployment_superlink", must_not_start)
    workdir = tmp_path / "deploy"
    handler = signal.getsignal(signal.SIGTERM)
    assert launch_deploy.main(["--workdir", str(workdir), "--run-config", "bits=9"]) == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # main gives the handler back
    out = capsys.readouterr()
    assert "'bits' = 9" in out.err
    assert "SuperLink" not in out.out + out.err
    assert not workdir.exists()  # no certificate, log or process was made


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    files = write_tls_files(tmp_path, hosts=["127.0.0.1", "localhost", "::1"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="host"):
        subject_alt_names(["bad host"])
    with pytest.raises(ValueError, match="hosts"):
        subject_alt_names([])


def test_supernode_keys_are_openssh_p384(tmp_path: Path) -> None:
    keys = write_supernode_keys(tmp_path, "node")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert keys.private_key.stat().st_mode & 0o777 == 0o600
