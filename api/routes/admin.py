"""The operators' HTTP API under /admin/v1, behind `KLEIN_ADMIN_API_KEY` (header `X-Admin-Key` or Bearer)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import RowMapping, select, text
from sqlalchemy.exc import IntegrityError

from api.context import AppContext, get_ctx
from api.errors import Conflict, NotFound, RateLimited, Unauthenticated
from api.routes.account import End, KeyRequest, Start, issue_key, key_view, list_keys, revoke_key, usage_report
from api.routes.openapi_errors import errors
from api.services import fleet, operations
from api.services.auth import keys_changed, presented_key
from core import tenants
from core.lifecycle import Status
from core.tables import FLAGGED, predictions
from models.registry import MODELS

ADMIN_FAILURE_WINDOW_MS = 60_000
MAX_TERMS, MAX_TERM_CHARS = 1000, 200  # a tenant's blocked terms


async def require_admin(request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]) -> None:
    """The admin key, compared in constant time first: the right key is always let in. Wrong keys are counted
    per client address (the peer, or the address a trusted proxy forwarded: uvicorn's FORWARDED_ALLOW_IPS);
    an address that sent too many in a minute gets 429 for its wrong keys until the minute since its first
    failure is over."""
    configured = ctx.settings.admin_api_key
    if configured is None:
        raise NotFound("the admin API is disabled: set KLEIN_ADMIN_API_KEY to enable it")
    given = request.headers.get("x-admin-key") or presented_key(request) or ""
    # Compare digests so the comparison's time depends on neither key's length nor content.
    expected = hashlib.sha256(configured.get_secret_value().encode()).digest()
    if hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected):
        return
    address = request.client.host if request.client else "unknown"
    failures = f"{ctx.settings.queue_name}:admin-failures:{address}"
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.get(failures)
        pipe.pttl(failures)
        count, wait_ms = await pipe.execute()
    if int(count or 0) >= ctx.settings.admin_failures_per_minute:
        retry_after = max(1, -(-int(wait_ms) // 1000))
        raise RateLimited("too many wrong admin keys from this address; try again later", retry_after=retry_after)
    if given:  # a guess: counted (a request without any key guesses nothing)
        async with ctx.redis.pipeline(transaction=False) as pipe:
            pipe.set(failures, 0, nx=True, px=ADMIN_FAILURE_WINDOW_MS)
            pipe.incr(failures)
            await pipe.execute()
    raise Unauthenticated("invalid admin key")


# 404 also when the admin API is disabled (KLEIN_ADMIN_API_KEY unset).
router = APIRouter(
    prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=errors(401, 404, 429, 503)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000, description="per key; null: default")
    tenant_rate_limit_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="all the tenant's keys together; null: the per-key limit"
    )
    max_in_flight: int | None = Field(None, ge=1, le=1_000_000, description="queued + processing; null: default")
    price_per_image: float | None = Field(None, ge=0, le=1000, description="USD; null: platform default")
    price_per_enhancement: float | None = Field(
        None, ge=0, le=1000, description="USD per prompt enhancement (docs/enhancer.md); null: platform default"
    )
    batch_price_per_image: float | None = Field(
        None, ge=0, le=1000, description="USD per image of batch work (docs/batch.md); null: platform default"
    )
    retention_s: int | None = Field(
        None,
        ge=0,
        le=tenants.MAX_RETENTION_S,
        description="seconds outputs and references are kept after a prediction finishes; 0: none after a "
        "synchronous answer delivered them; null: platform default (docs/retention.md)",
    )
    # Safety (docs/safety.md)
    safety_policy: Literal["block", "blur", "flag"] | None = Field(
        None, description="what a flagged output does: block (default), blur or flag; null: block"
    )
    allow_disable_safety_checker: bool | None = Field(
        None, description="may requests turn the image checker off (disable_safety_checker …); null: false"
    )
    blocked_terms: list[Annotated[str, Field(min_length=1, max_length=MAX_TERM_CHARS)]] | None = Field(
        None, max_length=MAX_TERMS, description="the tenant's additions to the operator's prompt blocklist"
    )
    # The result cache (docs/cache.md)
    result_cache: bool | None = Field(
        None,
        description="false: identical requests are always generated again, never answered from the cache; null: on",
    )
    cache_price_per_image: float | None = Field(
        None, ge=0, le=1000, description="USD per image answered from the result cache; null: platform default (0)"
    )


class TenantRequest(Limits):
    name: str = Field(min_length=1, max_length=100)


def tenant_view(row: RowMapping) -> dict[str, Any]:
    view = key_view(row)
    for price in ("price_per_image", "cache_price_per_image", "price_per_enhancement", "batch_price_per_image"):
        if view.get(price) is not None:
            view[price] = float(view[price])
    return view


async def _tenant(ctx: AppContext, tenant_id: str) -> RowMapping:
    return await operations.find_tenant(ctx, tenant_id)


@router.post("/tenants", status_code=201, responses=errors(400, 409, 413, 422))
async def create_tenant(request: TenantRequest, ctx: Ctx) -> JSONResponse:
    tenant_id, create = tenants.create_tenant(request.name, **request.model_dump(exclude={"name"}))
    issued, issue = tenants.issue_key(tenant_id, "default")
    try:
        async with ctx.engine.begin() as conn:
            await conn.execute(create)
            await conn.execute(issue)
    except IntegrityError:
        raise Conflict(f"a tenant named {request.name!r} exists already") from None
    tenant = tenant_view(await _tenant(ctx, tenant_id))
    return JSONResponse({"tenant": tenant, "key": issued.public()}, status_code=201)


@router.get("/tenants")
async def all_tenants(ctx: Ctx) -> dict[str, Any]:
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(tenants.list_tenants())).mappings().all()
    return {"data": [tenant_view(row) for row in rows]}


@router.get("/tenants/{tenant_id}", responses=errors(422))
async def one_tenant(tenant_id: str, ctx: Ctx) -> dict[str, Any]:
    return tenant_view(await _tenant(ctx, tenant_id))


@router.patch("/tenants/{tenant_id}", responses=errors(400, 413, 422))
async def update_limits(tenant_id: str, limits: Limits, ctx: Ctx) -> dict[str, Any]:
    """Set limits and price; only the fields sent change (null resets one to the platform default)."""
    tenant = await _tenant(ctx, tenant_id)  # by id or name, as every admin route takes it
    changes = limits.model_dump(exclude_unset=True)
    if changes:  # an UPDATE without a SET list is invalid SQL
        async with ctx.engine.begin() as conn:
            row = (await conn.execute(tenants.set_limits(tenant["id"], **changes))).first()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        await keys_changed(ctx)  # cached principals carry the old limits
    return tenant_view(await _tenant(ctx, tenant["id"]))


@router.post("/tenants/{tenant_id}/keys", status_code=201, responses=errors(400, 413, 422))
async def create_key(tenant_id: str, request: KeyRequest, ctx: Ctx) -> JSONResponse:
    tenant = await _tenant(ctx, tenant_id)  # by id or name: the key belongs to the tenant found
    return await issue_key(ctx, tenant["id"], request)


@router.get("/tenants/{tenant_id}/keys", responses=errors(422))
async def tenant_keys(tenant_id: str, ctx: Ctx) -> dict[str, Any]:
    tenant = await _tenant(ctx, tenant_id)
    return await list_keys(ctx, tenant["id"])


@router.delete("/keys/{key_id}", responses=errors(422))
async def revoke(key_id: str, ctx: Ctx) -> dict[str, Any]:
    return await revoke_key(ctx, key_id, None)


@router.get("/models")
async def served_models(ctx: Ctx) -> dict[str, Any]:
    """Which weights the workers are configured to load, for operators only."""
    return {"data": [{"id": spec.id, "model_path": ctx.settings.model_path} for spec in MODELS]}


@router.get("/usage", responses=errors(422))
async def all_usage(ctx: Ctx, tenant_id: str | None = None, start: Start = None, end: End = None) -> dict[str, Any]:
    report = await usage_report(ctx, tenant_id, start, end)
    return report if tenant_id is None else report | {"tenant_id": tenant_id}


@router.get("/queue")
async def queue_state(ctx: Ctx) -> dict[str, Any]:
    """Depth and oldest wait per priority, live GPU workers, the webhook backlog (as /metrics reads them)."""
    return (await fleet.read(ctx)).view()


@router.get("/failures", responses=errors(422))
async def recent_failures(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    """The latest failed predictions across tenants, with the reason each client was given."""
    p = predictions
    query = (
        select(p.c.id, p.c.tenant_id, p.c.model, p.c.error, p.c.created_at, p.c.completed_at)
        .where(p.c.status == Status.FAILED)
        .order_by(p.c.completed_at.desc().nulls_last())
        .limit(limit)
    )
    async with ctx.engine.connect() as conn:
        return {"data": [dict(row) for row in (await conn.execute(query)).mappings()]}


@router.get("/flagged", responses=errors(422))
async def flagged_predictions(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    """The latest predictions the image checker flagged across tenants (docs/safety.md): what the check found and
    the policy applied; never the images (their delivery URLs need the tenant's key)."""
    p = predictions
    query = (
        select(p.c.id, p.c.tenant_id, p.c.model, p.c.status, p.c.safety, p.c.error, p.c.completed_at)
        .where(text(FLAGGED))  # the partial index's own predicate, as a literal: the planner then uses it
        .order_by(p.c.completed_at.desc().nulls_last())
        .limit(limit)
    )
    async with ctx.engine.connect() as conn:
        return {"data": [dict(row) for row in (await conn.execute(query)).mappings()]}
