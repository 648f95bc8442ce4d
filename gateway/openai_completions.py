"""OpenAI's legacy completions JSON <-> llmesh types, for POST /v1/completions (plain JSON or SSE).

A prompt is continued as it is, without the chat template (ChatRequest.prompt). Request fields (docs/openapi.yaml
says the same to clients):
- served: model, prompt (a string, or an array of 1..MAX_PROMPTS strings: one choice per prompt, times n),
  max_tokens (default DEFAULT_MAX_TOKENS, OpenAI's 16), temperature, top_p, n, stop, seed, presence_penalty,
  frequency_penalty, logit_bias, logprobs (an integer 0..MAX_LOGPROBS: OpenAI's legacy shape, tokens /
  token_logprobs / top_logprobs / text_offset), stream, stream_options.include_usage, user; every value is
  checked by gateway/validation.validate, as a chat request's is;
- refused unless neutral: echo (only false), suffix (only null or ""), best_of (only null or equal to n);
- refused: a prompt of token ids (ids in which vocabulary? the router picks the variant), any other field.
`null` always means "the default". Each prompt of an array is its own request to the pipeline (cache, quotas,
router), in order: an array of k prompts counts k requests against the caller's quotas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.openai_compat import decode_body, is_int, json_type, route_json, usage_json
from gateway.pipeline import ChoiceOutput, Completion
from gateway.validation import ChatRequestFields, RequestLimits
from llmesh.errors import InvalidRequest, quote
from llmesh.types import GenerateEvent, RouteInfo, TokenLogprob, Usage

# OpenAI's default for /v1/completions (chat's default comes from the gateway's settings).
DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 16
MAX_LOGPROBS = 5
MIN_LOGPROB = -9999.0

_SERVED = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "stream",
        "stream_options",
        "user",
    }
)
_REFUSED_UNLESS_NEUTRAL = frozenset({"echo", "suffix", "best_of"})
REQUEST_FIELDS = {"served": _SERVED, "refused_unless_neutral": _REFUSED_UNLESS_NEUTRAL}


@dataclass(frozen=True)
class CompletionsRequest:
    """One ChatRequestFields per prompt (prompt set, messages empty), validated by the pipeline like chat's."""

    prompts: tuple[ChatRequestFields, ...]
    stream: bool
    include_usage: bool
    # Choices per prompt (the n asked for).
    n: int = 1


@dataclass
class ChoiceText:
    """One choice as it is assembled from the pipeline's events."""

    index: int
    text: str = ""
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


