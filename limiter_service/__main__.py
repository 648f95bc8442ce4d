"""python -m limiter_service --redis-url URL [--policy-file FILE] [--redis-cluster true]"""

from __future__ import annotations

import asyncio
import sys

from limiter_service.config import LimiterSettings
from limiter_service.server import serve
from llmesh.grpc_util import setup_logging
from llmesh.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(LimiterSettings, argv, "LLMESH_LIMITER_", "llmesh limiter")
    setup_logging(settings.log_level, "limiter")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
