"""Key normalization, cacheability and tenant scopes of the response cache."""

from __future__ import annotations

import pytest

from cache_service.keys import (
    PUBLIC_SCOPE,
    RedisKeys,
    ScopePolicy,
    exact_digest,
    is_deterministic,
    scope_prefix,
    semantic_query,
    tenant_scope,
)
from cache_service.semantic import lexically_compatible
from llmesh.types import ChatMessage, SamplingParams, Tier

USER = (ChatMessage("user", "What is the capital of France?"),)
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
SCOPE = tenant_scope("0123456789abcdef")


def digest(messages=USER, sampling=GREEDY, variant="small", scope=SCOPE) -> str:  # type: ignore[no-untyped-def]
    return exact_digest(scope, variant, messages, sampling)


def test_equivalent_requests_share_a_key() -> None:
    base = digest()
    # Greedy decoding ignores top_p and seed; -0.0 is 0.
    assert digest(sampling=SamplingParams(max_tokens=32, temperature=-0.0, top_p=0.5, seed=9)) == base
    # Stop strings: order and repeats do not matter.
    a = SamplingParams(max_tokens=32, temperature=0.0, stop=("b", "a"))
    b = SamplingParams(max_tokens=32, temperature=0.0, stop=("a", "b", "a"))
    assert digest(sampling=a) == digest(sampling=b) != base
    # float32 round trips of the same temperature through protobuf.
    seeded = SamplingParams(max_tokens=32, temperature=0.7, seed=1)
    assert digest(sampling=seeded) == digest(sampling=SamplingParams(max_tokens=32, temperature=0.699999988, seed=1))


@pytest.mark.parametrize(
    "change",
    [
        {"messages": (ChatMessage("user", "What is the capital of Spain?"),)},
        {"messages": (ChatMessage("user", "What is the capital of France? "),)},  # whitespace changes tokens
        {"messages": (ChatMessage("system", "What is the capital of France?"),)},
        {"messages": (ChatMessage("system", "Be brief."), *USER)},
        {"sampling": SamplingParams(max_tokens=33, temperature=0.0)},
        {"sampling": SamplingParams(max_tokens=32, temperature=0.0, stop=("\n",))},
        {"sampling": SamplingParams(max_tokens=32, temperature=0.5, seed=1)},
        {"variant": "large"},
        {"scope": tenant_scope("fedcba9876543210")},
        {"scope": PUBLIC_SCOPE},
    ],
)
def test_anything_that_changes_the_answer_changes_the_key(change: dict) -> None:  # type: ignore[type-arg]
    assert digest(**change) != digest()


def test_sampled_requests_keep_seed_and_top_p() -> None:
    one = SamplingParams(max_tokens=32, temperature=0.8, seed=1)
    assert digest(sampling=one) != digest(sampling=SamplingParams(max_tokens=32, temperature=0.8, seed=2))
    assert digest(sampling=one) != digest(sampling=SamplingParams(max_tokens=32, temperature=0.8, seed=1, top_p=0.9))


def test_only_deterministic_requests_are_cacheable_by_default() -> None:
    assert is_deterministic(SamplingParams(max_tokens=8, temperature=0.0))
    assert is_deterministic(SamplingParams(max_tokens=8, temperature=1.0, seed=3))
    assert not is_deterministic(SamplingParams(max_tokens=8, temperature=1.0))


def test_scope_is_per_key_unless_marked_public() -> None:
    policy = ScopePolicy.from_lists("aaaa", "free")
    assert policy.scope_for("bbbb", Tier.PAID) == tenant_scope("bbbb")
    assert policy.scope_for("aaaa", Tier.PAID) == PUBLIC_SCOPE
    assert policy.scope_for("cccc", Tier.FREE) == PUBLIC_SCOPE
    assert ScopePolicy().scope_for("aaaa", Tier.FREE) == tenant_scope("aaaa")


def test_scopes_never_share_redis_names() -> None:
    a, b = tenant_scope("aaaa"), tenant_scope("bbbb")
    assert scope_prefix(a) != scope_prefix(b)
    # Even with the same digest (which cannot happen: the scope is hashed into it), names differ by scope.
    assert RedisKeys.for_digest(a, "d").entry != RedisKeys.for_digest(b, "d").entry
    with pytest.raises(ValueError):
        tenant_scope("a*b")  # no glob characters can reach a flush pattern


