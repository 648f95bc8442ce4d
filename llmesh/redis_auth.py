"""How a part of the mesh authenticates to Redis: a password and, for `rediss://` URLs, TLS files.

The password comes from a file (`--redis-password-file`, read at start) or the env var LLMESH_REDIS_PASSWORD,
never from a flag or the URL: argv is world-readable (/proc/<pid>/cmdline) and URLs end up in logs. It is held in
a field left out of repr, so logging the settings or this object cannot print it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PASSWORD_ENV = "LLMESH_REDIS_PASSWORD"


class RedisAuthError(ValueError):
    """Redis credentials that cannot work (an unreadable password file, TLS files without a rediss:// URL)."""


@dataclass(frozen=True)
class RedisAuth:
    password: str | None = field(default=None, repr=False)
    # For rediss:// URLs: the CA that signed Redis' certificate, and a client certificate and key when Redis
    # requires one (its default, `tls-auth-clients yes`).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def client_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for `redis.Redis.from_url(url, **options)` (the URL's scheme picks TLS; a client built
        from host and port for a rediss:// URL also needs `ssl=True`)."""
        options: dict[str, Any] = {}
        if self.password is not None:
            options["password"] = self.password
        if urlparse(url).scheme == "rediss":
            if self.ca_file is not None:
                options["ssl_ca_certs"] = str(self.ca_file)
            if self.cert_file is not None:
                options["ssl_certfile"] = str(self.cert_file)
            if self.key_file is not None:
                options["ssl_keyfile"] = str(self.key_file)
        elif any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            raise RedisAuthError(f"Redis TLS files are set but the Redis URL is not rediss:// ({_redacted(url)})")
        return options


def _redacted(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def read_password(password_file: Path | None, env: Mapping[str, str]) -> str | None:
    """The password from `password_file` (its first line), else from LLMESH_REDIS_PASSWORD; None when neither."""
    if password_file is not None:
        try:
            text = Path(password_file).read_text()
        except OSError as exc:
            raise RedisAuthError(f"cannot read the Redis password file {password_file}: {exc.strerror}") from exc
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise RedisAuthError(f"the Redis password file {password_file} is empty")
        return lines[0]
    return env.get(PASSWORD_ENV) or None


@dataclass(frozen=True)
class RedisAuthSettings:
    """Redis credential fields, inherited by the settings of every part that uses Redis: the password from this
    file, else from the env var LLMESH_REDIS_PASSWORD (never a flag: argv is visible to every user of the host);
    TLS files for rediss:// URLs."""

    redis_password_file: Path | None = None
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None


def redis_auth(settings: RedisAuthSettings, env: Mapping[str, str]) -> RedisAuth:
    """RedisAuth from a service's settings and its environment (the password env var)."""
    return RedisAuth(
        read_password(settings.redis_password_file, env),
        settings.redis_tls_ca_file,
        settings.redis_tls_cert_file,
        settings.redis_tls_key_file,
    )


GENERATED_PASSWORD_FILE = "redis.password"


def operator_redis_auth(env: Mapping[str, str]) -> RedisAuth:
    """Credentials for the operator's tools (`llmesh keys`, `llmesh cache flush`, `llmesh quota`), from the env
    vars `llmesh up` reads too: LLMESH_REDIS_PASSWORD_FILE, else LLMESH_REDIS_PASSWORD, else the password `llmesh up`
    made for a redis-server of its own (<state dir>/redis.password); LLMESH_REDIS_TLS_{CA,CERT,KEY}_FILE."""
    from llmesh import paths

    def path(name: str) -> Path | None:
        return Path(env[name]) if env.get(name) else None

    password_file = path("LLMESH_REDIS_PASSWORD_FILE")
    if password_file is None and not env.get(PASSWORD_ENV):
        generated = paths.state_dir() / GENERATED_PASSWORD_FILE
        password_file = generated if generated.is_file() else None
    return RedisAuth(
        read_password(password_file, env),
        path("LLMESH_REDIS_TLS_CA_FILE"),
        path("LLMESH_REDIS_TLS_CERT_FILE"),
        path("LLMESH_REDIS_TLS_KEY_FILE"),
    )
