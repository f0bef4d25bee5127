"""The operator's actions on any tenant's predictions and on tenants (routes: api/routes/operations.py).

Each action runs the code path a tenant's own request runs (api/services/predictions.py: cancel, delete,
enqueue), with the prediction's own tenant; only requeue, which tenants cannot do, has a transition of its own
(core/lifecycle.py, `requeue_failed`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, select

from api.context import AppContext
from api.errors import Conflict, NotFound
from api.infra.rows import Row
from api.services import predictions
from api.services.auth import keys_changed
from core import lifecycle, progress, quota, tenants
from core.tables import predictions as p

MAX_REQUEUE = 1000  # predictions one filtered requeue takes at most


async def find(ctx: AppContext, prediction_id: str) -> Row:
    """Any tenant's prediction by id."""
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(select(p).where(p.c.id == prediction_id))).mappings().first()
    if row is None:
        raise NotFound(f"prediction {prediction_id!r} not found")
    return dict(row)


def view(row: Row) -> dict[str, Any]:
    """A prediction as operators read it: every column but the webhook's signing secret."""
    shown = {name: (value.isoformat() if isinstance(value, datetime) else value) for name, value in row.items()}
    if row.get("webhook"):
        shown["webhook"] = {k: v for k, v in row["webhook"].items() if k != "secret"}
    return shown


async def cancel(ctx: AppContext, prediction_id: str) -> Row:
    """Cancel it if queued or running; a finished one is returned unchanged."""
    row = await find(ctx, prediction_id)
    return await predictions.cancel_of(ctx, row["tenant_id"], prediction_id) or row


async def delete(ctx: AppContext, prediction_id: str) -> None:
    row = await find(ctx, prediction_id)
    await predictions.delete(ctx, row["tenant_id"], prediction_id)


async def requeue(
    ctx: AppContext,
    limit: int,
    prediction_id: str | None = None,
    tenant_id: str | None = None,
    model: str | None = None,
    failed_since: datetime | None = None,
) -> list[str]:
    """Failed predictions back in the queue, each as a new submit would be: a slot of its tenant's in-flight
    count (the worker gives it back at the end), the sweeper's mark and a task on its model's queue; the failed
    run's event stream goes, so that a client streaming the new run does not read the old run's end."""
    statement = lifecycle.requeue_failed(limit, prediction_id, tenant_id, model, failed_since)
    async with ctx.engine.begin() as conn:
        requeued = (await conn.execute(statement)).all()
    if requeued:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for row in requeued:  # over the tenant's cap if need be: the operator decided
                pipe.incr(quota.in_flight_key(ctx.settings.queue_name, row.tenant_id))
                pipe.delete(progress.stream_key(ctx.settings, row.id))
            await pipe.execute()
    for row in requeued:
        await predictions.enqueue(ctx, row.id, row.model, row.priority)
    return [row.id for row in requeued]


async def requeue_one(ctx: AppContext, prediction_id: str) -> None:
    if not await requeue(ctx, 1, prediction_id=prediction_id):
        row = await find(ctx, prediction_id)
        why = "its outputs and references were deleted" if row["expired_at"] else f"it is {row['status']}"
        raise Conflict(f"prediction {prediction_id!r} cannot be requeued: {why}; only a stored failed one can")


async def find_tenant(ctx: AppContext, name_or_id: str) -> RowMapping:
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(tenants.find_tenant(name_or_id))).mappings().first()
    if row is None:
        raise NotFound(f"tenant {name_or_id!r} not found")
    return row


async def suspend(ctx: AppContext, name_or_id: str, suspended: bool) -> RowMapping:
    """Suspend or resume a tenant, effective on every API replica as soon as it reads the keys channel."""
    tenant = await find_tenant(ctx, name_or_id)
    async with ctx.engine.begin() as conn:
        row = (await conn.execute(tenants.set_suspended(tenant["id"], suspended))).mappings().one()
    await keys_changed(ctx)  # cached principals carry the old state
    return row
