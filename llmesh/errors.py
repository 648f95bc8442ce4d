"""Domain errors shared by all services. Each maps to exactly one gRPC status (see llmesh.grpc_util).

A message is shown to callers as it is, so it must never hold more than a short, escaped prefix of what a caller
sent (`quote`), an internal address, a Python class name or a stack. `MAX_MESSAGE_CHARS` is the last line of
defence: a longer message is cut, so an error can never outgrow a gRPC status header (Envoy resets a stream whose
grpc-message is too large, which a caller would see as a 502).
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1024
# How much of a caller's own value an error message may repeat.
ECHO_CHARS = 40


def quote(value: object, limit: int = ECHO_CHARS) -> str:
    """A caller's value for an error message: at most `limit` characters of it, escaped (quotes, control
    characters, lone surrogates and other non-printables as \\x.. / \\u.. escapes), with a note of what was cut."""
    text = value if isinstance(value, str) else str(value)
    shown = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    if len(text) > limit:
        shown += f"... ({len(text)} characters)"
    return shown


class MeshError(Exception):
    """Base of errors that are the caller's answer, not a bug. The message is shown to the caller.

    `param` names the request field at fault (OpenAI's error `param`, e.g. "messages[2].content"); `code` is a
    short machine-readable reason (OpenAI's error `code`, e.g. "context_length_exceeded"); `metadata` is more
    trailing metadata for the caller (grpc_util sends it with the status).
    """

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 15] + "... (truncated)"
        super().__init__(message)
        self.param = param
        self.code = code
        self.metadata = metadata


class InvalidRequest(MeshError):
    pass


class NotFound(InvalidRequest):
    """What the caller named does not exist (e.g. a model id): NOT_FOUND, HTTP 404. A kind of invalid request, so
    OpenAI-shaped errors give it OpenAI's type for it, invalid_request_error."""


class Unauthenticated(MeshError):
    pass


class PermissionDenied(MeshError):
    pass


class ResourceExhausted(MeshError):
    def __init__(
        self,
        message: str,
        retry_after_s: int | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        *,
        param: str | None = None,
        code: str | None = None,
        limit: str = "",
    ) -> None:
        # `metadata`: e.g. x-ratelimit-limit / -remaining / -reset.
        super().__init__(message, param=param, code=code, metadata=metadata)
        self.retry_after_s = retry_after_s
        # The quota that refused (the limiter's name: requests_per_hour, tokens_per_hour, ...); "" if not a quota.
        self.limit = limit


class Unavailable(MeshError):
    pass


class DeadlineExceeded(MeshError):
    pass


class Internal(MeshError):
    pass
