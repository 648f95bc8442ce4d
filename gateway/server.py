"""gRPC wiring of the gateway: builds dependencies, serves llmesh.v1.ChatService with health and reflection."""

from __future__ import annotations

import asyncio
import functools
import json
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

from gateway import embeddings as embeddings_api
from gateway import openai_compat, openai_completions
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
from llmesh.convert import logprobs_to_pb, messages_from_pb, output_from_pb, route_to_pb, tool_calls_to_pb
from llmesh.errors import Internal, InvalidRequest, MeshError, NotFound, Unavailable, quote
from llmesh.metrics import serve_metrics
from llmesh.minilm import EMBEDDING_MODEL
from llmesh.redis_auth import redis_auth
from llmesh.tls import TlsFiles, add_port, aio_channel
from llmesh.types import GenerateEvent, OutputSpec, Principal
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


def _output(request: chat_pb2.ChatCompletionRequest) -> OutputSpec:
    if not request.HasField("output"):
        return OutputSpec()
    try:
        return output_from_pb(request.output)
    except InvalidRequest as exc:
        # An unknown tool_choice or response_format: named as the OpenAI request names it, like validate() does.
        param = "tool_choice" if str(exc).startswith("output.tool_choice") else "response_format"
        raise InvalidRequest(str(exc), param=param) from None


def _fields(request: chat_pb2.ChatCompletionRequest) -> ChatRequestFields:
    """The typed request as received; validate() checks it exactly as it checks the OpenAI JSON body."""

    def optional(name: str) -> Any:
        return getattr(request, name) if request.HasField(name) else None

    return ChatRequestFields(
        model=request.model,
        messages=messages_from_pb(request.messages),
        max_tokens=optional("max_tokens"),
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        seed=optional("seed"),
        stop=list(request.stop),
        user=request.user,
        presence_penalty=optional("presence_penalty"),
        frequency_penalty=optional("frequency_penalty"),
        repetition_penalty=optional("repetition_penalty"),
        logit_bias=dict(request.logit_bias),
        logprobs=request.logprobs,
        top_logprobs=optional("top_logprobs"),
        n=optional("n"),
        stop_token_ids=list(request.stop_token_ids),
        output=_output(request),
        prompt=request.prompt,
    )


def _usage_pb(event: GenerateEvent) -> common_pb2.Usage | None:
    if event.usage is None:
        return None
    u = event.usage
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
    )


