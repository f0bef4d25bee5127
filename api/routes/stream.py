"""`GET /v1/predictions/{id}/stream`: a prediction's events as Server-Sent Events, until it is done.

    event: status    {"status": "starting", "queue_position": 3, "eta_s": 2.1, ...}   on connecting, and
                     again while queued when the position changes; {"status": "processing", "worker": …}
                     when a worker claims it
    event: progress  {"step": 2, "total": 4, "percent": 50}
    event: log       {"at": "…", "message": "encoded 1 png in 3 ms"}
    event: output    {"urls": ["…signed link…"]}                                         once completed
    event: done      the prediction as `GET /v1/predictions/status/{id}` shows it        then the stream ends

The worker's entries (status, progress, log) carry ids: a client that reconnects with `Last-Event-ID`
gets every entry after it, none twice. No Redis connection is held per stream: one subscription per API
process wakes the streams (core/progress.py); each then reads its prediction's entries with XRANGE.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Invalid, RateLimited
from api.infra import metrics
from api.infra.rows import Row
from api.routes.openapi_errors import errors
from api.services import live, predictions
from api.services.auth import Authenticated
from api.services.principals import Principal
from core import progress
from core.lifecycle import Status
from views import pruna
from views.common import STATUS_WORDS, signed_output_urls

router = APIRouter(tags=["events"], responses=errors(401, 429, 503))
ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
BATCH = 100
PING_S = 15


@router.get(
    "/v1/predictions/{prediction_id}/stream",
    response_class=EventSourceResponse,
    responses={
        200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
        **errors(404, 422),
    },  # 429 too (the router's)
)
async def stream(
    prediction_id: str,
    request: Request,
    principal: Authenticated,
    ctx: Annotated[AppContext, Depends(get_ctx)],
    last_event_id: Annotated[str | None, Header(description="resume after this event")] = None,
) -> EventSourceResponse:
    if last_event_id is not None and not ENTRY_ID.fullmatch(last_event_id):
        raise Invalid("invalid request: Last-Event-ID: must be an id this stream sent, like 1733230000000-0")
    row = await predictions.fetch_or_404(ctx, principal, prediction_id)
    check_stream_limit(ctx, principal)
    events = _events(ctx, principal, row, public_base_url(request, ctx.settings), last_event_id)
    return EventSourceResponse(events, ping=PING_S, headers={"Cache-Control": "no-store"})


async def _events(
    ctx: AppContext, principal: Principal, row: Row, base_url: str, cursor: str | None
) -> AsyncIterator[ServerSentEvent]:
    prediction_id = row["id"]
    key = progress.stream_key(ctx.settings, prediction_id)
    with (
        ctx.waiter.watch(prediction_id, streams_of(principal)) as finished,  # not counted as Try-Sync waits
        ctx.progress.watch(prediction_id) as more,
        metrics.STREAMS.track_inprogress(),
    ):
        shown = await _status(ctx, row)
        yield _event("status", shown)
        while True:
            if finished.is_set():
                finished.clear()
                row = await predictions.fetch_or_404(ctx, principal, prediction_id)
            start = f"({cursor}" if cursor else "-"
            entries = progress.entries(await ctx.redis.xrange(key, min=start, count=BATCH))
            for entry_id, kind, data in entries:
                yield _event(kind, data, entry_id)
                cursor = entry_id
            if len(entries) == BATCH:
                continue
            status = Status(row["status"])
            if status.terminal:
                if status is Status.COMPLETED:
                    yield _event("output", {"urls": signed_output_urls(ctx.settings, base_url, row)})
                yield _event("done", pruna.view(row, base_url, await live.extras(ctx, row)))
                return
            if not await woken(finished, more, ctx.settings.stream_refresh_s) and status is Status.CREATED:
                row = await predictions.fetch_or_404(ctx, principal, prediction_id)
                if row["status"] == Status.CREATED and (now := await _status(ctx, row)) != shown:
                    shown = now
                    yield _event("status", shown)


def streams_of(principal: Principal) -> str:
    return f"streams:{principal.tenant_id}"


def check_stream_limit(ctx: AppContext, principal: Principal) -> None:
    if ctx.waiter.waiting_for(streams_of(principal)) >= ctx.settings.max_streams_per_tenant:
        raise RateLimited(
            f"this tenant has {ctx.settings.max_streams_per_tenant} event streams open here, the limit", retry_after=5
        )


async def _status(ctx: AppContext, row: Row) -> dict[str, Any]:
    return {"status": STATUS_WORDS[row["status"]]} | await live.extras(ctx, row)


async def woken(finished: asyncio.Event, more: asyncio.Event, timeout_s: float) -> bool:
    """Whether either event came within the time (`more` is cleared: its entries are read next)."""
    waits = [asyncio.ensure_future(finished.wait()), asyncio.ensure_future(more.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait
    more.clear()
    return bool(done)


def _event(kind: str, data: dict[str, Any], entry_id: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(data).decode(), event=kind, id=entry_id)
