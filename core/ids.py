"""Random identifiers and API keys."""

from __future__ import annotations

import base64
import hashlib
import random
import secrets

KEY_PREFIX = "kl_"


def new_id() -> str:
    """26 lowercase base32 characters (130 random bits): unguessable, URL-safe."""
    return base64.b32encode(secrets.token_bytes(17)).decode().lower().rstrip("=")[:26]


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: nothing to brute-force, and the
    # lookup by hash through a unique index keeps the comparison off the request's timing.
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:10]


def random_seed() -> int:
    # A seed is no secret (responses show it): no system call for it, unlike the ids and keys above.
    return random.getrandbits(32)
