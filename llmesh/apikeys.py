"""API key format and hashing, shared by every part that names a key (gateway, limiter, operator tools).

Keys are shown once at creation and stored only as SHA-256 hashes; a key's id is a short prefix of its hash.
"""

from __future__ import annotations

import hashlib

from llmesh.errors import Unauthenticated

KEY_PREFIX = "lm-"
REDIS_KEY = "llmesh:apikey:{digest}"


def hash_key(api_key: str) -> str:
    # Keys are 256-bit random, so a fast unsalted hash is enough: there is nothing to brute-force.
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_for(digest: str) -> str:
    """A short, stable, loggable id of a key (a prefix of its hash)."""
    return digest[:16]


def parse_bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send the header 'authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: expected 'Bearer <key>'")
    return token.strip()
