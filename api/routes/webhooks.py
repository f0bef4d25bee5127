"""A tenant's webhooks: the signing secret (as Replicate's `GET /v1/webhooks/default/secret`), its rotation,
the delivery log and replays."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.context import AppContext, get_ctx
from api.routes.openapi_errors import errors
from api.services import webhooks
from api.services.auth import Authenticated

router = APIRouter(tags=["webhooks"], responses=errors(401, 429, 503))
Ctx = Annotated[AppContext, Depends(get_ctx)]
Status = Literal["pending", "sending", "delivered", "failed", "gone"]


@router.get("/v1/webhooks/default/secret")
async def signing_secret(principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    """`{"key": "whsec_…"}`: verify deliveries with it (Standard Webhooks). During a rotation's overlap the
    previous key is shown too, and deliveries carry a signature by each."""
    return await webhooks.secret(ctx, principal)


@router.post("/v1/webhooks/default/secret/rotate", responses=errors(422))
async def rotate_secret(
    principal: Authenticated,
    ctx: Ctx,
    overlap_s: Annotated[int | None, Query(ge=0, le=7 * 86400, description="how long the old key signs too")] = None,
) -> dict[str, Any]:
    overlap = ctx.settings.webhook_secret_overlap_s if overlap_s is None else overlap_s
    return await webhooks.rotate(ctx, principal, overlap)


@router.get("/v1/webhooks/deliveries", responses=errors(422))
async def deliveries(
    principal: Authenticated,
    ctx: Ctx,
    prediction_id: str | None = None,
    status: Status | None = None,
    before: Annotated[datetime | None, Query(description="the `next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> dict[str, Any]:
    """Newest first, each with its attempts: time, status code, latency, the answer's first bytes."""
    data = await webhooks.deliveries(ctx, principal.tenant_id, prediction_id, status, before, limit)
    return {"data": data, "next": data[-1]["created_at"] if len(data) == limit else None}


@router.post("/v1/webhooks/deliveries/{delivery_id}/replay", status_code=202, responses=errors(404, 422))
async def replay(delivery_id: str, principal: Authenticated, ctx: Ctx) -> JSONResponse:
    """Send it again now, with the same `webhook-id`."""
    await webhooks.replay(ctx, principal.tenant_id, delivery_id)
    return JSONResponse({"id": delivery_id, "status": "pending"}, status_code=202)
