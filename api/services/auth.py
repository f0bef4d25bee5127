"""API-key authentication and the per-key rate limit: `apikey`, `API-KEY`, `Authorization: Bearer`, (fal's)
`Authorization: Key` or (BFL's) `x-key`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import bindparam, func, or_, select, update

from api.context import AppContext, context
from api.errors import RateLimited, Unauthenticated
from api.infra.pg import Statement
from api.services.principals import Principal
from api.services.rate_limit import Slot
from core import logs
from core.ids import hash_api_key
from core.quota import RateDecision
from core.tables import api_keys, tenants

log = logging.getLogger(__name__)
MISSING = "missing API key: send it in the `apikey` header or as `Authorization: Bearer <key>`"
# One message for unknown, malformed, revoked and expired keys, from one query: nothing tells them apart.
INVALID = "invalid, revoked or expired API key"
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and process


def presented_key(request: Request) -> str | None:
    key = request.headers.get("apikey") or request.headers.get("api-key") or request.headers.get("x-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "key") and credentials.strip():
        return credentials.strip()
    return None


async def authenticate(request: Request) -> Principal:
    """The dependency behind `Authenticated`. It takes the request alone: every sub-dependency would cost
    each authenticated request another round of FastAPI's dependency solving."""
    ctx, principal = await _identify(request)
    _admit(request, await ctx.limiter.hit(principal))
    return principal


async def authenticate_submit(request: Request) -> tuple[Principal, Slot]:
    """`authenticate`, and an in-flight slot for the prediction in the same round trip to Redis (a submit's
    first). The caller gives the slot back on every way out but a stored prediction (Slot)."""
    ctx, principal = await _identify(request)
    decision, slot = await ctx.limiter.hit_and_take_slot(principal)
    _admit(request, decision)
    return principal, slot


async def _identify(request: Request) -> tuple[AppContext, Principal]:
    ctx = context(request)
    key = presented_key(request)
    if not key:
        raise Unauthenticated(MISSING)
    key_hash = hash_api_key(key)
    principal = ctx.keys.get(key_hash) or await _lookup(ctx, key_hash)
    if principal is None:
        raise Unauthenticated(INVALID)
    _touch_later(ctx, principal.api_key_id)
    logs.bind(tenant_id=principal.tenant_id)
    return ctx, principal


def _admit(request: Request, decision: RateDecision) -> None:
    request.state.rate_limit = decision
    if not decision.allowed:
        whose = (
            f"{decision.limit} requests per minute for this API key"
            if decision.refused_by == "key"
            else f"{decision.tenant_limit} requests per minute for this tenant's keys together"
        )
        raise RateLimited(f"rate limit exceeded: {whose}", retry_after=decision.retry_after_s)


_LOOKUP = Statement(
    select(
        api_keys.c.id,
        api_keys.c.tenant_id,
        api_keys.c.expires_at,
        func.coalesce(tenants.c.rate_limit_per_minute, bindparam("default_rate")).label("rate"),
        func.coalesce(
            tenants.c.tenant_rate_limit_per_minute, tenants.c.rate_limit_per_minute, bindparam("default_rate")
        ).label("tenant_rate"),
        func.coalesce(tenants.c.max_in_flight, bindparam("default_in_flight")).label("in_flight"),
        func.coalesce(tenants.c.retention_s, bindparam("default_retention")).label("retention"),
        tenants.c.suspended_at.is_not(None).label("suspended"),
        tenants.c.safety_policy,
        tenants.c.allow_disable_safety_checker,
        tenants.c.blocked_terms,
    )
    .join(tenants, tenants.c.id == api_keys.c.tenant_id)
    .where(
        api_keys.c.key_hash == bindparam("key_hash"),
        api_keys.c.revoked_at.is_(None),
        or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > func.now()),
    )
)


async def _lookup(ctx: AppContext, key_hash: str) -> Principal | None:
    row = await _LOOKUP.one(
        ctx.pg,
        key_hash=key_hash,
        default_rate=ctx.settings.default_rate_limit_per_minute,
        default_in_flight=ctx.settings.default_max_in_flight,
        default_retention=ctx.settings.default_retention_s,
    )
    if row is None:
        return None
    principal = Principal(
        row["tenant_id"],
        row["id"],
        row["rate"],
        row["tenant_rate"],
        row["in_flight"],
        row["expires_at"],
        row["retention"],
        row["suspended"],
        row["safety_policy"],
        bool(row["allow_disable_safety_checker"]),
        tuple(row["blocked_terms"] or ()),
    )
    ctx.keys.put(key_hash, principal)
    return principal


async def keys_changed(ctx: AppContext) -> None:
    """After a revocation, a limits change or a suspension: drop cached principals here at once, and on every
    replica (each clears its cache when the message arrives; KLEIN_KEY_CACHE_TTL_S bounds it should one be lost)."""
    ctx.keys.clear()
    await ctx.redis.publish(ctx.settings.keys_channel, "changed")


_last_touch: dict[str, float] = {}
_touches: set[asyncio.Task[None]] = set()


def _touch_later(ctx: AppContext, api_key_id: str) -> None:
    """Record last use off the request path, at most once a minute per key and process."""
    now = time.monotonic()
    if now - _last_touch.get(api_key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
        return
    _last_touch[api_key_id] = now

    async def touch() -> None:
        try:
            async with ctx.engine.begin() as conn:
                statement = update(api_keys).where(api_keys.c.id == api_key_id).values(last_used_at=func.now())
                await conn.execute(statement)
        except Exception:  # bookkeeping only: never fails a request
            log.warning("could not record last use of key %s", api_key_id, exc_info=True)

    task = asyncio.create_task(touch())
    _touches.add(task)
    task.add_done_callback(_touches.discard)


Authenticated = Annotated[Principal, Depends(authenticate)]
