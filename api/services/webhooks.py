"""Webhooks on the API's side: a submit's webhook checked and stored, the tenant's signing secret, the delivery
log and its replays. Sending is the webhook worker's (worker/webhooks.py)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select

from api.context import AppContext
from api.errors import Invalid, NotFound
from api.infra.fetch import FetchError, check
from api.services.principals import Principal
from core import logs, webhooks
from core.queue import kick_webhooks
from core.tables import webhook_attempts, webhook_deliveries

MAX_URL_CHARS = 2048
MAX_SECRET_CHARS = 256
DIALECTS = ("pruna", "replicate", "wavespeed", "generate", "openai", "fal", "bfl")


async def accept(
    ctx: AppContext,
    dialect: str,
    base_url: str,
    url: object,
    url_field: str,
    events: object = None,
    events_field: str = "webhook_events_filter",
    secret: object = None,
    secret_field: str = "webhook_secret",
) -> dict[str, Any] | None:
    """The webhook to store with a prediction (None without a URL), or Invalid naming the field at fault.
    The receiver must resolve to a public address (or an allowlisted one) now, as it must at each send."""
    if url is None or url == "":
        return None
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise Invalid(f"invalid request: {url_field}: must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        await check(url, ctx.settings.fetch_allowlist)
    except FetchError as exc:
        raise Invalid(f"invalid request: {url_field}: {exc}") from None
    webhook: dict[str, Any] = {
        "url": url,
        "events": _events(events, events_field),
        "dialect": dialect,
        "base_url": base_url,  # the payload's links, as the client's own requests see them
    }
    request_id = logs.current("request_id")
    if request_id is not None:  # the webhook worker logs its attempts under it and sends it as X-Request-ID
        webhook["request_id"] = request_id
    if secret is not None and secret != "":
        if not isinstance(secret, str) or not 8 <= len(secret) <= MAX_SECRET_CHARS:
            raise Invalid(f"invalid request: {secret_field}: must be a string of 8–{MAX_SECRET_CHARS} characters")
        webhook["secret"] = secret
    return webhook


def _events(events: object, field: str) -> list[str]:
    if events is None:
        return list(webhooks.DEFAULT_EVENTS)
    known = ", ".join(webhooks.EVENTS)
    if not isinstance(events, list) or not events or not all(e in webhooks.EVENTS for e in events):
        raise Invalid(f"invalid request: {field}: must be a non-empty list of events among {known}")
    return [event for event in webhooks.EVENTS if event in events]


async def secret(ctx: AppContext, principal: Principal) -> dict[str, Any]:
    """The tenant's current signing secret (made on first use), and the rotated one still signing, if any."""
    async with ctx.engine.begin() as conn:
        await conn.execute(webhooks.ensure_secret(principal.tenant_id))
        rows = (await conn.execute(webhooks.active_secrets(principal.tenant_id))).all()
    current, *previous = rows
    body: dict[str, Any] = {"key": current.secret}
    if previous:
        body["previous_key"] = previous[0].secret
        body["previous_key_retires_at"] = previous[0].retires_at
    return body


async def rotate(ctx: AppContext, principal: Principal, overlap_s: int) -> dict[str, Any]:
    """A new current secret; the old one signs beside it for `overlap_s` (0: not at all)."""
    async with ctx.engine.begin() as conn:
        await conn.execute(webhooks.ensure_secret(principal.tenant_id))
        await conn.execute(webhooks.retire_current(principal.tenant_id, overlap_s))
        await conn.execute(webhooks.ensure_secret(principal.tenant_id))
    return await secret(ctx, principal)


async def deliveries(
    ctx: AppContext,
    tenant_id: str | None,
    prediction_id: str | None,
    status: str | None,
    before: datetime | None,
    limit: int,
    receiver: str | None = None,
    all_tenants: bool = False,
) -> list[dict[str, Any]]:
    """A tenant's deliveries, newest first, each with its attempts (oldest first); `receiver`: only those to that
    host (as the backlog metric names it, core.webhooks.receiver). `all_tenants` (operators): `tenant_id` None
    reads every tenant's, and each delivery names its tenant."""
    assert tenant_id is not None or all_tenants, "a tenant's request reads only its own deliveries"
    d = webhook_deliveries
    query = select(d).order_by(d.c.created_at.desc()).limit(limit)
    for column, value in (("tenant_id", tenant_id), ("prediction_id", prediction_id), ("status", status)):
        if value is not None:
            query = query.where(d.c[column] == value)
    if receiver is not None:
        query = query.where(webhooks.receiver(d.c.url) == receiver.lower())
    if before is not None:
        query = query.where(d.c.created_at < before)
    async with ctx.engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
        ids = [row["id"] for row in rows]
        tried = (
            await conn.execute(
                select(webhook_attempts)
                .where(webhook_attempts.c.delivery_id.in_(ids))
                .order_by(webhook_attempts.c.attempted_at)
            )
        ).mappings()
        by_delivery: dict[str, list[dict[str, Any]]] = {delivery_id: [] for delivery_id in ids}
        for attempt in tried:
            by_delivery[attempt["delivery_id"]].append(_attempt(attempt))
    shown = [_delivery(row, by_delivery[row["id"]]) for row in rows]
    if all_tenants:
        return [view | {"tenant_id": row["tenant_id"]} for view, row in zip(shown, rows, strict=True)]
    return shown


async def replay(ctx: AppContext, tenant_id: str | None, delivery_id: str) -> None:
    """Send the delivery again now (a tenant's own; any tenant's: None, for operators)."""
    async with ctx.engine.begin() as conn:
        replayed = (await conn.execute(webhooks.replay(delivery_id, tenant_id))).first()
    if replayed is None:
        async with ctx.engine.connect() as conn:
            found = select(webhook_deliveries.c.id).where(webhook_deliveries.c.id == delivery_id)
            if tenant_id is not None:
                found = found.where(webhook_deliveries.c.tenant_id == tenant_id)
            exists = await conn.scalar(found)
        if exists is None:
            raise NotFound(f"webhook delivery {delivery_id!r} not found")
        return  # being sent right now
    await kick(ctx, [replayed.prediction_id])


async def replay_finished(ctx: AppContext, tenant_id: str, status: str, limit: int) -> list[str]:
    """Send again up to `limit` of the tenant's deliveries that ended `status` (failed, gone), newest first."""
    async with ctx.engine.begin() as conn:
        replayed = (await conn.execute(webhooks.replay_finished(tenant_id, status, limit))).all()
    await kick(ctx, {row.prediction_id for row in replayed})
    return [row.id for row in replayed]


async def kick(ctx: AppContext, prediction_ids: Iterable[str]) -> None:
    """Queue the sending of these predictions' due deliveries (a lost kick is the poller's)."""
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for prediction_id in prediction_ids:
            kick_webhooks(pipe, ctx.settings, prediction_id)
        await pipe.execute()


def _delivery(row: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "prediction_id": row["prediction_id"],
        "event": row["event"],
        "url": row["url"],
        "status": row["status"],
        "attempts": attempts,
        "attempt_count": row["attempts"],
        "next_attempt_at": row["next_attempt_at"] if row["status"] in ("pending", "sending") else None,
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
    }


def _attempt(row: Any) -> dict[str, Any]:
    return {
        "at": row["attempted_at"],
        "status_code": row["status_code"],
        "latency_ms": row["latency_ms"],
        "response_head": row["response_head"],
        "error": row["error"],
    }