class _Payload:
    """Typed reads of the body's fields; a wrong type is a 400 naming the field."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def get(self, name: str, kind: str) -> Any:
        value = self.payload.get(name)
        if value is None:
            return None
        ok = {
            "int": is_int(value),
            "number": _is_number(value),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "object": isinstance(value, dict),
        }[kind]
        if not ok:
            want = {"int": "an integer", "number": "a number", "str": "a string", "bool": "a boolean"}
            raise InvalidRequest(f"{name} must be {want.get(kind, 'an object')}, got {json_type(value)}", param=name)
        return value


def _prompts(value: Any) -> list[str]:
    if value is None:
        raise InvalidRequest("prompt is missing: a string, or an array of strings, to continue", param="prompt")
    token_ids = _unsupported(
        "prompt", "prompt as token ids is not supported by llmesh: send the text (a string or an array of strings)"
    )
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list):
        if not value:
            raise InvalidRequest("prompt is an empty array: it needs at least one string", param="prompt")
        prompts = []
        for index, item in enumerate(value):
            if is_int(item) or isinstance(item, list):
                raise token_ids
            if not isinstance(item, str):
                raise InvalidRequest(f"prompt[{index}] must be a string, got {json_type(item)}", param="prompt")
            prompts.append(item)
    else:
        raise InvalidRequest(f"prompt must be a string or an array of strings, got {json_type(value)}", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt holds {len(prompts)} strings; the limit is {MAX_PROMPTS}", param="prompt")
    for index, prompt in enumerate(prompts):
        if not prompt:
            where = "prompt" if isinstance(value, str) else f"prompt[{index}]"
            raise InvalidRequest(f"{where} is empty: there is nothing to continue", param="prompt")
    return prompts


def _logit_bias(value: dict[str, Any]) -> dict[int, float]:
    parsed: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.lstrip("-").isdigit() and len(key) <= 12):
            raise InvalidRequest(
                f"logit_bias key {quote(key)} is not a token id (an integer, written as a string)", param="logit_bias"
            )
        if not _is_number(bias):
            raise InvalidRequest(
                f"logit_bias[{quote(key, 12)}] must be a number, got {json_type(bias)}", param="logit_bias"
            )
        parsed[int(key)] = float(bias)
    return parsed


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidRequest(f"stop[{index}] must be a string, got {json_type(item)}", param="stop")
        return list(value)
    raise InvalidRequest(f"stop must be a string or an array of strings, got {json_type(value)}", param="stop")


def parse_request(body: bytes, limits: RequestLimits | None = None) -> CompletionsRequest:
    limits = limits or RequestLimits()
    payload = decode_body(body, limits)
    if not isinstance(payload, dict):
        raise InvalidRequest(f"request body must be an object, got {json_type(payload)}")
    for key in payload:
        if key not in _SERVED | _REFUSED_UNLESS_NEUTRAL:
            raise InvalidRequest(
                f"unrecognized request argument {quote(key)}", param=key[:80], code="unknown_parameter"
            )
    body_fields = _Payload(payload)
    if body_fields.get("echo", "bool"):
        raise _unsupported("echo", "echo is not supported by llmesh; it accepts only null or false here")
    if body_fields.get("suffix", "str"):
        raise _unsupported("suffix", 'suffix is not supported by llmesh; it accepts only null or "" here')
    n = body_fields.get("n", "int")
    best_of = body_fields.get("best_of", "int")
    if best_of is not None and best_of != (1 if n is None else n):
        raise _unsupported("best_of", "best_of is not supported by llmesh; it accepts only null or the value of n")
    logprobs = body_fields.get("logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {quote(logprobs, 24)}", param="logprobs")
    max_tokens = body_fields.get("max_tokens", "int")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens_limit)
    options = body_fields.get("stream_options", "object") or {}
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise InvalidRequest(
                f"unrecognized request argument {quote(key)} in stream_options",
                param=f"stream_options.{key}"[:80],
                code="unknown_parameter",
            )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise InvalidRequest(
            f"stream_options.include_usage must be a boolean, got {json_type(include_usage)}",
            param="stream_options.include_usage",
        )
    stops = _stops(payload.get("stop"))
    logit_bias = _logit_bias(body_fields.get("logit_bias", "object") or {})
    prompts = tuple(
        ChatRequestFields(
            model=body_fields.get("model", "str") or "",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=body_fields.get("temperature", "number"),
            top_p=body_fields.get("top_p", "number"),
            seed=body_fields.get("seed", "int"),
            stop=stops,
            user=body_fields.get("user", "str") or "",
            presence_penalty=body_fields.get("presence_penalty", "number"),
            frequency_penalty=body_fields.get("frequency_penalty", "number"),
            logit_bias=logit_bias,
            logprobs=None if logprobs is None else True,
            top_logprobs=logprobs,
            n=n,
        )
        for prompt in _prompts(payload.get("prompt"))
    )
    return CompletionsRequest(
        prompts=prompts,
        stream=bool(body_fields.get("stream", "bool")),
        include_usage=bool(include_usage),
        n=1 if n is None else n,
    )


def completion_id(request_id: str) -> str:
    """OpenAI's id prefix for completions, on the gateway's request id (chatcmpl-...)."""
    return "cmpl-" + request_id.removeprefix("chatcmpl-")


def _finite(value: float) -> float:
    # JSON has no -Infinity: OpenAI's stand-in for a log probability too small to write.
    return value if value > MIN_LOGPROB else MIN_LOGPROB


def legacy_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completion logprobs: per token its text, log probability, the top alternatives as a
    {token: logprob} object, and where it starts in the choice's text (`offset`: the text before these tokens)."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{t.token: _finite(t.logprob) for t in lp.top_logprobs} for lp in logprobs],
        "text_offset": offsets,
    }


def completion_json(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[ChoiceText],
    usage: Usage,
    with_logprobs: bool,
    route: RouteInfo | None = None,
    cache: str = "",
) -> bytes:
    """OpenAI's Completion object, choices in index order."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "text": choice.text,
                "index": choice.index,
                "logprobs": legacy_logprobs(choice.logprobs) if with_logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in sorted(choices, key=lambda c: c.index)
        ],
        "usage": usage_json(usage),
    }
    if route is not None:
        body["llmesh_route"] = route_json(route)
    body["llmesh_cache"] = cache
    return json.dumps(body, ensure_ascii=False).encode()


