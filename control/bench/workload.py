"""What a benchmark sends: a workload spec (TOML/JSON file or defaults) and the request sequence it expands to.

The sequence is a pure function of the spec and the tier names: the same seed gives the same requests in the same
order on every target, so two targets can be compared request for request. Request kinds:

- `short`: a one-line question, unique per request (a response cache can never answer it).
- `long`: a long document (`long_words` words) and a request to summarize it (prompt processing heavy).
- `shared_prefix`: one long system prompt shared by every such request, then a unique question (prefix caching).
- `repeat`: one of `repeat_pool` fixed prompts, byte-identical each time, so a response cache answers all but the
  first (deterministic: temperature 0 by default, and the same `seed` field in every request).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

KINDS = ("short", "long", "shared_prefix", "repeat")
DEFAULT_TIER = "default"

_TOPICS = (
    "the water cycle", "volcanoes", "honey bees", "the printing press", "lighthouses", "glaciers", "coral reefs",
    "the Roman aqueducts", "tea", "bicycles", "the moon", "owls", "bread baking", "railways", "paper making",
    "tides", "chess", "maple syrup", "windmills", "the violin", "penguins", "salt", "clocks", "deserts",
)  # fmt: skip
_QUESTIONS = (
    "In one sentence, what is special about {topic}?",
    "Give one surprising fact about {topic}.",
    "Explain {topic} to a child in one sentence.",
    "Why do people find {topic} interesting?",
    "Name two things related to {topic}.",
)
_SUBJECTS = (
    "The old harbour", "A careful engineer", "The village council", "Every spring the river", "The museum guide",
    "A small team of volunteers", "The morning train", "The library on the hill", "A travelling musician",
)  # fmt: skip
_VERBS = (
    "described", "repaired", "measured", "painted", "counted", "carried", "studied", "welcomed", "recorded",
)  # fmt: skip
_OBJECTS = (
    "the stone bridge near the market", "a collection of maps", "the lanterns along the pier",
    "the seasons of the valley", "an orchard of apple trees", "the letters of a sailor", "the bells of the tower",
    "a map of the northern coast", "the gardens behind the school",
)  # fmt: skip
_TAILS = ("before the storm.", "with great patience.", "for the visitors.", "at dawn.", "in the autumn.", "again.")

_SHARED_PREFIX_INTRO = (
    "You are a concise assistant for a travel company. Answer in at most two sentences. "
    "Company background for reference:"
)


@dataclass(frozen=True)
class Price:
    """USD per 1000 tokens."""

    prompt_per_1k: float
    completion_per_1k: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k) / 1000.0


@dataclass(frozen=True)
class WorkloadSpec:
    seed: int = 1234
    model: str = "auto"
    max_tokens: int = 32
    # 0 = greedy, so `repeat` prompts are deterministic and cacheable.
    temperature: float = 0.0
    mix: Mapping[str, float] = field(
        default_factory=lambda: {"short": 4.0, "long": 1.0, "shared_prefix": 2.0, "repeat": 3.0}
    )
    long_words: int = 300
    shared_prefix_words: int = 200
    repeat_pool: int = 4
    # Relative weights of tiers; a tier with no weight here gets 1.
    tier_weights: Mapping[str, float] = field(default_factory=dict)
    prices: Mapping[str, Price] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown request kind(s) in mix: {sorted(unknown)}; known: {list(KINDS)}")
        if any(w < 0 for w in self.mix.values()) or not any(w > 0 for w in self.mix.values()):
            raise ValueError("mix weights must be >= 0 and at least one > 0")
        if any(w < 0 for w in self.tier_weights.values()):
            raise ValueError("tier weights must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        for name in ("long_words", "shared_prefix_words", "repeat_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    kind: str
    tier: str
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    temperature: float
    seed: int
    model: str

    def payload(self, stream: bool) -> dict[str, Any]:
        """The OpenAI chat-completions body."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": role, "content": content} for role, content in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"[{name}] must be a table")
    return value


