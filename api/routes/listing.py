"""`GET /v1/predictions`: the caller's predictions, newest first, as Replicate lists them (`results`, `next`,
`previous`). One list in two shapes (api/routes/dialects/replicate.py, `speaks_replicate`):

- Replicate's callers get its prediction objects, and `next` / `previous` as URLs its client follows.
- Everyone else (the playground) gets what the status endpoint shows (without the live extras, which cost a read
  each), plus `urls`: `get`, `stream`, and `outputs` as signed links that open without a key (for `<img src>`);
  `next` / `previous` are cursors for the `cursor` parameter.

Pages go by an opaque cursor (a row's time and id, and which way from it), so new predictions never shift a page
being read.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import and_, or_, select

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Invalid, negotiated_route
from api.routes.dialects import replicate
from api.routes.openapi_errors import errors
from api.services import live
from api.services.auth import Authenticated
from core.lifecycle import Status
from core.tables import predictions as p
from views import pruna
from views import replicate as replicate_view
from views.common import STATUS_WORDS, signed_output_urls

router = APIRouter(
    tags=["pruna", "replicate"], route_class=negotiated_route(replicate.problem_for), responses=errors(401, 429, 503)
)
Word = Literal["starting", "processing", "succeeded", "failed", "canceled"]
STATUS_OF_WORD = {word: status for status, word in STATUS_WORDS.items()}
NEWER = ">"  # a cursor to the page before: the rows newer than its row


@router.get("/v1/predictions", responses=errors(422))
async def list_predictions(
    request: Request,
    principal: Authenticated,
    ctx: Annotated[AppContext, Depends(get_ctx)],
    status: Word | None = None,
    created_after: Annotated[datetime | None, Query(description="ISO 8601 with a time zone")] = None,
    created_before: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next` or `previous` of another page")] = None,
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
    newer = False
    if cursor is not None:
        at, last_id, newer = _decode(cursor)
        if newer:
            query = query.where(or_(p.c.created_at > at, and_(p.c.created_at == at, p.c.id > last_id)))
        else:
            query = query.where(or_(p.c.created_at < at, and_(p.c.created_at == at, p.c.id < last_id)))
    order = (p.c.created_at.asc(), p.c.id.asc()) if newer else (p.c.created_at.desc(), p.c.id.desc())
    async with ctx.engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query.order_by(*order).limit(limit + 1))).mappings()]
    more = len(rows) > limit  # beyond this page, the way the cursor went
    page = list(reversed(rows[:limit])) if newer else rows[:limit]
    older_page = _encode(page[-1]) if page and (newer or more) else None
    newer_page = _encode(page[0], NEWER) if page and (more if newer else cursor is not None) else None
    base_url = public_base_url(request, ctx.settings)
    if replicate.speaks_replicate(request):
        return {
            "previous": _link(request, base_url, newer_page),
            "next": _link(request, base_url, older_page),
            "results": [replicate_view.view(row, base_url, ctx.settings, row["logs"]) for row in page],
        }
    return {"previous": newer_page, "next": older_page, "results": [_result(ctx, row, base_url) for row in page]}


def _result(ctx: AppContext, row: dict[str, Any], base_url: str) -> dict[str, Any]:
    body = pruna.view(row, base_url, live.of_final(row) if Status(row["status"]).terminal else None)
    body["urls"] = {
        "get": f"{base_url}/v1/predictions/status/{row['id']}",
        "stream": f"{base_url}/v1/predictions/{row['id']}/stream",
        "outputs": signed_output_urls(ctx.settings, base_url, row) if row["status"] == Status.COMPLETED else [],
    }
    return body


def _link(request: Request, base_url: str, cursor: str | None) -> str | None:
    """The URL of the page at `cursor`, with the request's filters."""
    if cursor is None:
        return None
    return f"{base_url}/v1/predictions?{urlencode({**request.query_params, 'cursor': cursor})}"


def _encode(row: dict[str, Any], direction: str = "") -> str:
    text = f"{row['created_at'].isoformat()}|{row['id']}" + (f"|{direction}" if direction else "")
    return base64.urlsafe_b64encode(text.encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str, bool]:
    """(the row's time, its id, whether the page wanted is of the rows newer than it)."""
    try:
        at, last_id, *direction = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        moment = datetime.fromisoformat(at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("invalid request: cursor: not one this API gave") from None
    if moment.tzinfo is None or not last_id or direction not in ([], [NEWER]):
        raise Invalid("invalid request: cursor: not one this API gave")
    return moment, last_id, direction == [NEWER]
