"""Signed, expiring delivery URLs that open without an API key (for `<img src>` and clients that send none)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from functools import lru_cache

from core.settings import Settings


@lru_cache(maxsize=4)
def _process_key(_: int) -> bytes:
    return secrets.token_bytes(32)


def _key(settings: Settings) -> bytes:
    configured = settings.url_signing_key
    return configured.get_secret_value().encode() if configured else _process_key(id(settings))


def _signature(settings: Settings, prediction_id: str, filename: str, expires: int) -> str:
    message = f"{prediction_id}/{filename}/{expires}".encode()
    return hmac.new(_key(settings), message, hashlib.sha256).hexdigest()


def sign(settings: Settings, url: str, prediction_id: str, filename: str) -> str:
    expires = int(time.time()) + settings.signed_url_ttl_s
    return f"{url}?expires={expires}&signature={_signature(settings, prediction_id, filename, expires)}"


def verify(settings: Settings, prediction_id: str, filename: str, expires: int, signature: str) -> bool:
    if expires < time.time():
        return False
    # Bytes: compare_digest refuses str with non-ASCII characters (TypeError), and a signature is client input.
    return hmac.compare_digest(_signature(settings, prediction_id, filename, expires).encode(), signature.encode())