def parse_price(value: Any, name: str) -> Price:
    """A number (same price for prompt and completion tokens) or a pair [prompt, completion]."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or [prompt, completion], got {value!r}")
        return Price(_number(value[0], name), _number(value[1], name))
    price = _number(value, name)
    return Price(price, price)


def spec_from_mapping(data: Mapping[str, Any]) -> WorkloadSpec:
    """A spec from a parsed TOML/JSON document (see control/bench/workloads/mixed.toml); missing keys = defaults."""
    known = {"seed", "model", "max_tokens", "temperature", "mix", "kinds", "tiers", "prices"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown workload key(s): {sorted(unknown)}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    if "seed" in data:
        values["seed"] = _integer(data["seed"], "seed")
    if "model" in data:
        if not isinstance(data["model"], str):
            raise ValueError("model must be a string")
        values["model"] = data["model"]
    if "max_tokens" in data:
        values["max_tokens"] = _integer(data["max_tokens"], "max_tokens")
    if "temperature" in data:
        values["temperature"] = _number(data["temperature"], "temperature")
    if "mix" in data:
        values["mix"] = {k: _number(v, f"mix.{k}") for k, v in _table(data, "mix").items()}
    kinds = _table(data, "kinds")
    for name in ("long_words", "shared_prefix_words", "repeat_pool"):
        if name in kinds:
            values[name] = _integer(kinds[name], f"kinds.{name}")
    unknown_kinds = set(kinds) - {"long_words", "shared_prefix_words", "repeat_pool"}
    if unknown_kinds:
        raise ValueError(f"unknown key(s) in [kinds]: {sorted(unknown_kinds)}")
    values["tier_weights"] = {k: _number(v, f"tiers.{k}") for k, v in _table(data, "tiers").items()}
    values["prices"] = {k: parse_price(v, f"prices.{k}") for k, v in _table(data, "prices").items()}
    return WorkloadSpec(**values)


def with_overrides(spec: WorkloadSpec, **overrides: Any) -> WorkloadSpec:
    """The spec with the given fields replaced; None values are ignored (flag not given)."""
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"


def _text(rng: random.Random, words: int) -> str:
    """Plain prose of about `words` words."""
    sentences: list[str] = []
    count = 0
    while count < words:
        sentence = _sentence(rng)
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


class WorkloadGenerator:
    """Expands a spec into an endless, reproducible request sequence. Tiers are drawn by weight from `tiers`."""

    def __init__(self, spec: WorkloadSpec, tiers: Sequence[str] = (DEFAULT_TIER,)) -> None:
        if not tiers:
            raise ValueError("at least one tier is needed")
        self.spec = spec
        self.tiers = tuple(tiers)
        self._tier_weights = [spec.tier_weights.get(t, 1.0) for t in self.tiers]
        if not any(w > 0 for w in self._tier_weights):
            raise ValueError(f"every tier of {list(self.tiers)} has weight 0")
        self._kinds = [k for k in KINDS if spec.mix.get(k, 0.0) > 0]
        self._kind_weights = [spec.mix[k] for k in self._kinds]
        # Fixed texts come from their own generator so they do not depend on the mix or the tiers.
        fixed = random.Random(f"{spec.seed}:fixed")
        self.shared_prefix = f"{_SHARED_PREFIX_INTRO} {_text(fixed, spec.shared_prefix_words)}"
        self.repeat_prompts = tuple(
            _QUESTIONS[i % len(_QUESTIONS)].format(topic=_TOPICS[(i * 7) % len(_TOPICS)])
            for i in range(spec.repeat_pool)
        )

    def _messages(self, kind: str, index: int, rng: random.Random) -> tuple[tuple[str, str], ...]:
        question = rng.choice(_QUESTIONS).format(topic=rng.choice(_TOPICS))
        if kind == "short":
            # The request number makes the prompt unique, so it is never a cache hit.
            return (("user", f"{question} (question {index})"),)
        if kind == "long":
            document = _text(rng, self.spec.long_words)
            return (("user", f"{document}\n\nSummarize the text above in one sentence. (document {index})"),)
        if kind == "shared_prefix":
            return (("system", self.shared_prefix), ("user", f"{question} (question {index})"))
        return (("user", rng.choice(self.repeat_prompts)),)

    def __iter__(self) -> Iterator[BenchRequest]:
        rng = random.Random(f"{self.spec.seed}:requests")
        index = 0
        while True:
            kind = rng.choices(self._kinds, self._kind_weights)[0]
            tier = rng.choices(self.tiers, self._tier_weights)[0]
            yield BenchRequest(
                index=index,
                kind=kind,
                tier=tier,
                messages=self._messages(kind, index, rng),
                max_tokens=self.spec.max_tokens,
                temperature=self.spec.temperature,
                seed=self.spec.seed,
                model=self.spec.model,
            )
            index += 1


def poisson_gaps(rate: float, seed: int) -> Iterator[float]:
    """Seconds between arrivals of a Poisson process with `rate` arrivals per second (exponential gaps)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"{seed}:arrivals")
    while True:
        yield rng.expovariate(rate)
