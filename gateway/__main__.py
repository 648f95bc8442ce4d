"""python -m gateway --router-url HOST:PORT --redis-url URL"""

from __future__ import annotations

import asyncio
import sys

from gateway.config import GatewaySettings
from gateway.server import serve
from llmesh.grpc_util import setup_logging
from llmesh.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(GatewaySettings, argv, "LLMESH_GATEWAY_", "llmesh gateway")
    setup_logging(settings.log_level, "gateway")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
