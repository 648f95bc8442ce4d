"""gRPC plumbing every llmesh service shares: error <-> status mapping, health, reflection, signal-driven shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmesh import errors

log = logging.getLogger(__name__)

# First match wins: NotFound before InvalidRequest, its base.
_TO_STATUS: tuple[tuple[type[errors.MeshError], grpc.StatusCode], ...] = (
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
)
# A downstream NOT_FOUND (e.g. Triton missing a model) is a server-side problem unless the caller maps it itself.
_FROM_STATUS = {code: exc for exc, code in _TO_STATUS if exc is not errors.NotFound}


def status_for(exc: errors.MeshError) -> grpc.StatusCode:
    for exc_type, code in _TO_STATUS:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(err: grpc.RpcError, upstream: str) -> errors.MeshError:
    """Turn a downstream service's status back into the domain error, so it passes through unchanged."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    exc_type = _FROM_STATUS.get(code)
    if exc_type is not None and exc_type is not errors.Internal:
        return exc_type(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"{upstream} unavailable: {details}")
    return errors.Internal(f"{upstream} failed ({code.name}): {details}")


async def _abort(context: grpc.aio.ServicerContext, exc: errors.MeshError) -> None:
    retry: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        retry = (("retry-after", str(exc.retry_after_s)),)
    if retry or exc.metadata:
        context.set_trailing_metadata(retry + exc.metadata)
    await context.abort(status_for(exc), str(exc))


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")


def unary_errors(
    method: Callable[[Self_, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Self_, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Map domain errors raised by a unary handler to gRPC statuses (the one place this happens)."""

    @functools.wraps(method)
    async def wrapper(self: Self_, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except errors.MeshError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable: abort raises") from exc

    return wrapper


def stream_errors(
    method: Callable[[Self_, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Self_, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Same as `unary_errors` for server-streaming handlers."""

    @functools.wraps(method)
    async def wrapper(self: Self_, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except errors.MeshError as exc:
            await _abort(context, exc)

    return wrapper


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register grpc.health.v1 and server reflection. Health starts NOT_SERVING until the caller says so."""
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


async def wait_for_shutdown_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


MAX_CONNECTION_AGE_S = 120


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        # Request headers up to what Envoy admits at the edge (32 KiB by default) reach the service, which then
        # answers them (e.g. 401 for a 20 KiB authorization header) instead of gRPC's RESOURCE_EXHAUSTED (HTTP 429).
        ("grpc.max_metadata_size", 64 * 1024),
        ("grpc.absolute_max_metadata_size", 64 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients reconnect now and then (GOAWAY after this age, ±10% jitter), so a scaled-out service gets its share:
        # a long-lived HTTP/2 connection through a Kubernetes Service would stay on the pod it first reached.
        # Calls in flight finish within the grace, which covers the longest generation (300 s).
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
        ("grpc.max_connection_age_grace_ms", 360_000),
    ]


def setup_logging(level: str, service: str = "") -> None:
    """JSON lines with the current request id (see llmesh.logs)."""
    from llmesh.logs import setup_logging as setup_json_logging

    setup_json_logging(level, service)
