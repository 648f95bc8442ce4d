"""gRPC wiring of the gateway: builds dependencies, serves llmesh.v1.ChatService with health and reflection."""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry

from gateway import openai_compat
from gateway.admission import RefusalMemory
from gateway.auth import CachedKeyStore, KeyCacheSettings, RedisApiKeyStore
from gateway.caching import GrpcCacheClient
from gateway.config import GatewaySettings
from gateway.limiter_outage import LimiterOutagePolicy, parse_tiers
from gateway.metrics import PrometheusGatewayObserver, parse_prices
from gateway.pipeline import ChatPipeline
from gateway.quotas import GrpcQuotaGate
from gateway.router_client import GrpcRouterClient
from gateway.validation import ChatRequestFields, RequestLimits, check_request_id
from llmesh import grpc_util
from llmesh.budgets import CHANNEL_OPTIONS, health_probe
from llmesh.convert import route_to_pb
from llmesh.errors import Internal, InvalidRequest, MeshError
from llmesh.metrics import serve_metrics
from llmesh.redis_auth import redis_auth
from llmesh.tls import TlsFiles, add_port, aio_channel
from llmesh.types import GenerateEvent, Principal
from llmesh.v1 import chat_pb2, common_pb2

log = logging.getLogger(__name__)

SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
SERVICE_NAME = SERVICE.full_name
AUTO_MODEL = "auto"


