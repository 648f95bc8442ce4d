"""`python -m triton_models build` prints the model repository path (building it if needed);
`python -m triton_models serve --grpc-port ...` builds, then replaces itself with tritonserver."""

from __future__ import annotations

import argparse
import logging
import os

from triton_models.config import add_build_arguments, settings_from


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triton_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the model repository and print its path")
    serve = sub.add_parser("serve", help="build, then run tritonserver on it (exec)")
    for p in (build, serve):
        add_build_arguments(p)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--address", default="127.0.0.1")
    serve.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from triton_models.repository import ensure_model_repository

    settings = settings_from(args)
    repository = ensure_model_repository(settings)
    if args.command == "build":
        print(repository)
        return

    from triton_models.runtime import prepare_backend_dir, tritonserver_command

    command, env = tritonserver_command(
        repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        backend_dir=prepare_backend_dir(settings.cache_dir),
        log_verbose=args.log_verbose,
        address=args.address,
    )
    # exec: signals from a supervisor reach tritonserver itself.
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
