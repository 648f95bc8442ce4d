"""Non-streaming OpenAI chat calls to any /v1/chat/completions (Envoy's, llama-server's), many in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

# Worth another try: the edge or a quota said "not now", or a keep-alive connection the server had closed.
RETRY_STATUS = (429, 503)
ATTEMPTS = 4


@dataclass(frozen=True)
class Reply:
    text: str
    model: str  # the response's `model`: the variant that answered (the mesh's; llama-server echoes something)
    completion_tokens: int
    seconds: float  # end to end, the successful attempt
    finish_reason: str
    route: dict[str, object]  # the mesh's llmesh_route (variant, reason, kind); {} from llama-server


def parse(body: dict[str, object], seconds: float) -> Reply:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"no choices in {str(body)[:300]}")
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    usage = body.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    route = body.get("llmesh_route")
    return Reply(
        text=text if isinstance(text, str) else "",
        model=str(body.get("model", "")),
        completion_tokens=tokens if isinstance(tokens, int) else 0,
        seconds=seconds,
        finish_reason=str(choices[0].get("finish_reason", "")),
        route=route if isinstance(route, dict) else {},
    )


class ChatClient:
    def __init__(self, base_url: str, api_key: str, concurrency: int, timeout_s: float = 900) -> None:
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.slots = asyncio.Semaphore(concurrency)

    async def ask(self, model: str, messages: Sequence[dict[str, str]], max_tokens: int) -> Reply:
        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0}
        async with self.slots:
            for attempt in range(1, ATTEMPTS + 1):
                start = time.perf_counter()
                try:
                    response = await self.http.post("/v1/chat/completions", json=body)
                except (httpx.RemoteProtocolError, httpx.ConnectError):
                    if attempt == ATTEMPTS:
                        raise
                    continue
                seconds = time.perf_counter() - start
                if response.status_code in RETRY_STATUS and attempt < ATTEMPTS:
                    await asyncio.sleep(min(float(response.headers.get("retry-after", 2 * attempt)), 30.0))
                    continue
                if response.status_code != 200:
                    raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
                return parse(response.json(), seconds)
        raise AssertionError("unreachable")

    async def ask_all(
        self, model: str, conversations: Sequence[Sequence[dict[str, str]]], max_tokens: int
    ) -> list[Reply]:
        """All conversations, up to `concurrency` in flight; replies in the same order."""
        return list(await asyncio.gather(*(self.ask(model, c, max_tokens) for c in conversations)))

    async def close(self) -> None:
        await self.http.aclose()
