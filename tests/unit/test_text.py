from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from router.text import IncrementalDetokenizer, StopMatcher

# A toy byte-level vocabulary: token i decodes to BYTES[i]; one character is split over two tokens.
BYTES = [b"Hel", b"lo", b" w", b"orld", "é".encode()[:1], "é".encode()[1:], b"!"]


def decode(ids: Sequence[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def test_detokenizer_emits_deltas_and_holds_partial_utf8() -> None:
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.add([i]) for i in range(len(BYTES))]
    assert deltas == ["Hel", "lo", " w", "orld", "", "é", "!"]
    assert detok.flush() == ""


def test_detokenizer_flush_returns_truncated_tail() -> None:
    detok = IncrementalDetokenizer(decode)
    assert detok.add([0, 4]) == ""  # held: the chunk ends inside a UTF-8 character
    assert detok.flush() == "Hel\ufffd"


def test_stop_string_across_chunks() -> None:
    stops = StopMatcher(["END"])
    out = [stops.feed(t) for t in ["abc E", "N", "D tail"]]
    assert "".join(out) == "abc "
    assert stops.stopped
    assert stops.feed("more") == ""


def test_partial_stop_prefix_released_when_not_a_stop() -> None:
    stops = StopMatcher(["END"])
    assert stops.feed("xE") == "x"
    assert stops.feed("Nx") == "ENx"
    assert not stops.stopped
    assert stops.feed("E") == ""
    assert stops.flush() == "E"


def test_earliest_stop_wins() -> None:
    stops = StopMatcher(["world", "lo"])
    assert stops.feed("hello world") == "hel"


def test_no_stops_passthrough() -> None:
    stops = StopMatcher([])
    assert stops.feed("abc") == "abc"


class ReferenceStopMatcher:
    """The former implementation (find + suffix-by-suffix comparison): same answers, quadratic in a stop string's
    length. The KMP matcher must agree with it on every input."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:length]):
                    best = length
                    break
        cut = len(self._pending) - best
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), max_size=4),
    chunks=st.lists(st.text(alphabet="abc", max_size=6), max_size=12),
)
def test_stop_matcher_agrees_with_reference(stops: list[str], chunks: list[str]) -> None:
    fast, slow = StopMatcher(stops), ReferenceStopMatcher(stops)
    for chunk in chunks:
        assert fast.feed(chunk) == slow.feed(chunk)
        assert fast.stopped == slow.stopped
    assert fast.flush() == slow.flush()


class CountingStr(str):
    """A stop string that counts how often a character of it is read: the matcher's work."""

    reads = 0

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        CountingStr.reads += 1
        return str.__getitem__(self, key)


def test_stop_matching_work_is_linear_in_the_text() -> None:
    # A stop string that the text almost matches everywhere: the worst case of suffix-by-suffix comparison.
    stop = CountingStr("a" * 255 + "b")
    matcher = StopMatcher([stop])
    text_chars, emitted = 0, []
    for _ in range(5000):
        emitted.append(matcher.feed("aaaa"))
        text_chars += 4
    assert not matcher.stopped
    # KMP, amortised: per character fed one read to advance plus at most one per fallback (fallbacks never outnumber
    # advances); the failure table likewise costs a constant per stop character. Suffix-by-suffix comparison would
    # be ~len(stop)**2 / 2 per chunk here, 160 million reads in all.
    assert CountingStr.reads <= 3 * text_chars + 6 * len(stop)
    emitted.append(matcher.feed("b"))
    assert "".join(emitted) == "a" * (text_chars - 255) and matcher.stopped