class ChatServicer:
    def __init__(
        self,
        pipeline: ChatPipeline,
        limits: RequestLimits | None = None,
        embeddings: embeddings_api.Embeddings | None = None,
    ) -> None:
        self._pipeline = pipeline
        self.limits = limits or RequestLimits()
        # None: this gateway serves no embeddings (POST /v1/embeddings answers UNAVAILABLE).
        self._embeddings = embeddings

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
            choices=[
                chat_pb2.Choice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    tool_calls=tool_calls_to_pb(c.tool_calls),
                    logprobs=logprobs_to_pb(c.logprobs),
                )
                for c in done.choices
            ],
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
                id=request_id,
                created=created,
                delta=event.delta,
                finish_reason=event.finish_reason,
                cache=event.cache,
                index=event.index,
                tool_calls=tool_calls_to_pb(event.tool_calls),
                logprobs=logprobs_to_pb(event.logprobs),
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
        return chat_pb2.ModelList(object="list", data=await self._models(principal))

    async def _models(self, principal: Principal) -> list[chat_pb2.Model]:
        """What ListModels lists: auto, the variants the caller's tier may use, the embedding model."""
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
        if self._embeddings is not None:
            models.append(
                chat_pb2.Model(
                    id=EMBEDDING_MODEL,
                    object="model",
                    owned_by="llmesh",
                    description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions) for POST /v1/embeddings",
                )
            )
        return models

    @grpc_util.unary_errors
    @caller_errors
    async def GetModel(self, request: chat_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> chat_pb2.Model:
        principal = await self._principal(context)
        _require_decoded(request)
        for model in await self._models(principal):
            if model.id == request.id:
                return model
        raise NotFound(
            f"the model {quote(request.id)} does not exist or is not served to this key; GET /v1/models lists them",
            param="model",
            code="model_not_found",
        )

    async def _embed(
        self, principal: Principal, request: embeddings_api.EmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> embeddings_api.EmbeddingsResult:
        if self._embeddings is None:
            raise Unavailable("this gateway serves no embeddings")
        headers: list[tuple[str, str]] = []
        result = await self._embeddings.create(principal, request, _request_id(context, self.limits), headers)
        await _send_headers(context, headers)
        return result

    @grpc_util.unary_errors
    @caller_errors
    async def OpenAIEmbeddings(
        self, request: chat_pb2.OpenAIHttpRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        principal = await self._principal(context)
        _require_decoded(request)
        parsed = embeddings_api.parse_request(request.body.data, self.limits)
        result = await self._embed(principal, parsed, context)
        return httpbody_pb2.HttpBody(
            content_type="application/json",
            data=json.dumps(embeddings_api.embeddings_json(result, parsed.encoding_format)).encode(),
        )

    @grpc_util.unary_errors
    @caller_errors
    async def CreateEmbeddings(
        self, request: chat_pb2.EmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.EmbeddingsResponse:
        principal = await self._principal(context)
        _require_decoded(request)
        parsed = embeddings_api.check_request(list(request.input), request.model, request.user, self.limits)
        result = await self._embed(principal, parsed, context)
        return chat_pb2.EmbeddingsResponse(
            model=result.model,
            data=[common_pb2.Embedding(index=i, values=row.tolist()) for i, row in enumerate(result.vectors)],
            usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        )

    @grpc_util.stream_errors
    @caller_stream_errors
    async def OpenAICompletions(
        self, request: chat_pb2.OpenAIHttpRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        principal = await self._principal(context)
        _require_decoded(request)
        parsed = openai_completions.parse_request(request.body.data, self.limits)
        chats = [self._pipeline.validate(fields, principal) for fields in parsed.prompts]
        request_id = _request_id(context, self.limits)
        # One pipeline request per prompt, each with its own id (the limiter keys reservations on it).
        request_ids = [request_id if i == 0 else f"{request_id}-{i}" for i in range(len(chats))]
        completion_id = openai_completions.completion_id(request_id)
        created = int(time.time())
        with_logprobs = chats[0].sampling.logprobs
        if not parsed.stream:
            headers: list[tuple[str, str]] = []
            done = await asyncio.gather(
                *(self._pipeline.complete(principal, chat, rid, headers if i == 0 else None)
                  for i, (chat, rid) in enumerate(zip(chats, request_ids, strict=True)))
            )  # fmt: skip
            await _send_headers(context, headers)
            choices, usage = openai_completions.merge_choices(done, parsed.n)
            yield httpbody_pb2.HttpBody(
                content_type="application/json",
                data=openai_completions.completion_json(
                    completion_id,
                    created,
                    done[0].route.variant,
                    choices,
                    usage,
                    with_logprobs,
                    done[0].route,
                    done[0].cache,
                ),
            )
            return
        stream = openai_completions.CompletionStream(
            completion_id, created, parsed.n, parsed.include_usage, with_logprobs
        )
        stream_headers: list[tuple[str, str]] = []
        events = self._pipeline.stream(principal, chats[0], request_ids[0], stream_headers)
        # Errors before the first event (validation in the router, auth, limits) become an HTTP status.
        first = await anext(aiter(events))
        await _send_headers(context, stream_headers)
        pending = stream.feed(first)
        # The first body names the content type (its data may be empty: the first event may carry only the route).
        yield httpbody_pb2.HttpBody(content_type="text/event-stream", data=b"".join(pending))
        try:
            for index, chat in enumerate(chats):
                stream.start_prompt(index)
                if index:
                    events = self._pipeline.stream(principal, chat, request_ids[index])
                async for event in events:
                    for data in stream.feed(event):
                        yield httpbody_pb2.HttpBody(data=data)
            for data in stream.finish():
                yield httpbody_pb2.HttpBody(data=data)
        except MeshError as exc:
            yield httpbody_pb2.HttpBody(data=openai_compat.sse_error(exc, request_id))
        yield httpbody_pb2.HttpBody(data=openai_compat.SSE_DONE)

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
                    request_id,
                    created,
                    done.route,
                    done.text,
                    done.finish_reason,
                    done.usage,
                    done.cache,
                    choices=done.choices,
                    logprobs=chat.sampling.logprobs,
                ),
            )
            return
        stream_headers: list[tuple[str, str]] = []
        events = self._pipeline.stream(principal, chat, request_id, stream_headers)
        chunks = openai_compat.ChatChunks(
            request_id, created, chat.sampling.n, parsed.include_usage, chat.sampling.logprobs
        )
        # Errors before the first event (validation in the router, auth, limits) become an HTTP status; the
        # first body is only sent once the router has accepted the request.
        first = await anext(aiter(events))
        await _send_headers(context, stream_headers)
        opening = chunks.feed(first)
        yield httpbody_pb2.HttpBody(content_type="text/event-stream", data=opening[0])
        for data in opening[1:]:
            yield httpbody_pb2.HttpBody(data=data)
        try:
            async for event in events:
                for data in chunks.feed(event):
                    yield httpbody_pb2.HttpBody(data=data)
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
        "OpenAICompletions": grpc.unary_stream_rpc_method_handler(
            servicer.OpenAICompletions,
            request_deserializer=tolerant_deserializer(chat_pb2.OpenAIHttpRequest),
            response_serializer=serialize,
        ),
        "OpenAIEmbeddings": grpc.unary_unary_rpc_method_handler(
            servicer.OpenAIEmbeddings,
            request_deserializer=tolerant_deserializer(chat_pb2.OpenAIHttpRequest),
            response_serializer=serialize,
        ),
        "CreateEmbeddings": grpc.unary_unary_rpc_method_handler(
            servicer.CreateEmbeddings,
            request_deserializer=tolerant_deserializer(chat_pb2.EmbeddingsRequest),
            response_serializer=serialize,
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            servicer.GetModel,
            request_deserializer=tolerant_deserializer(chat_pb2.GetModelRequest),
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
    # Embeddings: reserved and settled like chat, on the router's Embed.
    embed_client = embeddings_api.GrpcEmbedClient(settings.router_url, tls=tls)
    embeddings = embeddings_api.Embeddings(embed_client, guarded_quotas)
    server.add_generic_rpc_handlers((_handlers(ChatServicer(pipeline, limits, embeddings)),))
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
    await embed_client.close()
    if cache is not None:
        await cache.close()
    if limiter_probe is not None:
        await limiter_probe.close()
    await keys.aclose()
    await redis.aclose()
