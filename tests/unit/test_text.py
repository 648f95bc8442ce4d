from collections.abc import Sequence

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
