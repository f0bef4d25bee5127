"""What a tenant manages with its own key: its account (name, price per image), its API keys and its usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import RowMapping, select

from api.context import AppContext, get_ctx
from api.errors import Conflict, Invalid, NotFound
from api.routes.openapi_errors import errors
from api.services.auth import Authenticated, keys_changed
from core import enhance_jobs, tenants, usage
from core.tables import tenants as tenant_table

router = APIRouter(tags=["account"], responses=errors(401, 429, 503))


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=100)
    expires_at: datetime | None = Field(None, description="ISO 8601 with a time zone; none: never expires")

    def checked_expiry(self) -> datetime | None:
        if self.expires_at is None:
            return None
        if self.expires_at.tzinfo is None:
            raise Invalid("invalid request: expires_at: must include a time zone, e.g. 2027-01-01T00:00:00Z")
        if self.expires_at <= datetime.now(UTC):
            raise Invalid("invalid request: expires_at: must be in the future")
        return self.expires_at


def key_view(row: RowMapping) -> dict[str, Any]:
    return {name: (v.isoformat() if isinstance(v, datetime) else v) for name, v in row.items()}


async def issue_key(ctx: AppContext, tenant_id: str, request: KeyRequest) -> JSONResponse:
    issued, statement = tenants.issue_key(tenant_id, request.name, request.checked_expiry())
    cap = ctx.settings.max_keys_per_tenant
    async with ctx.engine.begin() as conn:
        await conn.execute(tenants.lock_tenant(tenant_id))
        if (await conn.execute(tenants.active_keys(tenant_id))).scalar_one() >= cap:
            raise Conflict(f"this tenant has {cap} active API keys, the limit: revoke one before creating another")
        await conn.execute(statement)
    return JSONResponse(issued.public() | {"note": "store this key now: it is shown only once"}, status_code=201)


async def list_keys(ctx: AppContext, tenant_id: str) -> dict[str, Any]:
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(tenants.list_keys(tenant_id))).mappings().all()
    return {"data": [key_view(row) for row in rows]}


async def revoke_key(ctx: AppContext, key_id: str, tenant_id: str | None) -> dict[str, Any]:
    async with ctx.engine.begin() as conn:
        revoked = (await conn.execute(tenants.revoke_key(key_id, tenant_id))).first()
    if revoked is None:
        raise NotFound(f"no active key {key_id!r}")
    await keys_changed(ctx)
    return {"id": key_id, "revoked": True}


async def usage_report(ctx: AppContext, tenant_id: str | None, start: date | None, end: date | None) -> dict[str, Any]:
    end = end or (datetime.now(UTC).date() + timedelta(days=1))
    start = start or max(end, date.min + timedelta(days=31)) - timedelta(days=31)  # no underflow before year 1
    if start >= end:
        raise Invalid("invalid request: start must be before end")
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(usage.totals(tenant_id, start, end))).mappings().all()
    days = [
        {
            **({"tenant_id": row["tenant_id"]} if tenant_id is None else {}),
            "day": row["day"].isoformat(),
            "model": row["model"],
            "batch": row["batch"],  # batch work (docs/batch.md), priced and reported apart
            "predictions": row["predictions"],
            "images": row["images"],
            "megapixels": float(row["megapixels"]),
            "amount": float(row["amount"]),
        }
        for row in rows
    ]
    total = {k: sum(d[k] for d in days) for k in ("predictions", "images", "megapixels", "amount")}
    report = {"start": start.isoformat(), "end": end.isoformat(), "days": days, "total": total, "currency": "USD"}
    return report | {"enhancements": await enhancement_usage(ctx, tenant_id, start, end)}


async def enhancement_usage(ctx: AppContext, tenant_id: str | None, start: date, end: date) -> dict[str, Any]:
    """The prompt enhancer's billed rewrites (docs/enhancer.md), by day."""
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(enhance_jobs.totals(tenant_id, start, end))).mappings().all()
    days = [
        {
            **({"tenant_id": row["tenant_id"]} if tenant_id is None else {}),
            "day": row["day"].isoformat(),
            "enhancements": row["enhancements"],
            "amount": float(row["amount"]),
        }
        for row in rows
    ]
    return {"days": days, "total": {k: sum(d[k] for d in days) for k in ("enhancements", "amount")}}


Ctx = Annotated[AppContext, Depends(get_ctx)]
Start = Annotated[date | None, Query(description="first day (inclusive), default 31 days before end")]
End = Annotated[date | None, Query(description="last day (exclusive), default tomorrow")]


@router.get("/v1/account")
async def my_account(principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    """The key's tenant: its name and what an image costs it now (its plan, or the platform's default); the
    playground checks a key with it and shows the price before a run."""
    query = select(tenant_table.c.name, tenant_table.c.price_per_image).where(tenant_table.c.id == principal.tenant_id)
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(query)).one()
    price = ctx.settings.default_price_per_image if row.price_per_image is None else float(row.price_per_image)
    return {"tenant_id": principal.tenant_id, "name": row.name, "price_per_image": price, "currency": "USD"}


@router.get("/v1/keys")
async def my_keys(principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    return await list_keys(ctx, principal.tenant_id)


@router.post("/v1/keys", status_code=201, responses=errors(400, 413, 422))
async def create_my_key(request: KeyRequest, principal: Authenticated, ctx: Ctx) -> JSONResponse:
    return await issue_key(ctx, principal.tenant_id, request)


@router.delete("/v1/keys/{key_id}", responses=errors(404, 422))
async def revoke_my_key(key_id: str, principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    return await revoke_key(ctx, key_id, principal.tenant_id)


@router.get("/v1/usage", responses=errors(422))
async def my_usage(principal: Authenticated, ctx: Ctx, start: Start = None, end: End = None) -> dict[str, Any]:
    return await usage_report(ctx, principal.tenant_id, start, end)