def sse_chunk(
    completion_id: str,
    created: int,
    model: str,
    choice: ChoiceText | None,
    with_logprobs: bool = False,
    logprob_offset: int = 0,
    usage: Usage | None = None,
    route: RouteInfo | None = None,
    cache: str = "",
) -> bytes:
    """One SSE event: a Completion object whose choice holds a text delta (finish_reason on the choice's last), or,
    with `choice` None, no choices and the usage (stream_options.include_usage)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": []
        if choice is None
        else [
            {
                "text": choice.text,
                "index": choice.index,
                "logprobs": legacy_logprobs(choice.logprobs, logprob_offset) if with_logprobs else None,
                "finish_reason": choice.finish_reason or None,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = usage_json(usage)
    if route is not None:
        chunk["llmesh_route"] = route_json(route)
    if cache:
        chunk["llmesh_cache"] = cache
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


class CompletionStream:
    """The SSE events of one /v1/completions stream, made from the pipeline's events prompt after prompt (call
    `start_prompt` before each prompt's events); `finish` gives the closing usage event when it was asked for."""

    def __init__(
        self, completion_id: str, created: int, n: int, include_usage: bool, with_logprobs: bool = False
    ) -> None:
        self._id = completion_id
        self._created = created
        self._n = max(1, n)
        self._include_usage = include_usage
        self._with_logprobs = with_logprobs
        self._base = 0
        self._model = ""
        self._route: RouteInfo | None = None
        self._offsets: dict[int, int] = {}
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self.cache = ""

    def start_prompt(self, prompt_index: int) -> None:
        self._base = prompt_index * self._n

    def feed(self, event: GenerateEvent) -> list[bytes]:
        if event.route is not None:
            self._model = self._model or event.route.variant
            self._route = event.route
        self.cache = event.cache or self.cache
        if event.usage is not None:
            self._prompt_tokens += event.usage.prompt_tokens
            self._completion_tokens += event.usage.completion_tokens
        if not (event.delta or event.logprobs or event.finish_reason):
            return []
        index = self._base + event.index
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(event.delta)
        choice = ChoiceText(index, event.delta, event.finish_reason, list(event.logprobs))
        route, self._route = self._route, None
        return [
            sse_chunk(
                self._id,
                self._created,
                self._model,
                choice,
                self._with_logprobs,
                logprob_offset=offset,
                route=route,
                cache=event.cache,
            )
        ]

    def finish(self) -> list[bytes]:
        if not self._include_usage:
            return []
        usage = Usage(self._prompt_tokens, self._completion_tokens)
        return [sse_chunk(self._id, self._created, self._model, None, usage=usage, cache=self.cache)]


def merge_choices(completions: Sequence[Completion], n: int) -> tuple[list[ChoiceText], Usage]:
    """The choices of one completion per prompt, numbered as OpenAI does (prompt index * n + choice), and the usage
    of all of them."""
    choices = [
        ChoiceText(p * max(1, n) + c.index, c.text, c.finish_reason, list(c.logprobs))
        for p, completion in enumerate(completions)
        for c in (completion.choices or (ChoiceOutput(0, completion.text, completion.finish_reason),))
    ]
    usage = Usage(sum(c.usage.prompt_tokens for c in completions), sum(c.usage.completion_tokens for c in completions))
    return choices, usage
