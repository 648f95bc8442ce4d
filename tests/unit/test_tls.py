"""Per-mesh certificates (control/certs.py), TLS settings (llmesh/tls.py), Redis credentials (llmesh/redis_auth.py),
and how the launcher wires them into the services and Envoy."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from control.certs import MESH_PARTS, check_mesh_certs, write_mesh_certs
from control.envoy_config import EdgeConfig, render
from control.launcher import MeshSettings, write_redis_config
from llmesh.redis_auth import PASSWORD_ENV, RedisAuth, RedisAuthError, read_password
from llmesh.settings import to_argv, with_flags
from llmesh.tls import TlsConfigError, TlsFiles


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_mesh_certificates_are_signed_by_the_mesh_ca_and_name_their_part(tmp_path: Path) -> None:
    files = write_mesh_certs(tmp_path / "tls")
    assert set(files) == set(MESH_PARTS)
    ca = load(tmp_path / "tls" / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for part, f in files.items():
        cert = load(f.cert_file)
        cert.verify_directly_issued_by(ca)  # raises if another key signed it
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert part in sans.get_values_for_type(x509.DNSName)
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    files = write_mesh_certs(folder)
    assert mode(folder) == 0o700
    assert mode(folder / "ca.key") == 0o600
    for f in files.values():
        assert mode(f.key_file) == 0o600
    # A second start replaces everything with a new CA (and keeps the modes).
    first_ca = (folder / "ca.pem").read_bytes()
    write_mesh_certs(folder)
    assert (folder / "ca.pem").read_bytes() != first_ca
    assert all(mode(f.key_file) == 0o600 for f in files.values())


def test_each_mesh_has_its_own_ca(tmp_path: Path) -> None:
    one = write_mesh_certs(tmp_path / "one")
    two = write_mesh_certs(tmp_path / "two")
    with pytest.raises(InvalidSignature):
        load(one["gateway"].cert_file).verify_directly_issued_by(load(two["gateway"].ca_file))


def test_operator_folder_must_hold_every_part(tmp_path: Path) -> None:
    write_mesh_certs(tmp_path, parts=("gateway", "router"))
    with pytest.raises(FileNotFoundError, match=r"limiter\.pem"):
        check_mesh_certs(tmp_path)
    assert check_mesh_certs(tmp_path, parts=("gateway", "router"))["router"].cert_file == tmp_path / "router.pem"


def test_tls_files_all_or_none(tmp_path: Path) -> None:
    assert TlsFiles.from_settings(None, None, None) is None
    with pytest.raises(TlsConfigError, match="--tls-key-file"):
        TlsFiles.from_settings(tmp_path / "ca.pem", tmp_path / "c.pem", None)
    files = TlsFiles.from_settings(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key")
    assert files is not None
    # Missing files are a clear start-up error, not a gRPC internal one.
    with pytest.raises(TlsConfigError, match="cannot read a TLS file"):
        files.server_credentials()


def test_tls_files_give_grpc_credentials(tmp_path: Path) -> None:
    files = write_mesh_certs(tmp_path)["gateway"]
    assert files.server_credentials() is not None
    assert files.channel_credentials() is not None
    assert TlsFiles(*files) == files  # plain data: travels in a probe's JSON


# ---- Redis credentials -------------------------------------------------------------------------------------


def test_redis_password_from_file_then_env(tmp_path: Path) -> None:
    secret = tmp_path / "redis.password"
    secret.write_text("from-file\n")
    assert read_password(secret, {PASSWORD_ENV: "from-env"}) == "from-file"
    assert read_password(None, {PASSWORD_ENV: "from-env"}) == "from-env"
    assert read_password(None, {}) is None
    (tmp_path / "empty").write_text("")
    with pytest.raises(RedisAuthError, match="empty"):
        read_password(tmp_path / "empty", {})
    with pytest.raises(RedisAuthError, match="cannot read"):
        read_password(tmp_path / "absent", {})


def test_redis_password_never_in_repr() -> None:
    auth = RedisAuth(password="s3cret-value")
    assert "s3cret-value" not in repr(auth)
    assert "s3cret-value" not in str(auth)
    assert auth.client_options("redis://127.0.0.1:6379/0") == {"password": "s3cret-value"}


def test_rediss_urls_get_tls_options(tmp_path: Path) -> None:
    auth = RedisAuth("pw", tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key")
    options = auth.client_options("rediss://127.0.0.1:6380/0")
    assert options == {
        "password": "pw",
        "ssl_ca_certs": str(tmp_path / "ca.pem"),
        "ssl_certfile": str(tmp_path / "c.pem"),
        "ssl_keyfile": str(tmp_path / "c.key"),
    }
    with pytest.raises(RedisAuthError, match="not rediss://"):
        auth.client_options("redis://:hidden@127.0.0.1:6379/0")
    try:
        auth.client_options("redis://:hidden@127.0.0.1:6379/0")
    except RedisAuthError as exc:
        assert "hidden" not in str(exc)


def test_redis_config_is_private_and_quotes_the_password(tmp_path: Path) -> None:
    path = write_redis_config(tmp_path / "redis.conf", 6390, tmp_path / "state dir", 'a "quoted" pass\\word\n')
    assert mode(path) == 0o600
    text = path.read_text()
    assert 'requirepass "a \\"quoted\\" pass\\\\word\\x0a"' in text
    assert 'dir "' in text and "port 6390" in text
    assert "requirepass" not in write_redis_config(tmp_path / "open.conf", 6390, tmp_path, None).read_text()


# ---- the launcher's wiring ---------------------------------------------------------------------------------


def generated(state: Path, part: str) -> TlsFiles:
    return TlsFiles(state / "tls" / "ca.pem", state / "tls" / f"{part}.pem", state / "tls" / f"{part}.key")


def test_mesh_turns_mutual_tls_on_by_default(tmp_path: Path) -> None:
    s = MeshSettings(state_dir=tmp_path)
    assert s.mtls
    for name in ("gateway", "router", "cache", "limiter"):
        part = getattr(s, name)
        assert TlsFiles.of(part) == generated(tmp_path, name)
        # ... and each service is started with them.
        assert f"--tls-cert-file={tmp_path / 'tls' / (name + '.pem')}" in to_argv(part)
    assert s.router.triton_tls  # the launcher starts Triton with mutual TLS
    assert not with_flags(s, external_triton_url="127.0.0.1:9").router.triton_tls
    assert s.tls_files("envoy") == generated(tmp_path, "envoy")


def test_no_mtls_and_operator_folder(tmp_path: Path) -> None:
    off = with_flags(MeshSettings(state_dir=tmp_path), mtls=False)
    assert all(TlsFiles.of(getattr(off, n)) is None for n in ("gateway", "router", "cache", "limiter"))
    assert off.tls_files("client") is None and not off.router.triton_tls
    own = with_flags(MeshSettings(state_dir=tmp_path), mtls_dir=tmp_path / "ops")
    assert own.gateway.tls_key_file == tmp_path / "ops" / "gateway.key"


def test_redis_credentials_reach_every_redis_client(tmp_path: Path) -> None:
    s = with_flags(MeshSettings(), redis_password_file=tmp_path / "pw", redis_tls_ca_file=tmp_path / "ca.pem")
    for part in (s.gateway, s.cache, s.limiter):
        assert (part.redis_password_file, part.redis_tls_ca_file) == (tmp_path / "pw", tmp_path / "ca.pem")
    # The file's path travels on argv; the password itself never does.
    (tmp_path / "pw").write_text("never-on-argv\n")
    assert not any("never-on-argv" in a for a in to_argv(s.gateway) + to_argv(s, only_changed=True))
    assert s.redis_auth({}).password == "never-on-argv"


def test_envoy_upstream_tls_only_when_configured(tmp_path: Path) -> None:
    files = write_mesh_certs(tmp_path)["envoy"]
    plain = render(EdgeConfig())
    assert "UpstreamTlsContext" not in plain
    secure = render(EdgeConfig(upstream_tls=files))
    # Both internal clusters (limiter, gateway).
    assert secure.count("UpstreamTlsContext") == 2
    assert secure.count(str(files.key_file)) == 2 and str(files.ca_file) in secure


def test_llmesh_up_flags_for_mtls_and_redis_credentials(tmp_path: Path) -> None:
    from tests.unit.test_launcher_settings import llmesh_up

    assert llmesh_up([]).mtls
    assert not llmesh_up(["--no-mtls"]).mtls
    assert not llmesh_up([], {"LLMESH_MTLS": "false"}).mtls
    s = llmesh_up(["--mtls-dir", str(tmp_path), "--redis-password-file", str(tmp_path / "pw")])
    assert s.limiter.tls_ca_file == tmp_path / "ca.pem" and s.cache.redis_password_file == tmp_path / "pw"
