"""python -m router --triton-url HOST:PORT --model-repository DIR"""

from __future__ import annotations

import asyncio
import sys

from llmesh.grpc_util import setup_logging
from llmesh.settings import load_settings
from router.config import RouterSettings
from router.server import serve


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(RouterSettings, argv, "LLMESH_ROUTER_", "llmesh router")
    setup_logging(settings.log_level, "router")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main(sys.argv[1:])
