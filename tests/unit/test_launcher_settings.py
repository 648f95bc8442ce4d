"""`llmesh up`'s settings: composed of each service's own settings object; the services' argv is generated from them
and parses back to the same object, so a renamed or retyped field fails here rather than in a user's launch."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_service.config import CacheSettings
from control import cli
from control.launcher import LOOPBACK, MAX_REPLICAS, MeshSettings
from gateway.config import GatewaySettings
from limiter_service.config import LimiterSettings
from llmesh.settings import Section, flat_class, flatten, load_settings, to_argv, unflatten
from router.config import RouterSettings

# Each service with the env prefix its __main__ reads.
SERVICES: list[tuple[type[Any], str]] = [
    (GatewaySettings, "LLMESH_GATEWAY_"),
    (RouterSettings, "LLMESH_ROUTER_"),
    (CacheSettings, "LLMESH_CACHE_"),
    (LimiterSettings, "LLMESH_LIMITER_"),
]

# No NUL (argv cannot carry it) and no lone surrogates (not encodable).
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
_SCALARS: dict[Any, st.SearchStrategy[Any]] = {
    bool: st.booleans(),
    int: st.integers(),
    float: st.floats(allow_nan=False),
    str: _text,
    Path: _text.map(Path),
}


def _strategy(tp: Any) -> st.SearchStrategy[Any]:
    if tp in _SCALARS:
        return _SCALARS[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and args[0] in _SCALARS:
        return st.none() | _SCALARS[args[0]]
    if typing.get_origin(tp) is tuple and args == [str, Ellipsis]:
        # Names such as variants: one or more, none empty, without the separators (space, comma) or a leading "-".
        name = st.text(st.characters(categories=["L", "N"], include_characters="._"), min_size=1, max_size=12)
        return st.lists(name, min_size=1, max_size=3).map(tuple)
    raise AssertionError(f"no strategy for {tp!r}: add one here")


def instances(cls: type[Any], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Instances of a settings dataclass with arbitrary values in every field (but those given)."""
    hints = typing.get_type_hints(cls)
    strategies = {f.name: _strategy(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **{**strategies, **fields})


def parse(cls: type[Any], argv: list[str], env_prefix: str, env: dict[str, str] | None = None) -> Any:
    """What the service's `__main__` makes of `argv` (load_settings), with only `env` in the environment."""
    with mock.patch.dict(os.environ, env or {}, clear=True):
        return load_settings(cls, argv, env_prefix)


def llmesh_up(argv: list[str], env: dict[str, str] | None = None) -> MeshSettings:
    """The MeshSettings `llmesh up ARGV` starts the mesh with."""
    seen: list[MeshSettings] = []

    def run_up(s: MeshSettings) -> int:
        seen.append(s)
        return 0

    with mock.patch.dict(os.environ, env or {}, clear=True), mock.patch.object(cli, "run_up", run_up):
        assert cli.main(["up", *argv]) == 0
    return seen[0]


@pytest.mark.parametrize(("cls", "env_prefix"), SERVICES, ids=lambda v: getattr(v, "__name__", v))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_service_settings_round_trip_through_argv(cls: type[Any], env_prefix: str, data: st.DataObject) -> None:
    s = data.draw(instances(cls))
    assert parse(cls, to_argv(s), env_prefix) == s
    assert parse(cls, to_argv(s, only_changed=True), env_prefix) == s


@pytest.mark.parametrize(("cls", "env_prefix"), SERVICES, ids=lambda v: getattr(v, "__name__", v))
def test_service_argv_wins_over_the_services_env(cls: type[Any], env_prefix: str) -> None:
    """The launcher writes every field, so a LLMESH_<SERVICE>_* variable meant for a standalone run cannot change
    what the launcher resolved (the launcher itself reads those variables: see test_env_vars_reach_the_services)."""
    s = cls()
    assert parse(cls, to_argv(s), env_prefix, {env_prefix + "HOST": "0.0.0.0", env_prefix + "PORT": "1"}) == s


@settings(max_examples=60, deadline=None)
@given(flat=instances(flat_class(MeshSettings), replicas=st.integers(1, MAX_REPLICAS)))
def test_mesh_settings_round_trip_through_llmesh_up(flat: Any) -> None:
    # Built in the same (empty) environment `llmesh_up` parses in: wired certificate paths follow the state folder.
    with mock.patch.dict(os.environ, {}, clear=True):
        s = unflatten(MeshSettings, flat)
    assert flatten(s) == flat
    assert llmesh_up(to_argv(s)) == s
    assert llmesh_up(to_argv(s, only_changed=True)) == s


# Every flag and env var `llmesh up` had before its settings were composed (README, docs/OPERATIONS.md, scripts).
KEPT_FLAGS = [
    "host", "http_port", "envoy_admin_port", "gateway_port", "router_port", "triton_grpc_port", "triton_http_port",
    "triton_metrics_port", "replicas", "router_metrics_port", "gateway_metrics_port", "redis_url",
    "external_triton_url", "model_repository", "state_dir", "startup_timeout_s", "default_max_tokens",
    "max_tokens_limit", "cache_enabled", "cache_port", "cache_metrics_port", "cache_redis_url", "limiter_port",
    "limiter_metrics_port", "limiter_policy_file", "log_level",
]  # fmt: skip


def test_llmesh_up_keeps_its_flags_and_env_vars(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    help_text = capsys.readouterr().out
    for name in KEPT_FLAGS:
        assert "--" + name.replace("_", "-") + " " in help_text, name
        assert f"env LLMESH_{name.upper()};" in help_text, name


def test_documented_defaults() -> None:
    """The ports README and docs/OPERATIONS.md give for a default `llmesh up`."""
    s = MeshSettings()
    assert (s.http_port, s.envoy_admin_port, s.redis_url) == (8080, 9901, "redis://127.0.0.1:6379/0")
    assert (s.triton_grpc_port, s.triton_http_port, s.triton_metrics_port) == (8001, 8000, 8002)
    ports = [(p.port, p.metrics_port) for p in (s.gateway, s.router, s.limiter, s.cache)]
    assert ports == [(50051, 9101), (50052, 9102), (50053, 9103), (50054, 9104)]
    # Nothing else differs from the services' own defaults but what the mesh wires.
    defaults: list[tuple[str, Any]] = [
        ("gateway", GatewaySettings(metrics_port=9101)),
        ("router", RouterSettings(metrics_port=9102)),
        ("cache", CacheSettings()),
        ("limiter", LimiterSettings()),
    ]
    for name, default in defaults:
        assert getattr(s, name) == dataclasses.replace(default, **s.wiring()[name])


def test_flags_and_env_vars_reach_the_services() -> None:
    s = llmesh_up(
        ["--http-port", "18080", "--redis-url", "redis://10.0.0.9:7000/1", "--replicas", "2",
         "--gateway-port", "1234", "--cache-ttl-s", "5", "--limiter-policy-file", "/etc/q.toml"],
        env={"LLMESH_DEFAULT_MAX_TOKENS": "7", "LLMESH_GATEWAY_MAX_MESSAGES": "3", "LLMESH_CACHE_PORT": "4321",
             "LLMESH_ROUTER_DEFAULT_VARIANT": "smollm2-135m", "LLMESH_LOG_LEVEL": "debug"},
    )  # fmt: skip
    assert s.http_port == 18080
    assert (s.gateway.port, s.gateway.default_max_tokens, s.gateway.max_messages) == (1234, 7, 3)
    assert (s.cache.port, s.cache.ttl_s) == (4321, 5.0)
    assert s.limiter.policy_file == Path("/etc/q.toml")
    assert s.router.default_variant == "smollm2-135m"
    assert {p.log_level for p in (s.gateway, s.router, s.cache, s.limiter)} == {"debug"}
    # One Redis URL for everyone unless the cache has its own.
    assert s.gateway.redis_url == s.limiter.redis_url == s.cache.redis_url == "redis://10.0.0.9:7000/1"
    assert s.router.triton_url == f"{LOOPBACK}:8001,{LOOPBACK}:8011"
    assert s.gateway.cache_url == f"{LOOPBACK}:4321"
    assert s.gateway.router_url == f"{LOOPBACK}:{s.router.port}"


def test_wiring() -> None:
    s = MeshSettings(
        redis_url="redis://r:1/0",
        cache_redis_url="redis://c:2/0",
        cache_enabled=False,
        external_triton_url="t:9",
        model_repository=Path("/models"),
        # Wired fields given by hand are replaced by the mesh's.
        gateway=GatewaySettings(router_url="elsewhere:1", max_messages=9),
    )
    assert s.gateway.router_url == f"{LOOPBACK}:50052" and s.gateway.max_messages == 9
    assert s.gateway.cache_url == ""
    assert (s.cache.redis_url, s.limiter.redis_url, s.gateway.redis_url) == ("redis://c:2/0",) + ("redis://r:1/0",) * 2
    assert (s.router.triton_url, s.router.model_repository) == ("t:9", Path("/models"))
    # A changed knob rewires.
    moved = dataclasses.replace(s, redis_url="redis://r2:1/0", cache_redis_url="")
    assert moved.cache.redis_url == moved.gateway.redis_url == "redis://r2:1/0"


def test_wiring_sets_exactly_the_wired_fields() -> None:
    """`wiring()` and the sections' `wired=` lists (the fields left without a flag) name the same fields."""
    wiring = MeshSettings().wiring()
    sections = {
        f.name: meta
        for f in dataclasses.fields(MeshSettings)
        for meta in f.metadata.values()
        if isinstance(meta, Section)
    }
    assert sections.keys() == wiring.keys()
    for name, meta in sections.items():
        assert meta.wired == set(wiring[name]), name


def test_on_free_ports() -> None:
    policy = Path("/tmp/policy.toml")
    s = MeshSettings.on_free_ports(limiter_policy_file=policy, max_tokens_limit=99, redis_url="redis://x:1/0")
    default = MeshSettings()
    ports = [(s.http_port, default.http_port), (s.envoy_admin_port, default.envoy_admin_port)] + [
        (getattr(s, n).port, getattr(default, n).port) for n in ("gateway", "router", "cache", "limiter")
    ]
    assert all(mine != theirs for mine, theirs in ports)
    assert len({p for p, _ in ports}) == len(ports)
    assert (s.limiter.policy_file, s.gateway.max_tokens_limit, s.limiter.redis_url) == (policy, 99, "redis://x:1/0")
    assert s.gateway.limiter_url == f"{LOOPBACK}:{s.limiter.port}"
    with pytest.raises(TypeError):
        MeshSettings.on_free_ports(no_such_flag=1)


def test_free_ports_are_distinct() -> None:
    from control.process import free_ports

    for _ in range(50):
        ports = free_ports(8)
        assert len(set(ports)) == 8


def test_restart_flags_and_env_vars_reach_the_policy() -> None:
    from control.supervisor import RestartPolicy

    s = llmesh_up(["--restart-max", "2", "--restart-backoff-s", "0.1"], env={"LLMESH_RESTART_WINDOW_S": "30"})
    assert s.restart_policy == RestartPolicy(max_restarts=2, window_s=30, backoff_s=0.1)


def test_up_refuses_a_restart_policy_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--restart-backoff-s", "5", "--restart-backoff-max-s", "1"]) == 2
    assert "llmesh: --restart-backoff-max-s (1.0) is below --restart-backoff-s (5.0)" in capsys.readouterr().err


@pytest.mark.parametrize("replicas", ["0", "-1", str(MAX_REPLICAS + 1), str(10**12)])
def test_up_refuses_a_replica_count_out_of_range(replicas: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A huge count once made the launcher list that many addresses (and exhaust memory) before anything checked it.
    assert cli.main(["up", "--replicas", replicas]) == 2
    assert f"llmesh: --replicas must be between 1 and {MAX_REPLICAS}, got {replicas}" in capsys.readouterr().err
