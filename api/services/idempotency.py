"""`Idempotency-Key` on submit: a retried POST returns the original prediction instead of a second one.

The key is reserved in Redis (SET NX, 24 h) with a fingerprint of the request and the id the
prediction will get, before anything is stored; the same key with another body is a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, cast

import orjson
from redis.exceptions import RedisError

from api.context import AppContext
from api.errors import Conflict, Invalid, Unavailable
from api.services.auth import Principal

MAX_KEY_LENGTH = 255


def fingerprint(model: str, request_input: dict[str, Any]) -> str:
    return hashlib.sha256(
        orjson.dumps({"model": model, "input": request_input}, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def _redis_key(ctx: AppContext, principal: Principal, idempotency_key: str) -> str:
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"{ctx.settings.queue_name}:{{{principal.tenant_id}}}:idempotency:{digest}"


async def reserve(
    ctx: AppContext, principal: Principal, idempotency_key: str, request_fingerprint: str, prediction_id: str
) -> str | None:
    """None if this request is the first with the key; else the id of the prediction it created."""
    if not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
        raise Invalid(f"Idempotency-Key must be 1–{MAX_KEY_LENGTH} characters")
    key = _redis_key(ctx, principal, idempotency_key)
    value = f"{request_fingerprint}:{prediction_id}"
    try:
        for _ in range(3):  # the holder may expire between our SET and GET
            if await ctx.redis.set(key, value, nx=True, ex=ctx.settings.idempotency_ttl_s):
                return None
            existing = cast(bytes | None, await ctx.redis.get(key))  # bytes: the client does not decode
            if existing is not None:
                break
        else:
            raise Conflict("Idempotency-Key is contended; retry the request")
    except RedisError as exc:
        raise Unavailable("idempotency store unavailable, try again shortly", retry_after=1) from exc
    stored_fingerprint, _, stored_id = existing.decode().partition(":")
    if stored_fingerprint != request_fingerprint:
        raise Invalid("Idempotency-Key was already used with a different request body")
    return stored_id


async def replays(ctx: AppContext, principal: Principal, idempotency_key: str, request_fingerprint: str) -> bool:
    """Whether the key already holds this very request (a retry, answered with the original); reserves nothing."""
    try:
        existing = cast(bytes | None, await ctx.redis.get(_redis_key(ctx, principal, idempotency_key)))
    except RedisError as exc:
        raise Unavailable("idempotency store unavailable, try again shortly", retry_after=1) from exc
    return existing is not None and existing.decode().partition(":")[0] == request_fingerprint


async def forget(ctx: AppContext, principal: Principal, idempotency_key: str) -> None:
    """Release a reservation whose request was not accepted, so that a retry can go through."""
    try:
        await ctx.redis.delete(_redis_key(ctx, principal, idempotency_key))
    except RedisError:
        await asyncio.sleep(0)  # the reservation expires on its own
