"""The operator's actions under /admin/v1, behind the admin key (api/routes/admin.py, `require_admin`): any
tenant's prediction looked up, canceled, deleted or requeued; a tenant suspended or resumed; the webhook delivery
log across tenants, and replays. docs/operations.md, "Operator actions", names each with its CLI command."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.context import AppContext, get_ctx
from api.routes.admin import require_admin, tenant_view
from api.routes.openapi_errors import errors
from api.routes.webhooks import Status as DeliveryStatus
from api.services import operations, webhooks

router = APIRouter(
    prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=errors(401, 404, 429, 503)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


@router.get("/predictions/{prediction_id}", responses=errors(422))
async def lookup(prediction_id: str, ctx: Ctx) -> dict[str, Any]:
    """Any tenant's prediction, every column (its webhook's signing secret left out)."""
    return operations.view(await operations.find(ctx, prediction_id))


@router.post("/predictions/{prediction_id}/cancel", responses=errors(422))
async def cancel(prediction_id: str, ctx: Ctx) -> dict[str, Any]:
    """Cancel it if queued or running (as its tenant's own cancel does); a finished one comes back unchanged."""
    return operations.view(await operations.cancel(ctx, prediction_id))


@router.delete("/predictions/{prediction_id}", status_code=204, response_class=Response, responses=errors(422))
async def delete(prediction_id: str, ctx: Ctx) -> Response:
    """Cancel it if unfinished, and delete its outputs and references (as its tenant's own DELETE does)."""
    await operations.delete(ctx, prediction_id)
    return Response(status_code=204)


@router.post("/predictions/{prediction_id}/requeue", status_code=202, responses=errors(409, 422))
async def requeue_one(prediction_id: str, ctx: Ctx) -> JSONResponse:
    """Run a failed prediction again: back in its model's queue, its attempts starting over."""
    await operations.requeue_one(ctx, prediction_id)
    return JSONResponse({"requeued": [prediction_id]}, status_code=202)


class RequeueFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: str | None = Field(None, description="the tenant's id or name")
    model: str | None = None
    failed_since: datetime | None = Field(None, description="only predictions that failed at or after this time")
    limit: int = Field(100, ge=1, le=operations.MAX_REQUEUE, description="at most this many, latest failures first")


@router.post("/predictions/requeue", status_code=202, responses=errors(400, 413, 422))
async def requeue(request: RequeueFilter, ctx: Ctx) -> JSONResponse:
    """Run failed predictions again: those matching every filter given, still stored (not expired or deleted)."""
    tenant = None if request.tenant_id is None else (await operations.find_tenant(ctx, request.tenant_id))["id"]
    requeued = await operations.requeue(ctx, request.limit, None, tenant, request.model, request.failed_since)
    return JSONResponse({"requeued": requeued}, status_code=202)


@router.post("/tenants/{tenant_id}/suspend", responses=errors(422))
async def suspend(tenant_id: str, ctx: Ctx) -> dict[str, Any]:
    """Refuse the tenant's submits (403); its reads, its predictions in flight and their webhooks go on."""
    return tenant_view(await operations.suspend(ctx, tenant_id, True))


@router.post("/tenants/{tenant_id}/resume", responses=errors(422))
async def resume(tenant_id: str, ctx: Ctx) -> dict[str, Any]:
    return tenant_view(await operations.suspend(ctx, tenant_id, False))


@router.get("/webhooks/deliveries", responses=errors(422))
async def deliveries(
    ctx: Ctx,
    tenant_id: Annotated[str | None, Query(description="the tenant's id or name")] = None,
    status: DeliveryStatus | None = None,
    receiver: Annotated[str | None, Query(max_length=300, description="host, as the backlog metric has it")] = None,
    prediction_id: str | None = None,
    before: Annotated[datetime | None, Query(description="the `next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> dict[str, Any]:
    """Every tenant's webhook deliveries (or one tenant's), newest first, each with its tenant and attempts."""
    tenant = None if tenant_id is None else (await operations.find_tenant(ctx, tenant_id))["id"]
    data = await webhooks.deliveries(ctx, tenant, prediction_id, status, before, limit, receiver, all_tenants=True)
    return {"data": data, "next": data[-1]["created_at"] if len(data) == limit else None}


@router.post("/webhooks/deliveries/{delivery_id}/replay", status_code=202, responses=errors(422))
async def replay(delivery_id: str, ctx: Ctx) -> JSONResponse:
    """Send it again now, with the same `webhook-id`."""
    await webhooks.replay(ctx, None, delivery_id)
    return JSONResponse({"id": delivery_id, "status": "pending"}, status_code=202)


class ReplayFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(description="the tenant's id or name")
    status: Literal["failed", "gone"] = "failed"
    limit: int = Field(100, ge=1, le=1000, description="at most this many, newest first")


@router.post("/webhooks/deliveries/replay", status_code=202, responses=errors(400, 413, 422))
async def replay_tenants(request: ReplayFilter, ctx: Ctx) -> JSONResponse:
    """Send a tenant's failed (or gone) deliveries again, once its receiver is back."""
    tenant = (await operations.find_tenant(ctx, request.tenant_id))["id"]
    replayed = await webhooks.replay_finished(ctx, tenant, request.status, request.limit)
    return JSONResponse({"replayed": replayed}, status_code=202)
