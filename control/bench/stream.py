"""One answer, read into a `RequestResult`: SSE lines as they arrive (with their arrival times), or a JSON body.

Pure: the HTTP client feeds lines and timestamps; tests feed canned ones.

Cache marks: the mesh sets `llmesh_cache` ("exact" / "semantic") on chunks of an answer replayed from its response
cache, and appends "<layer> cache hit" to `llmesh_route.reason`. Either one marks a hit. A reply carrying
`llmesh_route` but no hit mark is a miss; a reply with neither field (another server) leaves the cache unknown.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

OK = "ok"
# Error kinds that are not an HTTP status.
TIMEOUT = "timeout"
CONNECTION = "connection"
STREAM_ERROR = "stream_error"  # an error event after the stream started (HTTP status already 200)
BAD_RESPONSE = "bad_response"  # not the OpenAI schema


@dataclass(frozen=True)
class RequestResult:
    index: int
    kind: str
    tier: str
    # Seconds on the client's monotonic clock.
    start: float
    end: float
    # OK, an HTTP status code as text ("429"), or one of the error kinds above.
    status: str
    # Seconds from sending to the first non-empty content; None when no content arrived.
    ttft: float | None = None
    # Gaps between successive content chunks (streaming only).
    itl: tuple[float, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # True when the server reported usage; otherwise completion_tokens counts content chunks.
    usage_reported: bool = False
    variant: str = ""
    # None: the server does not say; "": generated; "exact", "semantic" (or "hit" from the route reason): cached.
    cache: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def cache_hit(self) -> bool:
        return bool(self.cache)


def _cache_mark(body: dict[str, Any]) -> str | None:
    """The hit layer, "" for a known miss, None when this body says nothing about the cache."""
    layer = body.get("llmesh_cache")
    if isinstance(layer, str) and layer:
        return layer
    route = body.get("llmesh_route")
    if isinstance(route, dict):
        reason = route.get("reason")
        if isinstance(reason, str) and "cache hit" in reason:
            return "hit"
        return ""
    if isinstance(layer, str):
        return ""
    return None


def _merge_cache(current: str | None, mark: str | None) -> str | None:
    """A hit seen on any chunk stays a hit; a named layer wins over the route's generic "hit"."""
    if mark is None:
        return current
    if current and current != "hit":
        return current
    if mark:
        return mark
    return current if current is not None else mark


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return ""


def error_from_body(text: str) -> str:
    """The message of an error reply (OpenAI's {"error": {"message"}} or the mesh's {"message"}), else the text."""
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = ""
    return (message or text.strip())[:300]


def _usage(body: dict[str, Any]) -> tuple[int, int] | None:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


class StreamReader:
    """Accumulates one SSE answer. Call `line` for each line with its arrival time, then `result`."""

    def __init__(self, index: int, kind: str, tier: str, start: float) -> None:
        self._index, self._kind, self._tier, self._start = index, kind, tier, start
        self._token_times: list[float] = []
        self._usage: tuple[int, int] | None = None
        self._variant = ""
        self._cache: str | None = None
        self._error = ""
        self._status = OK
        self.done = False

    def line(self, text: str, now: float) -> None:
        text = text.strip()
        if not text.startswith("data:") or self.done:
            return  # blank separators, comments, event names
        data = text[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._fail(BAD_RESPONSE, f"not JSON: {data[:100]}")
            return
        if not isinstance(chunk, dict):
            self._fail(BAD_RESPONSE, f"not a JSON object: {data[:100]}")
            return
        if "error" in chunk:
            self._fail(STREAM_ERROR, _error_message(chunk) or data[:300])
            return
        if not self._variant and isinstance(chunk.get("model"), str):
            self._variant = chunk["model"]
        self._cache = _merge_cache(self._cache, _cache_mark(chunk))
        self._usage = _usage(chunk) or self._usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str) and delta["content"]:
                    self._token_times.append(now)

    def _fail(self, status: str, message: str) -> None:
        if self._status == OK:
            self._status, self._error = status, message

    def result(self, end: float) -> RequestResult:
        status, error = self._status, self._error
        if status == OK and not self.done:
            status, error = BAD_RESPONSE, "the stream ended without data: [DONE]"
        times = self._token_times
        usage = self._usage
        return RequestResult(
            index=self._index,
            kind=self._kind,
            tier=self._tier,
            start=self._start,
            end=end,
            status=status,
            ttft=times[0] - self._start if times else None,
            itl=tuple(b - a for a, b in itertools.pairwise(times)),
            prompt_tokens=usage[0] if usage else 0,
            completion_tokens=usage[1] if usage else len(times),
            usage_reported=usage is not None,
            variant=self._variant,
            cache=self._cache,
            error=error,
        )


def result_from_json(index: int, kind: str, tier: str, start: float, end: float, text: str) -> RequestResult:
    """A non-streaming answer: the whole body arrives at once, so TTFT is the end-to-end time and there is no ITL."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return RequestResult(index, kind, tier, start, end, BAD_RESPONSE, error=f"unexpected body: {text[:200]}")
    usage = _usage(body)
    return RequestResult(
        index=index,
        kind=kind,
        tier=tier,
        start=start,
        end=end,
        status=OK,
        ttft=end - start,
        prompt_tokens=usage[0] if usage else 0,
        completion_tokens=usage[1] if usage else 0,
        usage_reported=usage is not None,
        variant=str(body["model"]) if isinstance(body.get("model"), str) else "",
        cache=_cache_mark(body),
    )
