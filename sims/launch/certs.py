"""TLS certificates and SuperNode authentication keys for a Flower deployment.

    python -m sims.launch.certs --out certs --host 127.0.0.1 --host localhost
    python -m sims.launch.certs --out certs --host superlink.example.org --supernode-keys 3

Writes a private certificate authority (``ca.crt``, ``ca.key``) and a server
certificate signed by it (``server.crt``, ``server.key``) whose subject alternative
names are the given hosts: IP addresses become ``IPAddress`` entries, anything else
``DNSName`` entries. A client verifies the SuperLink against ``ca.crt``, so every name
or address the SuperNodes and the ``flwr`` CLI use to reach the SuperLink must be
listed with ``--host``. The SuperLink serves its Fleet API (gRPC) and its Runtime
and Control HTTP API with ``server.crt``; ``ca.key`` is needed only to sign. Include
127.0.0.1 too when the SuperLink listens on 0.0.0.0: Flower 1.39's SuperExec (which
starts the ServerApp) connects to the SuperLink's Runtime API at 127.0.0.1 over the
same TLS.

``--supernode-keys N`` also writes N SuperNode key pairs (``supernode-i``,
``supernode-i.pub``): ECDSA on NIST P-384 in OpenSSH format, the format that
Flower 1.39 reads for ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register PUBLIC_KEY``.

Keys are ECDSA P-384 throughout; private key files are created with mode 0600.
Caveat: the CA and server key are unencrypted on disk (Flower reads them without a
passphrase). Keep ``ca.key`` off the SuperLink machine in a real deployment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate lifetime browsers accept


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA certificate and a server certificate/key signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class AuthKeys:
    """A SuperNode's authentication key pair (OpenSSH ECDSA P-384)."""

    private_key: Path
    public_key: Path


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts``: IPAddress for IPv4/IPv6 literals, DNSName otherwise.

    Raises ValueError naming the host for an empty or blank name, and when no host
    is given (a server certificate without SANs verifies against nothing).
    """
    if not hosts:
        raise ValueError("`hosts` must name at least one host. Found [].")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host.strip() or any(c.isspace() for c in host):
            raise ValueError(f"`host` must be a host name or IP address. Found {host!r}.")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(
    *, common_name: str = "fedquant CA", days: int = CA_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (basicConstraints CA:TRUE, pathlen 0) and its key."""
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hosts: Sequence[str],
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts`` (its SANs), signed by the CA."""
    sans = subject_alt_names(hosts)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_tls_files(out: Path, *, hosts: Sequence[str]) -> TlsFiles:
    """Write ca.crt, ca.key, server.crt and server.key for ``hosts`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts=hosts)
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pkcs8_pem(ca_key))
    _write_private(files.server_key, _pkcs8_pem(server_key))
    return files


def write_supernode_keys(out: Path, name: str) -> AuthKeys:
    """Write ``out/name`` (OpenSSH private key) and ``out/name.pub`` (public key)."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    keys = AuthKeys(out / name, out / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys.public_key.write_bytes(public + f" {name}\n".encode())
    return keys


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file readable by its owner only (created 0600, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Write a CA, a server certificate and optional SuperNode keys; 2 on a bad host."""
    parser = argparse.ArgumentParser(
        prog="python -m sims.launch.certs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or IP address the SuperLink is reached at (repeatable; the SANs)",
    )
    parser.add_argument(
        "--supernode-keys",
        type=int,
        default=0,
        metavar="N",
        help="also write N SuperNode authentication key pairs (default 0)",
    )
    args = parser.parse_args(argv)
    if args.supernode_keys < 0:
        parser.error(f"--supernode-keys must be >= 0. Found {args.supernode_keys}.")
    try:
        files = write_tls_files(args.out, hosts=args.host)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate     {files.ca_cert}  (give to SuperNodes and the flwr CLI)")
    print(f"CA key             {files.ca_key}  (keep offline; signs server certificates)")
    print(f"server certificate {files.server_cert}  (SANs: {', '.join(args.host)})")
    print(f"server key         {files.server_key}")
    if "127.0.0.1" not in args.host:
        print(
            "note: a SuperLink listening on 0.0.0.0 is reached by its own SuperExec at "
            "127.0.0.1: add --host 127.0.0.1 in that case"
        )
    for i in range(args.supernode_keys):
        keys = write_supernode_keys(args.out, f"supernode-{i}")
        print(f"SuperNode {i} keys   {keys.private_key}, {keys.public_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
