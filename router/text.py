"""Streaming text assembly: token ids -> text deltas, and stop strings that may span token boundaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Decoding a window that starts a few tokens back keeps context-dependent decoders (leading spaces) right;
    a delta ending in U+FFFD is held back because the token ended inside a multi-byte UTF-8 character.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated UTF-8 sequence at the end), as decoded."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def _failure(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt: failure[k] is the length of the longest proper prefix of pattern[: k + 1] that is also
    its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


class StopMatcher:
    """Finds the first stop string in streamed text, holding back only text that could start one.

    Stop strings come from the caller, so the work is linear: per stop string a Knuth-Morris-Pratt state (how much
    of it the text seen so far ends with) advances once per new character, amortised O(1). No rescans of held-back
    text, no suffix-by-suffix comparisons (quadratic in a stop string's length).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._failures = [_failure(s) for s in self._stops]
        # _states[i]: the longest prefix of stop i that the text fed so far ends with (always < its length).
        self._states = [0] * len(self._stops)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit. After a stop string is seen, `stopped` is True."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        start = len(self._pending)
        self._pending += text
        earliest = -1
        for i, stop in enumerate(self._stops):
            state, failure = self._states[i], self._failures[i]
            for at in range(start, len(self._pending)):
                char = self._pending[at]
                while state and stop[state] != char:
                    state = failure[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    # This stop's first occurrence (the first to end is the first to start, for one string).
                    begin = at + 1 - len(stop)
                    earliest = begin if earliest < 0 else min(earliest, begin)
                    break
            self._states[i] = state
        if earliest >= 0:
            self.stopped = True
            out, self._pending = self._pending[:earliest], ""
            return out
        # Held back: the longest tail that is the start of some stop string.
        cut = len(self._pending) - max(self._states)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