class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8 in a string field),
    so the handler can answer INVALID_ARGUMENT instead of gRPC's generic deserialization failure."""

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant_deserializer(message_type: type[Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(str(exc) or "malformed message")

    return deserialize


def _require_decoded(request: Any) -> None:
    if isinstance(request, UndecodableRequest):
        raise InvalidRequest(f"request could not be decoded (strings must be valid UTF-8): {request.error}")


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value if isinstance(item.value, str) else item.value.decode()
    return None


async def _send_headers(context: grpc.aio.ServicerContext, headers: list[tuple[str, str]]) -> None:
    """Quota headers go out as initial metadata right before the first message, never earlier: an error before
    that point must still end the call as a trailers-only status (an HTTP 4xx/5xx through Envoy, not a 200)."""
    if headers:
        await context.send_initial_metadata(tuple(headers))


def _request_id(context: grpc.aio.ServicerContext, limits: RequestLimits) -> str:
    # Envoy puts an x-request-id on every request; keep it so logs line up across hops. A client may send its own
    # (Envoy keeps it): it becomes part of ids, logs and Redis keys, so it is checked like any client value.
    header = _metadata(context, "x-request-id")
    return "chatcmpl-" + (uuid.uuid4().hex if header is None else check_request_id(header, limits))


def _error_request_id(context: grpc.aio.ServicerContext, limits: RequestLimits) -> str:
    try:
        return _request_id(context, limits)
    except InvalidRequest:
        return "chatcmpl-" + uuid.uuid4().hex


def _for_caller(exc: MeshError, context: grpc.aio.ServicerContext, limits: RequestLimits) -> MeshError:
    """The error as the caller gets it (a server-side failure's message without internal detail). For a call
    that Envoy transcoded from HTTP/JSON (it sets x-envoy-original-path), the OpenAI-shaped body travels along in
    the x-llmesh-error trailer; Envoy's Lua filter on the edge makes it the HTTP body and drops the header."""
    request_id = _error_request_id(context, limits)
    if _metadata(context, "x-envoy-original-path") is not None:
        exc.metadata = (*exc.metadata, ("x-llmesh-error", openai_compat.error_json(exc, request_id)))
    exc.args = (openai_compat.caller_message(exc, request_id),)
    return exc


def _unexpected(exc: Exception, context: grpc.aio.ServicerContext, limits: RequestLimits) -> MeshError:
    """A bug, not the caller's answer: logged with its stack; the caller learns only that it happened."""
    log.exception("unexpected error in %s", type(exc).__name__)
    return _for_caller(Internal("unexpected error"), context, limits)


_Handler = Any


def caller_errors(method: _Handler) -> _Handler:
    """Inside grpc_util.unary_errors: every error a caller sees is made fit for callers (see _for_caller)."""

    @functools.wraps(method)
    async def wrapper(self: ChatServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except MeshError as exc:
            raise _for_caller(exc, context, self.limits) from None
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            raise _unexpected(exc, context, self.limits) from exc

    return wrapper


def caller_stream_errors(method: _Handler) -> _Handler:
    """`caller_errors` for server-streaming handlers."""

    @functools.wraps(method)
    async def wrapper(self: ChatServicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except MeshError as exc:
            raise _for_caller(exc, context, self.limits) from None
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            raise _unexpected(exc, context, self.limits) from exc

    return wrapper


def _fields(request: chat_pb2.ChatCompletionRequest) -> ChatRequestFields:
    return ChatRequestFields(
        model=request.model,
        messages=[(m.role, m.content) for m in request.messages],
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        seed=request.seed if request.HasField("seed") else None,
        stop=list(request.stop),
        user=request.user,
    )


def _usage_pb(event: GenerateEvent) -> common_pb2.Usage | None:
    if event.usage is None:
        return None
    u = event.usage
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
    )


class ChatServicer:
    def __init__(self, pipeline: ChatPipeline, limits: RequestLimits | None = None) -> None:
        self._pipeline = pipeline
        self.limits = limits or RequestLimits()

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return await self._pipeline.authenticate(_metadata(context, "authorization"))

    @grpc_util.unary_errors
    @caller_errors
    async def CreateChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatCompletion:
        principal = await self._principal(context)
        _require_decoded(request)
        chat = self._pipeline.validate(_fields(request), principal)
        request_id = _request_id(context, self.limits)
        headers: list[tuple[str, str]] = []
        done = await self._pipeline.complete(principal, chat, request_id, headers)
        await _send_headers(context, headers)
        u = done.usage
        return chat_pb2.ChatCompletion(
            id=request_id,
            model=done.route.variant,
            created=int(time.time()),
            text=done.text,
            finish_reason=done.finish_reason,
            usage=common_pb2.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
            ),
            route=route_to_pb(done.route),
            cache=done.cache,
        )

    @grpc_util.stream_errors
    @caller_stream_errors
    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        principal = await self._principal(context)
        _require_decoded(request)
        chat = self._pipeline.validate(_fields(request), principal)
        request_id = _request_id(context, self.limits)
        created = int(time.time())
        model = ""
        headers: list[tuple[str, str]] = []
        async for event in self._pipeline.stream(principal, chat, request_id, headers):
            chunk = chat_pb2.ChatCompletionChunk(
                id=request_id, created=created, delta=event.delta, finish_reason=event.finish_reason, cache=event.cache
            )
            if event.route is not None:
                model = event.route.variant
                chunk.route.CopyFrom(route_to_pb(event.route))
            chunk.model = model
            usage = _usage_pb(event)
            if usage is not None:
                chunk.usage.CopyFrom(usage)
            if headers:
                await _send_headers(context, headers)
                headers = []
            yield chunk

    @grpc_util.unary_errors
    @caller_errors
    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ModelList:
        principal = await self._principal(context)
        variants = await self._pipeline.list_models(principal)
        models = [
            chat_pb2.Model(
                id=AUTO_MODEL,
                object="model",
                owned_by="llmesh",
                description=f"the router picks a variant for the {principal.tier.value} tier",
            )
        ]
        models += [
            chat_pb2.Model(
                id=v.name,
                object="model",
                owned_by="llmesh",
                description=f"{v.description}; context {v.context_length} tokens",
            )
            for v in variants
        ]
        return chat_pb2.ModelList(object="list", data=models)

    @grpc_util.stream_errors
    @caller_stream_errors
    async def OpenAIChatCompletions(
        self, request: chat_pb2.OpenAIHttpRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        principal = await self._principal(context)
        _require_decoded(request)
        parsed = openai_compat.parse_request(request.body.data, self.limits)
        chat = self._pipeline.validate(parsed.fields, principal)
        request_id = _request_id(context, self.limits)
        created = int(time.time())
        if not parsed.stream:
            headers: list[tuple[str, str]] = []
            done = await self._pipeline.complete(principal, chat, request_id, headers)
            await _send_headers(context, headers)
            yield httpbody_pb2.HttpBody(
                content_type="application/json",
                data=openai_compat.completion_json(
                    request_id, created, done.route, done.text, done.finish_reason, done.usage, done.cache
                ),
            )
            return
        model = ""
        stream_headers: list[tuple[str, str]] = []
        events = self._pipeline.stream(principal, chat, request_id, stream_headers)
        # Errors before the first event (validation in the router, auth, limits) become an HTTP status; the
        # first body is only sent once the router has accepted the request.
        first = await anext(aiter(events))
        route = first.route
        model = route.variant if route else ""
        cache = first.cache
        await _send_headers(context, stream_headers)
        yield httpbody_pb2.HttpBody(
            content_type="text/event-stream",
            data=openai_compat.sse_chunk(
                request_id, created, model, {"role": "assistant", "content": ""}, route=route, cache=cache
            ),
        )
        try:
            async for event in events:
                if event.delta:
                    yield httpbody_pb2.HttpBody(
                        data=openai_compat.sse_chunk(request_id, created, model, {"content": event.delta}, cache=cache)
                    )
                if event.finish_reason:
                    yield httpbody_pb2.HttpBody(
                        data=openai_compat.sse_chunk(
                            request_id, created, model, {}, finish_reason=event.finish_reason, cache=cache
                        )
                    )
                    if parsed.include_usage and event.usage is not None:
                        yield httpbody_pb2.HttpBody(
                            data=openai_compat.sse_chunk(
                                request_id, created, model, None, usage=event.usage, cache=cache
                            )
                        )
        except MeshError as exc:
            yield httpbody_pb2.HttpBody(data=openai_compat.sse_error(exc, request_id))
        yield httpbody_pb2.HttpBody(data=openai_compat.SSE_DONE)


def _handlers(servicer: ChatServicer) -> grpc.GenericRpcHandler:
    def serialize(message: Message) -> bytes:
        return message.SerializeToString()

    methods = {
        "CreateChatCompletion": grpc.unary_unary_rpc_method_handler(
            servicer.CreateChatCompletion,
            request_deserializer=tolerant_deserializer(chat_pb2.ChatCompletionRequest),
            response_serializer=serialize,
        ),
        "StreamChatCompletion": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChatCompletion,
            request_deserializer=tolerant_deserializer(chat_pb2.ChatCompletionRequest),
            response_serializer=serialize,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=tolerant_deserializer(chat_pb2.ListModelsRequest),
            response_serializer=serialize,
        ),
        "OpenAIChatCompletions": grpc.unary_stream_rpc_method_handler(
            servicer.OpenAIChatCompletions,
            request_deserializer=tolerant_deserializer(chat_pb2.OpenAIHttpRequest),
            response_serializer=serialize,
        ),
    }
    missing = set(SERVICE.methods_by_name) - set(methods)
    if missing:
        raise RuntimeError(f"ChatService methods without a handler: {sorted(missing)}")
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


async def serve(settings: GatewaySettings) -> None:
    tls = TlsFiles.of(settings)
    try:
        fail_open_tiers = parse_tiers(settings.limiter_fail_open_tiers)
    except ValueError as exc:
        raise SystemExit(f"--limiter-fail-open-tiers: {exc}") from None
    redis_options = redis_auth(settings, os.environ).client_options(settings.redis_url)
    redis = aioredis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, **redis_options)
    router = GrpcRouterClient(
        settings.router_url,
        tls=tls,
        hang_budget_s=settings.router_hang_budget_s,
        cooldown_s=settings.dependency_cooldown_s,
    )
    registry = CollectorRegistry()
    # The response cache is optional: empty cache_url = no cache; an unreachable one is bypassed per request.
    cache = (
        GrpcCacheClient(
            settings.cache_url,
            settings.cache_timeout_s,
            cooldown_s=settings.dependency_cooldown_s,
            tls=tls,
            hang_budget_s=settings.cache_hang_budget_s,
        )
        if settings.cache_url
        else None
    )
    quotas = GrpcQuotaGate(settings.limiter_url, settings.limiter_timeout_s, tls=tls) if settings.limiter_url else None
    # A hung or unreachable limiter: the tiers' outage policy after limiter_hang_budget_s (gateway/limiter_outage.py).
    limiter_probe = aio_channel(settings.limiter_url, tls, CHANNEL_OPTIONS) if settings.limiter_url else None
    guarded_quotas = (
        LimiterOutagePolicy(
            quotas,
            health_probe(limiter_probe),
            fail_open_tiers,
            hang_budget_s=settings.limiter_hang_budget_s,
            confirm_s=settings.limiter_timeout_s,
            cooldown_s=settings.dependency_cooldown_s,
        )
        if quotas is not None and limiter_probe is not None
        else None
    )
    limits = RequestLimits.of(settings)
    keys = CachedKeyStore(
        RedisApiKeyStore(redis),
        KeyCacheSettings(
            ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=settings.key_cache_negative_ttl_s,
            max_stale_s=settings.key_cache_max_stale_s,
            max_entries=settings.key_cache_max_entries,
            max_negative_entries=settings.key_cache_max_entries,
            retry_s=settings.key_store_retry_s,
            last_used_interval_s=settings.key_last_used_interval_s,
        ),
    )
    pipeline = ChatPipeline(
        keys=keys,
        router=router,
        limits=limits,
        cache=cache,
        quotas=guarded_quotas,
        observer=PrometheusGatewayObserver(registry, parse_prices(settings.prices_per_1k)),
        refusals=RefusalMemory(settings.quota_refusal_memory_s),
    )
    serve_metrics(registry, settings.host, settings.metrics_port)
    server = grpc.aio.server(options=grpc_util.server_options())
    server.add_generic_rpc_handlers((_handlers(ChatServicer(pipeline, limits)),))
    health = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])
    address = f"{settings.host}:{settings.port}"
    add_port(server, address, tls)
    await server.start()
    grpc_util.set_serving(health, [SERVICE_NAME], True)
    log.info("gateway listening on %s, router %s", address, settings.router_url)
    await grpc_util.wait_for_shutdown_signal()
    grpc_util.set_serving(health, [SERVICE_NAME], False)
    await server.stop(grace=settings.shutdown_grace_s)
    # Requests cut off by the stop still settle their reservations and fill or release their cache entries: wait
    # for that (bounded) before closing the clients those calls need.
    drain_until = time.monotonic() + settings.shutdown_drain_s
    unfinished = await pipeline.drain(settings.shutdown_drain_s)
    if unfinished:
        log.warning("%d settlements/cache stores unfinished at shutdown", unfinished)
    if quotas is not None:
        await quotas.close(max(0.0, drain_until - time.monotonic()))
    await router.close()
    if cache is not None:
        await cache.close()
    if limiter_probe is not None:
        await limiter_probe.close()
    await keys.aclose()
    await redis.aclose()
