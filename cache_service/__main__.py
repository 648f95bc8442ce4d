"""python -m cache_service --redis-url URL [--port N] [--semantic-threshold X]"""

from __future__ import annotations

import asyncio
import sys

from cache_service.config import CacheSettings
from cache_service.server import serve
from llmesh.grpc_util import setup_logging
from llmesh.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(CacheSettings, argv, "LLMESH_CACHE_", "llmesh response cache")
    setup_logging(settings.log_level, "cache")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
