"""A private CA per mesh and one certificate per part, for internal mutual TLS (llmesh/tls.py).

`llmesh up` writes them into <state dir>/tls on every start: a fresh CA each time, so certificates of an earlier
mesh (or of another mesh on the same host) are not trusted by this one. Keys are ECDSA P-256, written 0600; the
CA's key is written too (0600) only so an operator can issue a certificate for a tool by hand, and nothing
running reads it. Each certificate is good for both ends of a connection (serverAuth and clientAuth), with the
part's name and the mesh's hosts (127.0.0.1, localhost, and any configured) as subject alternative names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmesh import paths
from llmesh.tls import TlsFiles

# The parts that get a certificate: the four services, Envoy (a client of the gateway and the limiter), and
# `client` for the operator's tools, health probes and tests.
MESH_PARTS = ("gateway", "router", "cache", "limiter", "triton", "envoy", "client")
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
# A mesh lives as long as its `llmesh up`; a year only bounds a forgotten state folder.
VALID_DAYS = 365


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a part's key only signs its TLS handshakes (ECDSA)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _general_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(
    name: str = "llmesh mesh CA", valid_days: int = VALID_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    part: str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    valid_days: int = VALID_DAYS,
) -> Issued:
    """A certificate for `part`, signed by the CA: CN and a DNS name `part`, plus `hosts` as SANs."""
    key = _key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, part)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_general_names([part, *hosts])), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the start (never world-readable, not even between write and chmod)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def part_files(folder: Path, part: str) -> TlsFiles:
    """Where `write_mesh_certs` puts `part`'s files (and where an operator's own folder must have them)."""
    return TlsFiles(folder / CA_FILE, folder / f"{part}.pem", folder / f"{part}.key")


def write_mesh_certs(
    folder: Path, parts: Sequence[str] = MESH_PARTS, hosts: Sequence[str] = DEFAULT_HOSTS
) -> dict[str, TlsFiles]:
    """A new CA and one certificate per part in `folder` (0700): ca.pem, ca.key, <part>.pem, <part>.key."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca_cert, ca_key = make_ca()
    (folder / CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / CA_KEY_FILE, _key_pem(ca_key))
    files = {}
    for part in parts:
        issued = issue(ca_cert, ca_key, part, hosts)
        files[part] = part_files(folder, part)
        files[part].cert_file.write_bytes(issued.cert_pem)
        _write_private(files[part].key_file, issued.key_pem)
    return files


def check_mesh_certs(folder: Path, parts: Sequence[str] = MESH_PARTS) -> dict[str, TlsFiles]:
    """An operator's folder: every part's files must be there. Raises FileNotFoundError naming the missing ones."""
    files = {part: part_files(folder, part) for part in parts}
    missing = sorted({str(p) for f in files.values() for p in (f.ca_file, f.cert_file, f.key_file) if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"mutual TLS folder {folder} lacks: {', '.join(missing)}")
    return files


def operator_tls(env: Mapping[str, str]) -> TlsFiles | None:
    """The `client` certificate of the mesh `llmesh up` runs (LLMESH_MTLS_DIR, else <state dir>/tls), for the
    operator's tools that call an internal service (`llmesh quota`); None when there is none (mutual TLS off)."""
    folder = Path(env["LLMESH_MTLS_DIR"]) if env.get("LLMESH_MTLS_DIR") else paths.state_dir() / "tls"
    files = part_files(folder, "client")
    return files if files.cert_file.is_file() else None
