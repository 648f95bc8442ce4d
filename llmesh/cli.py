"""The `llmesh` command: up, down, keys, build, protos."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from llmesh.launcher import MeshSettings, run_down, run_up
from llmesh.settings import add_arguments, from_namespace
from llmesh.types import Tier

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


async def _create_key(redis_url: str, tier: Tier, note: str) -> str:
    import redis.asyncio as aioredis

    from gateway.auth import RedisApiKeyStore

    client = aioredis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        return await RedisApiKeyStore(client).create(tier, note)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmesh", description="LLM serving mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole mesh in the foreground (Ctrl-C stops it)")
    add_arguments(up, MeshSettings, "LLMESH_")
    down = sub.add_parser("down", help="stop a mesh started by `llmesh up`")
    add_arguments(down, MeshSettings, "LLMESH_")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key and print it (it is stored only hashed)")
    create.add_argument("--tier", choices=[t.value for t in Tier], required=True)
    create.add_argument("--note", default="", help="free text stored beside the key's hash")
    create.add_argument("--redis-url", default=os.environ.get("LLMESH_REDIS_URL", DEFAULT_REDIS_URL))

    sub.add_parser("build", help="build (or find cached) the Triton model repository and print its path")
    sub.add_parser("protos", help="regenerate Python stubs and Envoy's descriptor set from protos/")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "up":
        return run_up(from_namespace(MeshSettings, args))
    if args.command == "down":
        return run_down(from_namespace(MeshSettings, args))
    if args.command == "keys":
        print(asyncio.run(_create_key(args.redis_url, Tier(args.tier), args.note)))
        return 0
    if args.command == "build":
        from triton_models.config import BuildSettings
        from triton_models.repository import ensure_model_repository

        print(ensure_model_repository(BuildSettings()))
        return 0
    if args.command == "protos":
        from llmesh import protogen

        return protogen.main([])
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
