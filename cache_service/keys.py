"""What makes two requests "the same": scope, cacheability and the normalized key. No I/O here.

The key covers everything that changes the answer: the variant the router chose (not the model the caller named),
every message with its role and tool calls, a raw completion prompt, the output spec (tools, tool choice, response
format) and every sampling parameter that changes output (penalties, logit bias, stop ids, logprobs and n too).
Fields that cannot change the output are normalized away so that equivalent requests share an entry:
- greedy decoding (temperature 0) ignores top_p and seed;
- the order and repetition of stop strings do not matter;
- `user` and the requested model alias are not part of the key.
Message text is kept byte for byte: whitespace or Unicode form changes the prompt's tokens and so the answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass

from llmesh.types import ChatMessage, OutputSpec, SamplingParams, Tier

# 2: penalties, logit bias, stop ids, logprobs, n, tool turns, output spec and raw prompts joined the key.
KEY_VERSION = 2
PUBLIC_SCOPE = "public"
PLAIN_OUTPUT = OutputSpec()
PREFIX = "llmesh:cache:"
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class ScopePolicy:
    """Who may read whose entries. Default: every API key has its own scope."""

    public_key_ids: frozenset[str] = frozenset()
    public_tiers: frozenset[str] = frozenset()

    @classmethod
    def from_lists(cls, key_ids: str, tiers: str) -> ScopePolicy:
        def split(text: str) -> frozenset[str]:
            return frozenset(p.strip() for p in text.split(",") if p.strip())

        return cls(split(key_ids), split(tiers))

    def scope_for(self, key_id: str, tier: Tier | str) -> str:
        if key_id in self.public_key_ids or str(tier) in self.public_tiers:
            return PUBLIC_SCOPE
        return tenant_scope(key_id)


def tenant_scope(key_id: str) -> str:
    if not _KEY_ID.match(key_id):
        raise ValueError(f"not a key id: {key_id!r}")
    return f"key:{key_id}"


def scope_tag(scope: str) -> str:
    """The scope as it appears in Redis key names: hashed, so no key id can contain glob or separator characters."""
    return hashlib.sha256(scope.encode()).hexdigest()[:20]


def scope_prefix(scope: str) -> str:
    return f"{PREFIX}{scope_tag(scope)}:"


def is_deterministic(sampling: SamplingParams) -> bool:
    return sampling.temperature == 0.0 or sampling.seed is not None


def _number(value: float) -> str:
    # 0, 0.0 and -0.0 are one value; float32 round trips (0.7 -> 0.699999988) are cut to 6 digits.
    return format(float(value) + 0.0, ".6g")


def normalized_sampling(sampling: SamplingParams) -> dict[str, object]:
    greedy = sampling.temperature == 0.0
    return {
        "max_tokens": int(sampling.max_tokens),
        "temperature": _number(sampling.temperature),
        "top_p": None if greedy else _number(sampling.top_p),
        "seed": None if greedy else sampling.seed,
        "stop": sorted(set(sampling.stop)),
        "presence_penalty": _number(sampling.presence_penalty),
        "frequency_penalty": _number(sampling.frequency_penalty),
        "repetition_penalty": _number(sampling.repetition_penalty),
        "logit_bias": [[int(token), _number(bias)] for token, bias in sorted(sampling.logit_bias)],
        "stop_token_ids": sorted(set(sampling.stop_token_ids)),
        "logprobs": [bool(sampling.logprobs), int(sampling.top_logprobs)],
        "n": int(sampling.n),
    }


def _message(m: ChatMessage) -> list[object]:
    if not (m.tool_calls or m.tool_call_id or m.name):
        return [m.role, m.content]
    return [m.role, m.content, [[c.id, c.name, c.arguments] for c in m.tool_calls], m.tool_call_id, m.name]


def _output(output: OutputSpec) -> dict[str, object] | None:
    return None if output == PLAIN_OUTPUT else asdict(output)


def _digest(payload: object) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def exact_digest(
    scope: str,
    variant: str,
    messages: Collection[ChatMessage],
    sampling: SamplingParams,
    output: OutputSpec = PLAIN_OUTPUT,
    prompt: str = "",
) -> str:
    return _digest(
        {
            "v": KEY_VERSION,
            "scope": scope,
            "variant": variant,
            "messages": [_message(m) for m in messages],
            "prompt": prompt,
            "output": _output(output),
            "sampling": normalized_sampling(sampling),
        }
    )


@dataclass(frozen=True)
class SemanticQuery:
    """A request the semantic layer may answer: the text to embed and the bucket its neighbours must share."""

    text: str
    bucket: str


def semantic_query(
    scope: str,
    variant: str,
    messages: Collection[ChatMessage],
    sampling: SamplingParams,
    output: OutputSpec = PLAIN_OUTPUT,
    prompt: str = "",
) -> SemanticQuery | None:
    """Single-turn chat requests for free text only: one user message, optionally after one system message; no
    raw prompt, tools or JSON format (a similar question with another schema wants another answer).

    Everything but the user's text must match exactly (scope, variant, system prompt, sampling), so the bucket
    hashes those; similarity then only compares user questions.
    """
    roles = [m.role for m in messages]
    if roles not in (["user"], ["system", "user"]) or prompt or not output.is_plain:
        return None
    user = list(messages)[-1].content
    if not user.strip():
        return None
    system = next(iter(messages)).content if len(roles) == 2 else None
    bucket = _digest(
        {
            "v": KEY_VERSION,
            "scope": scope,
            "variant": variant,
            "system": system,
            "sampling": normalized_sampling(sampling),
        }
    )
    return SemanticQuery(text=user, bucket=bucket)


@dataclass(frozen=True)
class RedisKeys:
    """Names of everything the cache keeps in Redis. One scope's names share a prefix, so a flush can find them."""

    entry: str
    lock: str

    @classmethod
    def for_digest(cls, scope: str, digest: str) -> RedisKeys:
        prefix = scope_prefix(scope)
        return cls(entry=f"{prefix}e:{digest}", lock=f"{prefix}f:{digest}")


def bucket_key(scope: str, bucket: str) -> str:
    return f"{scope_prefix(scope)}s:{bucket}"


# Bookkeeping shared by all scopes: last access per entry (LRU order), size per entry, total size.
LRU_KEY = PREFIX + "lru"
SIZES_KEY = PREFIX + "sizes"
BYTES_KEY = PREFIX + "bytes"
DONE_CHANNEL = PREFIX + "done"
