"""`Idempotency-Key` on submit: a retried POST returns the original prediction instead of a second one.

The key is reserved in Redis (SET NX) with a fingerprint of the request and the id the prediction will get,
before anything is stored; the same key with another body is a 422. While its request is being accepted the
reservation is a lease (`idempotency_lease_s`, renewed by its holder): an API process that dies between reserving
and storing the prediction does not hold the key for long, and a retry then creates the prediction. Once the
prediction is stored the key answers retries for `idempotency_ttl_s` (24 h).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
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


# Only the holder's own value is renewed, kept or released: a lapsed lease may have passed to a retry.
_IF_OURS = "if redis.call('GET', KEYS[1]) == ARGV[1] then return {} end return 0"
_EXPIRE_IF_OURS = _IF_OURS.format("redis.call('PEXPIRE', KEYS[1], ARGV[2])")
_DELETE_IF_OURS = _IF_OURS.format("redis.call('DEL', KEYS[1])")


@dataclass
class Reservation:
    """The key, held by this request while it is being accepted."""

    ctx: AppContext
    key: str
    value: str

    async def _expire_if_ours(self, seconds: float) -> None:
        await self.ctx.redis.eval(_EXPIRE_IF_OURS, 1, self.key, self.value, int(seconds * 1000))

    @contextlib.asynccontextmanager
    async def leased(self) -> AsyncIterator[None]:
        """Renew the lease while the body runs (the request is being accepted)."""
        lease_s = self.ctx.settings.idempotency_lease_s

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease_s / 3)
                with contextlib.suppress(RedisError):  # a missed renewal leaves two more before the lease lapses
                    await self._expire_if_ours(lease_s)

        renewing = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewing.cancel()

    async def keep(self) -> None:
        """The prediction is stored: the key answers retries with it for `idempotency_ttl_s`."""
        with contextlib.suppress(RedisError):  # else the lease lapses and a retry finds the stored row by id
            await self._expire_if_ours(self.ctx.settings.idempotency_ttl_s)

    async def release(self) -> None:
        """The request was not accepted: a retry may go through."""
        with contextlib.suppress(RedisError):  # the lease lapses on its own
            await self.ctx.redis.eval(_DELETE_IF_OURS, 1, self.key, self.value)


async def reserve(
    ctx: AppContext, principal: Principal, idempotency_key: str, request_fingerprint: str, prediction_id: str
) -> Reservation | str:
    """The reservation if this request is the first with the key; else the id of the prediction the first one
    creates (or created)."""
    if not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
        raise Invalid(f"Idempotency-Key must be 1–{MAX_KEY_LENGTH} characters")
    key = _redis_key(ctx, principal, idempotency_key)
    value = f"{request_fingerprint}:{prediction_id}"
    lease_ms = int(ctx.settings.idempotency_lease_s * 1000)
    try:
        for _ in range(3):  # the holder may expire between our SET and GET
            if await ctx.redis.set(key, value, nx=True, px=lease_ms):
                return Reservation(ctx, key, value)
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


async def names(ctx: AppContext, principal: Principal, idempotency_key: str, prediction_id: str) -> bool:
    """Whether the key still names `prediction_id` (false once its holder's lease lapsed without storing it)."""
    try:
        existing = cast(bytes | None, await ctx.redis.get(_redis_key(ctx, principal, idempotency_key)))
    except RedisError as exc:
        raise Unavailable("idempotency store unavailable, try again shortly", retry_after=1) from exc
    return existing is not None and existing.decode().partition(":")[2] == prediction_id
