"""The quota policy: limits per tier, overridable per key and per org, read from one TOML file (see policy.toml).

`PolicySource` re-reads the file when it changes; a file that fails to parse or validate is refused and the
previous policy stays in force.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from llmesh.types import Tier

log = logging.getLogger(__name__)

DEFAULT_POLICY_FILE = Path(__file__).resolve().parent / "policy.toml"
UNLIMITED = -1
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PolicyError(ValueError):
    """The policy file is invalid; the message says where."""


class FailureMode(StrEnum):
    OPEN = "open"  # decide with local per-process limits
    CLOSED = "closed"  # refuse with UNAVAILABLE


@dataclass(frozen=True)
class Limits:
    requests_per_hour: int = UNLIMITED
    burst_per_minute: int = UNLIMITED
    tokens_per_hour: int = UNLIMITED
    max_concurrent_streams: int = UNLIMITED
    on_store_failure: FailureMode = FailureMode.CLOSED


LIMIT_FIELDS = ("requests_per_hour", "burst_per_minute", "tokens_per_hour", "max_concurrent_streams")


@dataclass(frozen=True)
class EdgeLimits:
    per_ip_per_minute: int = UNLIMITED
    per_key_per_minute: int = UNLIMITED
    on_store_failure: FailureMode = FailureMode.OPEN


@dataclass(frozen=True)
class KeyOverride:
    limits: dict[str, Any] = field(default_factory=dict)
    org: str = ""
    edge_per_minute: int | None = None


@dataclass(frozen=True)
class Quota:
    """Whose budget a request uses and its limits. `subject` names the state in the store."""

    subject: str
    limits: Limits


@dataclass(frozen=True)
class Policy:
    tiers: dict[Tier, Limits]
    edge: EdgeLimits = EdgeLimits()
    keys: dict[str, KeyOverride] = field(default_factory=dict)
    orgs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def quota(self, key_id: str, tier: Tier) -> Quota:
        base = self.tiers[tier]
        override = self.keys.get(key_id)
        if override is None:
            return Quota(f"key:{key_id}", base)
        if override.org:
            return Quota(f"org:{override.org}", dataclasses.replace(base, **self.orgs[override.org]))
        return Quota(f"key:{key_id}", dataclasses.replace(base, **override.limits))

    def edge_key_limit(self, key_id: str) -> int:
        override = self.keys.get(key_id)
        if override is not None and override.edge_per_minute is not None:
            return override.edge_per_minute
        return self.edge.per_key_per_minute


def _limit(where: str, name: str, value: Any) -> int:
    if value == "unlimited":
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f'{where}.{name} must be an integer >= 0 or "unlimited", not {value!r}')
    return value


def _failure_mode(where: str, value: Any) -> FailureMode:
    try:
        return FailureMode(value)
    except ValueError:
        raise PolicyError(f'{where}.on_store_failure must be "open" or "closed", not {value!r}') from None


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a table")
    return value


def _limit_overrides(where: str, table: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name in LIMIT_FIELDS:
            out[name] = _limit(where, name, value)
        elif name == "on_store_failure":
            out[name] = _failure_mode(where, value)
        elif name not in extra:
            known = ", ".join([*LIMIT_FIELDS, "on_store_failure", *extra])
            raise PolicyError(f"{where}: unknown setting {name!r} (known: {known})")
    return out


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(doc) - {"tiers", "edge", "keys", "orgs"}
    if unknown:
        raise PolicyError(f"{source}: unknown section(s) {sorted(unknown)} (known: tiers, edge, keys, orgs)")

    tiers_doc = _table("tiers", doc.get("tiers", {}))
    tiers: dict[Tier, Limits] = {}
    for name, table in tiers_doc.items():
        if name not in Tier._value2member_map_:
            raise PolicyError(f"tiers.{name}: unknown tier (known: {', '.join(t.value for t in Tier)})")
        tiers[Tier(name)] = Limits(**_limit_overrides(f"tiers.{name}", _table(f"tiers.{name}", table)))
    missing = [t.value for t in Tier if t not in tiers]
    if missing:
        # An unlisted tier would silently be unlimited; make the operator say so.
        raise PolicyError(f"{source}: tiers {missing} are missing (every tier needs a [tiers.NAME] table)")

    edge_doc = _table("edge", doc.get("edge", {}))
    edge_kwargs: dict[str, Any] = {}
    for name, value in edge_doc.items():
        if name in ("per_ip_per_minute", "per_key_per_minute"):
            edge_kwargs[name] = _limit("edge", name, value)
        elif name == "on_store_failure":
            edge_kwargs[name] = _failure_mode("edge", value)
        else:
            raise PolicyError(f"edge: unknown setting {name!r}")

    orgs: dict[str, dict[str, Any]] = {}
    for name, table in _table("orgs", doc.get("orgs", {})).items():
        if not _NAME.match(name):
            raise PolicyError(f"orgs.{name}: org names are letters, digits, '_', '.', '-' (at most 64)")
        orgs[name] = _limit_overrides(f"orgs.{name}", _table(f"orgs.{name}", table))

    keys: dict[str, KeyOverride] = {}
    for key_id, table in _table("keys", doc.get("keys", {})).items():
        where = f"keys.{key_id}"
        if not _NAME.match(key_id):
            raise PolicyError(f"{where}: not a key id (the 16 hex digits `llmesh quota show` prints)")
        table = _table(where, table)
        limits = _limit_overrides(where, table, extra=("org", "edge_per_minute"))
        org = table.get("org", "")
        if org and org not in orgs:
            raise PolicyError(f"{where}.org: no [orgs.{org}] table")
        if org and limits:
            raise PolicyError(f"{where}: a key in an org uses the org's limits; set them in [orgs.{org}]")
        edge = table.get("edge_per_minute")
        keys[key_id] = KeyOverride(
            limits=limits,
            org=str(org),
            edge_per_minute=None if edge is None else _limit(where, "edge_per_minute", edge),
        )
    return Policy(tiers=tiers, edge=EdgeLimits(**edge_kwargs), keys=keys, orgs=orgs)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    return parse_policy(text, str(path))


class PolicySource:
    """The policy in force, re-read from `path` when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self.policy = load_policy(path)  # a bad file at start is fatal: there is no previous policy to keep
        self.version = 1
        self.last_error = ""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool | None:
        """True: a new policy is in force; False: the file changed but was refused; None: unchanged."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy file refused, keeping the previous policy: %s", exc)
            return False
        self.policy = policy
        self.version += 1
        self.last_error = ""
        log.info("policy reloaded from %s (version %d)", self.path, self.version)
        return True
