"""Mutual TLS between the mesh's parts: the three files a part needs, read once, as gRPC credentials.

Every internal service serves TLS with its own certificate and requires callers to present one signed by the same
CA (`require_client_auth=True`); its outgoing channels present that same certificate. The launcher generates a CA
and one certificate per part per mesh (control/certs.py); an operator may give their own files instead.
All three files, or none (plaintext, for development): a half-configured part is a start-up error, not a silent
fallback to plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc


class TlsConfigError(ValueError):
    """TLS settings that cannot work: some of the files given but not all, or a file that cannot be read."""


@dataclass(frozen=True)
class TlsSettings:
    """Mutual TLS fields, inherited by every service's settings: the mesh's CA, this service's certificate and its
    key (PEM files). All three, or none (plaintext, development only). With them, the service refuses callers
    without a certificate the CA signed, and presents its own to the services it calls. `llmesh up` generates and
    sets them."""

    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


class TlsFiles(NamedTuple):
    """PEM files: the CA that signs every part of the mesh, and this part's certificate and private key. A tuple,
    so it travels as plain data (a probe's JSON, `TlsFiles(*paths)`)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def of(cls, settings: TlsSettings) -> TlsFiles | None:
        """The files of a service's settings (`tls_ca_file`, `tls_cert_file`, `tls_key_file`)."""
        return cls.from_settings(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)

    @classmethod
    def from_settings(cls, ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> TlsFiles | None:
        """The files from a service's `tls_*_file` settings: None when none is set (plaintext)."""
        given = {"ca": ca_file, "cert": cert_file, "key": key_file}
        if all(v is None for v in given.values()):
            return None
        missing = [name for name, value in given.items() if value is None]
        if missing:
            flags = ", ".join(f"--tls-{m}-file" for m in missing)
            raise TlsConfigError(f"mutual TLS needs a CA, a certificate and a key; missing: {flags}")
        assert ca_file is not None and cert_file is not None and key_file is not None
        return cls(Path(ca_file), Path(cert_file), Path(key_file))

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.ca_file.read_bytes(), self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as exc:
            raise TlsConfigError(f"cannot read a TLS file: {exc.filename}: {exc.strerror}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this part's certificate; refuse any caller without a certificate signed by the CA."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Call with this part's certificate; trust only servers whose certificate the CA signed (and whose names
        include the target's host, as gRPC checks)."""
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    """Listen on `address`: mutual TLS when `tls` is given, else plaintext. Returns the port bound."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def aio_channel(
    target: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to another part of the mesh, presenting this part's certificate when `tls` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options)


def channel(target: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel (health probes, tools), as `aio_channel`."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)
