"""Domain errors shared by all services. Each maps to exactly one gRPC status (see llmesh.grpc_util)."""

from __future__ import annotations


class MeshError(Exception):
    """Base of errors that are the caller's answer, not a bug. The message is shown to the caller."""


class InvalidRequest(MeshError):
    pass


class Unauthenticated(MeshError):
    pass


class PermissionDenied(MeshError):
    pass


class ResourceExhausted(MeshError):
    def __init__(
        self, message: str, retry_after_s: int | None = None, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # More trailing metadata for the caller, e.g. x-ratelimit-limit / -remaining / -reset.
        self.metadata = metadata


class Unavailable(MeshError):
    pass


class DeadlineExceeded(MeshError):
    pass


class Internal(MeshError):
    pass
