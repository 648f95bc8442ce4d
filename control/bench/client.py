"""The HTTP side of `llmesh bench`: POST /chat/completions to one OpenAI-compatible target with httpx.

Every outcome becomes a RequestResult (errors included); only programming errors raise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from control.bench.load import Clock
from control.bench.stream import CONNECTION, TIMEOUT, RequestResult, StreamReader, error_from_body, result_from_json
from control.bench.workload import BenchRequest


@dataclass(frozen=True)
class Target:
    name: str
    # Base URL of the OpenAI API, e.g. http://127.0.0.1:8080/v1 (requests go to <base>/chat/completions).
    base_url: str
    # Used for every request when set; otherwise each request's tier picks a key from `tier_keys`; no key at all
    # sends no authorization header (a server without auth, e.g. llama.cpp's).
    api_key: str = ""
    tier_keys: Mapping[str, str] = field(default_factory=dict)

    def key_for(self, tier: str) -> str:
        return self.api_key or self.tier_keys.get(tier, "")


class ChatClient:
    """A `Sender` (control.bench.load) for one target."""

    def __init__(self, http: httpx.AsyncClient, target: Target, stream: bool = True, clock: Clock = time.perf_counter):
        self._http, self._target, self._stream, self._clock = http, target, stream, clock
        self._url = target.base_url.rstrip("/") + "/chat/completions"

    async def __call__(self, request: BenchRequest) -> RequestResult:
        headers = {"content-type": "application/json"}
        key = self._target.key_for(request.tier)
        if key:
            headers["authorization"] = f"Bearer {key}"
        start = self._clock()
        try:
            if self._stream:
                return await self._streamed(request, headers, start)
            reply = await self._http.post(self._url, json=request.payload(stream=False), headers=headers)
            end = self._clock()
            if reply.status_code != 200:
                return self._failed(request, start, end, str(reply.status_code), error_from_body(reply.text))
            return result_from_json(request.index, request.kind, request.tier, start, end, reply.text)
        except httpx.TimeoutException as exc:
            return self._failed(request, start, self._clock(), TIMEOUT, f"{type(exc).__name__}: {exc}")
        except httpx.TransportError as exc:
            return self._failed(request, start, self._clock(), CONNECTION, f"{type(exc).__name__}: {exc}")

    async def _streamed(self, request: BenchRequest, headers: dict[str, str], start: float) -> RequestResult:
        async with self._http.stream("POST", self._url, json=request.payload(stream=True), headers=headers) as reply:
            if reply.status_code != 200:
                body = (await reply.aread()).decode("utf-8", errors="replace")
                return self._failed(request, start, self._clock(), str(reply.status_code), error_from_body(body))
            if reply.headers.get("content-type", "").startswith("application/json"):
                # Some servers answer errors (or ignore "stream") with one JSON body and status 200.
                body = (await reply.aread()).decode("utf-8", errors="replace")
                return result_from_json(request.index, request.kind, request.tier, start, self._clock(), body)
            reader = StreamReader(request.index, request.kind, request.tier, start)
            async for line in reply.aiter_lines():
                reader.line(line, self._clock())
                if reader.done:
                    break
            return reader.result(self._clock())

    @staticmethod
    def _failed(request: BenchRequest, start: float, end: float, status: str, error: str) -> RequestResult:
        return RequestResult(request.index, request.kind, request.tier, start, end, status, error=error)


def http_client(max_connections: int, timeout_s: float) -> httpx.AsyncClient:
    """One connection pool per target, large enough that the pool never queues requests itself."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )
