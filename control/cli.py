"""The `llmesh` command: up, down, status, serve, keys, build, protos, cache, quota, bench, top."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from control.launcher import MeshSettings, run_down, run_up
from llmesh.redis_auth import operator_redis_auth
from llmesh.settings import add_arguments, flat_class, from_namespace, unflatten
from llmesh.types import Tier

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # The services' own flags pass through unparsed (control/serve.py).
        from control import serve as serve_role

        return serve_role.main(argv[1:])
    parser = argparse.ArgumentParser(prog="llmesh", description="LLM serving mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    # Mesh-level knobs (--http-port, --redis-url, --replicas, ...), then each service's own settings as
    # --<service>-<field> (env LLMESH_<SERVICE>_<FIELD>, as the service itself reads it).
    mesh_flags = flat_class(MeshSettings)
    up = sub.add_parser("up", help="start the whole mesh in the foreground (Ctrl-C stops it)")
    add_arguments(up, mesh_flags, "LLMESH_")
    down = sub.add_parser("down", help="stop a mesh started by `llmesh up`")
    add_arguments(down, mesh_flags, "LLMESH_")
    status = sub.add_parser(
        "status",
        help="each part of the running mesh: pid, ports, health, restarts, uptime, last exit "
        "(exit 0 all healthy, 1 a part is not, 3 no mesh running)",
    )
    add_arguments(status, mesh_flags, "LLMESH_")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    from control.serve import add_to as add_serve

    add_serve(sub)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key and print it (it is stored only hashed)")
    create.add_argument("--tier", choices=[t.value for t in Tier], required=True)
    create.add_argument("--note", default="", help="free text stored beside the key's hash")
    create.add_argument(
        "--expires",
        "--expires-in",
        metavar="WHEN",
        help="optional expiry: a duration (30d, 12h, 1w2d) or an ISO 8601 date/time (2027-01-31 = 00:00 UTC)",
    )
    create.add_argument("--json", action="store_true", help="print {key, id, tier, expires} as JSON")
    keys_list = keys_sub.add_parser("list", help="list keys: id, tier, status, created, last used, expiry (never keys)")
    keys_list.add_argument("--json", action="store_true", help="print a JSON array")
    revoke = keys_sub.add_parser("revoke", help="revoke a key (gateways refuse it within their key cache TTL)")
    revoke.add_argument("key", metavar="ID", help="a key id (16 hex digits, from `keys list`) or the API key itself")
    for keys_parser in (create, keys_list, revoke):
        keys_parser.add_argument("--redis-url", default=os.environ.get("LLMESH_REDIS_URL", DEFAULT_REDIS_URL))

    build = sub.add_parser("build", help="build (or find cached) the Triton model repository and print its path")
    from triton_models.config import add_build_arguments

    add_build_arguments(build)
    sub.add_parser("protos", help="regenerate Python stubs and Envoy's descriptor set from protos/")

    cache = sub.add_parser("cache", help="manage the response cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    flush = cache_sub.add_parser("flush", help="delete cached answers: one tenant's, the public scope's, or all")
    flush_scope = flush.add_mutually_exclusive_group()
    flush_scope.add_argument("--tenant", metavar="KEY_ID", help="key id (first 16 hex digits of the key's hash)")
    flush_scope.add_argument("--public", action="store_true", help="the scope shared by keys configured as public")
    flush.add_argument(
        "--redis-url",
        default=os.environ.get("LLMESH_CACHE_REDIS_URL") or os.environ.get("LLMESH_REDIS_URL", DEFAULT_REDIS_URL),
        help="the cache's Redis (env LLMESH_CACHE_REDIS_URL, else LLMESH_REDIS_URL)",
    )

    quota = sub.add_parser("quota", help="show or reset one API key's quotas (asks the running limiter)")
    quota.add_argument("action", choices=["show", "reset"])
    quota.add_argument("key", metavar="KEY", help="an API key (lm-...) or its key id (16 hex digits)")
    quota.add_argument("--tier", choices=[t.value for t in Tier], help="default: the key's tier in the key store")
    quota.add_argument("--limiter-url", default=os.environ.get("LLMESH_LIMITER_URL", "127.0.0.1:50053"))
    quota.add_argument("--redis-url", default=os.environ.get("LLMESH_REDIS_URL", DEFAULT_REDIS_URL))

    from control import top
    from control.bench import command as bench

    bench_parser = sub.add_parser("bench", help="load-test the mesh or any OpenAI-compatible endpoint; write reports")
    bench.add_arguments(bench_parser)
    top_parser = sub.add_parser("top", help="live view of QPS, latency, tokens/s, cache hits, queues per variant")
    top.add_arguments(top_parser)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command in ("up", "down", "status"):
        try:
            mesh_settings = unflatten(MeshSettings, from_namespace(mesh_flags, args))
        except ValueError as exc:
            print(f"llmesh: {exc}", file=sys.stderr)
            return 2
        if args.command == "up":
            return run_up(mesh_settings)
        if args.command == "down":
            return run_down(mesh_settings)
        from control.status import run_status

        return run_status(mesh_settings, as_json=args.json)
    if args.command == "keys":
        from control.keys import keys_command

        return asyncio.run(
            keys_command(
                args.keys_command,
                args.redis_url,
                tier=getattr(args, "tier", None),
                note=getattr(args, "note", ""),
                expires=getattr(args, "expires", None),
                key=getattr(args, "key", ""),
                as_json=getattr(args, "json", False),
            )
        )
    if args.command == "build":
        from triton_models.config import settings_from
        from triton_models.repository import ensure_model_repository

        print(ensure_model_repository(settings_from(args)))
        return 0
    if args.command == "cache":
        from cache_service.core import flush_cache
        from cache_service.store import BackendError

        try:
            redis_options = operator_redis_auth(os.environ).client_options(args.redis_url)
            deleted = asyncio.run(flush_cache(args.redis_url, args.tenant, args.public, redis_options=redis_options))
        except (BackendError, ValueError) as exc:
            print(f"llmesh: cache flush failed: {exc}", file=sys.stderr)
            return 1
        scope = f"tenant {args.tenant}" if args.tenant else "public scope" if args.public else "all scopes"
        print(f"flushed {scope}: {deleted} keys deleted")
        return 0
    if args.command == "quota":
        from control.certs import operator_tls
        from limiter_service.admin import quota_command

        tls = operator_tls(os.environ)
        redis_options = operator_redis_auth(os.environ).client_options(args.redis_url)
        return asyncio.run(
            quota_command(args.action, args.key, args.tier, args.limiter_url, args.redis_url, tls, redis_options)
        )
    if args.command == "bench":
        return bench.run(args)
    if args.command == "top":
        return top.run(args)
    if args.command == "protos":
        from control import protogen

        return protogen.main([])
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