def test_semantic_layer_takes_single_turn_requests_only() -> None:
    q = semantic_query(SCOPE, "small", USER, GREEDY)
    assert q is not None and q.text == USER[0].content
    with_system = semantic_query(SCOPE, "small", (ChatMessage("system", "Be brief."), *USER), GREEDY)
    assert with_system is not None and with_system.bucket != q.bucket
    multi = (*USER, ChatMessage("assistant", "Paris."), ChatMessage("user", "And Spain?"))
    assert semantic_query(SCOPE, "small", multi, GREEDY) is None
    # Buckets separate what must match exactly: variant, scope, sampling.
    assert semantic_query(SCOPE, "large", USER, GREEDY).bucket != q.bucket  # type: ignore[union-attr]
    assert semantic_query(PUBLIC_SCOPE, "small", USER, GREEDY).bucket != q.bucket  # type: ignore[union-attr]
    other = SamplingParams(max_tokens=64, temperature=0.0)
    assert semantic_query(SCOPE, "small", USER, other).bucket != q.bucket  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("a", "b", "compatible"),
    [
        ("How do I reverse a list in Python?", "What's the way to reverse a Python list?", True),
        ("What is 15% of 200?", "What is 15% of 300?", False),  # numbers differ
        ("What does HTTP 503 mean?", "What is an HTTP 503 error?", True),
        ("Convert 10 miles to kilometers.", "Convert 10 kilometers to miles.", False),  # same words, reordered
        ("How long to boil an egg for a soft yolk?", "How long to boil an egg for a hard yolk?", False),  # one swap
        ("How do I exit Vim?", "How do I quit Vim?", False),  # one swap, even a synonym: refused on purpose
        ("What is the capital of France?", "What is the capital of France?", True),
    ],
)
def test_semantic_lexical_guard(a: str, b: str, compatible: bool) -> None:
    assert lexically_compatible(a, b) is compatible


def test_every_field_that_changes_the_output_changes_the_key() -> None:
    from dataclasses import replace

    from llmesh.types import OutputSpec, ResponseFormat, ToolCall, ToolChoice, ToolSpec

    base = digest()
    sampled = [
        replace(GREEDY, presence_penalty=0.5),
        replace(GREEDY, frequency_penalty=0.5),
        replace(GREEDY, repetition_penalty=1.2),
        replace(GREEDY, logit_bias=((42, -100.0),)),
        replace(GREEDY, logit_bias=((42, 5.0),)),
        replace(GREEDY, stop_token_ids=(7,)),
        replace(GREEDY, logprobs=True),
        replace(GREEDY, logprobs=True, top_logprobs=3),
        replace(GREEDY, n=2),
    ]
    tool = ToolSpec("get_weather", "Weather of a city", '{"type":"object"}')
    outputs = [
        OutputSpec(response_format=ResponseFormat.JSON_OBJECT),
        OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema='{"type":"object"}'),
        OutputSpec(response_format=ResponseFormat.JSON_SCHEMA, json_schema='{"type":"array"}'),
        OutputSpec(tools=(tool,)),
        OutputSpec(tools=(tool,), tool_choice=ToolChoice.REQUIRED),
    ]
    turns = [
        (*USER, ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city":"Paris"}'),))),
        (*USER, ChatMessage("tool", "18 C", tool_call_id="call_1")),
    ]
    keys = [
        *(digest(sampling=s) for s in sampled),
        *(exact_digest(SCOPE, "small", USER, GREEDY, output) for output in outputs),
        *(digest(messages=m) for m in turns),
        exact_digest(SCOPE, "small", (), GREEDY, prompt="The capital of France is"),
    ]
    assert len({base, *keys}) == len(keys) + 1
    # The plain output spec is the old key's shape: tool-free, format-free requests keep sharing entries.
    assert exact_digest(SCOPE, "small", USER, GREEDY, OutputSpec()) == base


def test_only_plain_single_turn_chat_is_semantic() -> None:
    from llmesh.types import OutputSpec, ResponseFormat

    assert semantic_query(SCOPE, "small", USER, GREEDY) is not None
    json_mode = OutputSpec(response_format=ResponseFormat.JSON_OBJECT)
    assert semantic_query(SCOPE, "small", USER, GREEDY, json_mode) is None
    assert semantic_query(SCOPE, "small", USER, GREEDY, prompt="Once upon") is None
