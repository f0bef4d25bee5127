"""Retention in the API (docs/retention.md): deleting a prediction's objects now, and the 410 once they are gone.

The reaper (core/retention.py) expires what is due; here a prediction is expired at once, on `DELETE` or after
a synchronous answer carried its bytes to a tenant that keeps nothing (retention 0).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from botocore.exceptions import ClientError
from sqlalchemy import select

from api.context import AppContext
from api.errors import Gone
from api.infra.rows import Row
from api.services.principals import Principal
from core import result_cache, retention
from core.tables import tenants

log = logging.getLogger(__name__)
_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


async def expire(ctx: AppContext, tenant_id: str, prediction_id: str) -> None:
    """Delete every object of the prediction (outputs and references), then mark it expired."""
    prefix = retention.prediction_prefix(tenant_id, prediction_id)
    await asyncio.to_thread(retention.delete_prefix, ctx.s3, ctx.settings.s3_bucket, prefix)
    async with ctx.engine.begin() as conn:  # with the answers the result cache gave from it (docs/cache.md)
        await conn.execute(result_cache.expire_with_originals([prediction_id], tenant_id))


async def after_sync_delivery(ctx: AppContext, principal: Principal, row: Row) -> None:
    """Called once a synchronous answer holds the outputs' bytes: a tenant keeping nothing keeps nothing. Best
    effort: should storage fail now, the reaper's next pass deletes them."""
    if principal.retention_s != 0:
        return
    try:
        await expire(ctx, principal.tenant_id, row["id"])
    except Exception:
        log.warning("could not delete the objects of %s after its answer; the reaper will", row["id"], exc_info=True)


def is_missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


async def gone(ctx: AppContext, row: Row) -> Gone:
    """The 410 for an expired prediction's outputs (or for outputs missing from storage: an operator's lifecycle
    rule, or the reaper between its delete and its mark)."""
    statement = select(retention.retention_s(ctx.settings)).where(tenants.c.id == row["tenant_id"])
    async with ctx.engine.connect() as conn:
        kept = (await conn.execute(statement)).scalar_one_or_none()
    expired_at: datetime = (row.get("expired_at") or datetime.now(UTC)).astimezone(UTC)
    if kept == 0:
        policy = "this account keeps outputs only until a synchronous answer delivers them"
    elif kept is None:
        policy = "outputs are kept for a limited time"
    else:
        policy = f"this account keeps outputs for {duration(kept)}, or until the prediction is deleted"
    return Gone(
        f"the outputs of prediction {row['id']!r} expired on {expired_at:%Y-%m-%d %H:%M} UTC ({policy}); "
        "generate it again",
        expired_at=expired_at.isoformat(),
    )


def duration(seconds: int) -> str:
    """`7 days`, `36 hours`, `1 second`: in the largest unit that divides it."""
    name, size = next((name, size) for name, size in _UNITS if seconds % size == 0)
    count = seconds // size
    return f"{count} {name}{'' if count == 1 else 's'}"
