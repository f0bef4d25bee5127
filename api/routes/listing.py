"""`GET /v1/predictions`: the caller's predictions, newest first, as Replicate lists them (`results`, `next`).

Each result is what the status endpoint shows (without the live extras, which cost a read each), plus
`urls`: `get`, `stream`, and `outputs` as signed links that open without a key (for `<img src>`). Pages go by
an opaque cursor (the last row's time and id), so new predictions never shift a page being read.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import and_, or_, select

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Invalid
from api.routes.delivery import signed_output_urls
from api.routes.dialects import pruna
from api.routes.openapi_errors import errors
from api.services import live
from api.services.auth import Authenticated
from core.lifecycle import Status
from core.tables import predictions as p

router = APIRouter(tags=["pruna"], responses=errors(401, 429, 503))
Word = Literal["starting", "processing", "succeeded", "failed", "canceled"]
STATUS_OF_WORD = {word: status for status, word in pruna.STATUS_WORDS.items()}


@router.get("/v1/predictions", responses=errors(422))
async def list_predictions(
    request: Request,
    principal: Authenticated,
    ctx: Annotated[AppContext, Depends(get_ctx)],
    status: Word | None = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601 with a time zone")] = None,
    created_before: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    query = select(p).where(p.c.tenant_id == principal.tenant_id)
    if status is not None:
        query = query.where(p.c.status == STATUS_OF_WORD[status])
    for bound, name in ((created_after, "created_after"), (created_before, "created_before")):
        if bound is not None and bound.tzinfo is None:
            raise Invalid(f"invalid request: {name}: must include a time zone, e.g. 2026-12-03T00:00:00Z")
    if created_after is not None:
        query = query.where(p.c.created_at > created_after)
    if created_before is not None:
        query = query.where(p.c.created_at < created_before)
    if cursor is not None:
        at, last_id = _decode(cursor)
        query = query.where(or_(p.c.created_at < at, and_(p.c.created_at == at, p.c.id < last_id)))
    query = query.order_by(p.c.created_at.desc(), p.c.id.desc()).limit(limit + 1)
    async with ctx.engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    base_url = public_base_url(request, ctx.settings)
    page = rows[:limit]
    return {
        "results": [_result(ctx, row, base_url) for row in page],
        "next": _encode(page[-1]) if len(rows) > limit else None,
    }


def _result(ctx: AppContext, row: dict[str, Any], base_url: str) -> dict[str, Any]:
    body = pruna.view(row, base_url, live.of_final(row) if Status(row["status"]).terminal else None)
    body["urls"] = {
        "get": f"{base_url}/v1/predictions/status/{row['id']}",
        "stream": f"{base_url}/v1/predictions/{row['id']}/stream",
        "outputs": signed_output_urls(ctx.settings, base_url, row) if row["status"] == Status.COMPLETED else [],
    }
    return body


def _encode(row: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(f"{row['created_at'].isoformat()}|{row['id']}".encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        at, _, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        moment = datetime.fromisoformat(at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("invalid request: cursor: not one this API gave") from None
    if moment.tzinfo is None or not last_id:
        raise Invalid("invalid request: cursor: not one this API gave")
    return moment, last_id
