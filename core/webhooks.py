"""Webhook deliveries as rows: their statements, retry schedule and Standard Webhooks signatures.

A delivery is `pending` (due at `next_attempt_at`), `sending` (held by one webhook worker thread until
`lease_expires_at`, which outlives the attempt's deadline), then `delivered` (2xx), `gone` (410: the
receiver asked us to stop) or `failed` (no 2xx before the retry window closed). The trigger of
migrations/versions/0007 writes them; the webhook worker (worker/webhooks.py) claims and sends them, a
tenant's at most `webhook_tenant_concurrency` at once; every attempt leaves a webhook_attempts row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Update, and_, case, func, literal, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from standardwebhooks import Webhook

from core.ids import new_id
from core.settings import Settings
from core.tables import predictions, webhook_secrets
from core.tables import webhook_attempts as attempts
from core.tables import webhook_deliveries as deliveries

EVENTS = ("start", "output", "completed")
DEFAULT_EVENTS = ("completed",)
RESPONSE_HEAD_BYTES = 256  # of each answer, kept in the delivery log
KICK_AGAIN_S = 10  # a due delivery whose kick has not been taken up this long is kicked again
CLAIM_LOCK = 0x57EB  # pg_advisory_xact_lock(CLAIM_LOCK, hashtext(tenant_id)): one tenant's claims, one at a time


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(signing_secrets: list[str], msg_id: str, timestamp: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,…` per secret, space-separated (both during a rotation)."""
    return " ".join(Webhook(_as_key(secret)).sign(msg_id, timestamp, body) for secret in signing_secrets)


def provider_headers(webhook: dict[str, Any], body: str) -> dict[str, str]:
    """Headers a provider's own clients check, beside the Standard Webhooks ones: BFL's, when the client gave a
    `webhook_secret` — `X-Webhook-Secret` echoing it (as BFL's `bfl` package verifies, src/bfl/_webhooks.py in
    black-forest-labs/blackforest) and `X-BFL-Signature: sha256=<hex HMAC-SHA256 of the body>` (BFL's skills,
    bfl-api/references/webhook-integration.md)."""
    secret = webhook.get("secret")
    if webhook.get("dialect") != "bfl" or not secret:
        return {}
    digest = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
    return {"x-webhook-secret": secret, "x-bfl-signature": f"sha256={digest}"}


def _as_key(secret: str) -> str | bytes:
    # Ours are `whsec_` + base64; a client's own secret (BFL's `webhook_secret`) is used as its bytes.
    return secret if secret.startswith("whsec_") else secret.encode()


def retry_delay(attempt: int, settings: Settings) -> float:
    """Seconds before the retry after failed attempt number `attempt` (1, 2, …): 5 s, 15 s, 45 s, … × 3 each,
    capped at `webhook_retry_max_s`, each ±20 % at random so that receivers coming back are not stampeded."""
    delay = min(settings.webhook_retry_base_s * 3 ** (attempt - 1), settings.webhook_retry_max_s)
    return delay * random.uniform(0.8, 1.2)


def active_secrets(tenant_id: str) -> Select[Any]:
    """The tenant's signing secrets: the current one, then the one it replaced while that one has not retired."""
    return (
        select(webhook_secrets.c.secret, webhook_secrets.c.retires_at)
        .where(
            webhook_secrets.c.tenant_id == tenant_id,
            or_(webhook_secrets.c.retires_at.is_(None), webhook_secrets.c.retires_at > func.now()),
        )
        .order_by(webhook_secrets.c.retires_at.desc().nulls_first(), webhook_secrets.c.created_at.desc())
        .limit(2)
    )


def lock_tenant_of(prediction_id: str) -> Select[Any]:
    """The prediction's tenant, its claims locked until this transaction ends (so that its cap holds when
    many senders claim at once); no row: the prediction is gone."""
    lock = func.pg_advisory_xact_lock(literal(CLAIM_LOCK), func.hashtext(predictions.c.tenant_id))
    return select(predictions.c.tenant_id, lock).where(predictions.c.id == prediction_id)


def _in_flight() -> ColumnElement[bool]:
    return and_(deliveries.c.status == "sending", deliveries.c.lease_expires_at >= func.now())


def sending_count(tenant_id: str) -> Select[Any]:
    """How many of the tenant's deliveries are being sent now (by any webhook worker)."""
    return select(func.count()).where(deliveries.c.tenant_id == tenant_id, _in_flight())


def defer(prediction_id: str) -> Update:
    """The prediction's due deliveries wait for their tenant to have room: unkicked, so that the poller
    queues them again as soon as it has (kick_due)."""
    return (
        update(deliveries)
        .where(
            deliveries.c.prediction_id == prediction_id,
            deliveries.c.status == "pending",
            deliveries.c.next_attempt_at <= func.now(),
        )
        .values(kicked_at=None)
    )


def claim_next(prediction_id: str, lease_s: float) -> Update:
    """The prediction's oldest due delivery, pending → sending under a lease; no row: nothing due."""
    due = (
        select(deliveries.c.id)
        .where(
            deliveries.c.prediction_id == prediction_id,
            deliveries.c.status == "pending",
            deliveries.c.next_attempt_at <= func.now(),
        )
        .order_by(deliveries.c.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(deliveries)
        .where(deliveries.c.id == due)
        .values(
            status="sending",
            attempts=deliveries.c.attempts + 1,
            lease_expires_at=func.now() + text(f"interval '{float(lease_s)} seconds'"),
        )
        .returning(deliveries)
    )


def record(delivery_id: str, attempt: int, outcome: str, next_attempt_at: datetime | None) -> Update:
    """The claimed attempt's end: delivered, gone, failed, or pending again at `next_attempt_at`. Applies only
    while this attempt still holds the delivery (a lapsed lease may have passed it to another worker)."""
    final = outcome != "pending"
    return (
        update(deliveries)
        .where(deliveries.c.id == delivery_id, deliveries.c.status == "sending", deliveries.c.attempts == attempt)
        .values(
            status=outcome,
            lease_expires_at=None,
            next_attempt_at=next_attempt_at or func.now(),
            kicked_at=None,
            finished_at=func.now() if final else None,
        )
        .returning(deliveries.c.id)
    )


def log_attempt(
    delivery_id: str, at: datetime, status_code: int | None, latency_ms: int, head: bytes, error: str | None
) -> Any:
    return attempts.insert().values(
        delivery_id=delivery_id,
        attempted_at=at,
        status_code=status_code,
        latency_ms=latency_ms,
        response_head=head[:RESPONSE_HEAD_BYTES].decode("utf-8", "replace").replace("\x00", ""),
        error=error,
    )


def kick_due(per_tenant: int, limit: int = 1000) -> Update:
    """Due deliveries (and ones whose sender died: lease lapsed) that no queued task covers, at most as many of
    a tenant's as it has room for beside those it is sending (`per_tenant` at once), each tenant's first
    before anyone's second: marked kicked and returned, so the poller queues a task for each prediction."""
    lapsed = and_(deliveries.c.status == "sending", deliveries.c.lease_expires_at < func.now())
    due = and_(deliveries.c.status == "pending", deliveries.c.next_attempt_at <= func.now())
    unkicked = or_(
        deliveries.c.kicked_at.is_(None), deliveries.c.kicked_at < func.now() - text(f"interval '{KICK_AGAIN_S} s'")
    )
    busy = (
        select(deliveries.c.tenant_id, func.count().label("sending"))
        .where(_in_flight())
        .group_by(deliveries.c.tenant_id)
        .subquery()
    )
    room = literal(per_tenant) - func.coalesce(busy.c.sending, 0)
    turn = func.row_number().over(partition_by=deliveries.c.tenant_id, order_by=deliveries.c.next_attempt_at)
    waiting = (
        select(deliveries.c.id, deliveries.c.next_attempt_at, turn.label("turn"), room.label("room"))
        .select_from(deliveries.outerjoin(busy, busy.c.tenant_id == deliveries.c.tenant_id))
        .where(or_(due, lapsed), unkicked, room > 0)
        .subquery()
    )
    chosen = (
        select(waiting.c.id)
        .where(waiting.c.turn <= waiting.c.room)
        .order_by(waiting.c.turn, waiting.c.next_attempt_at)
        .limit(limit)
    )
    ids = (  # locked, and checked again: another poller may have kicked them since
        select(deliveries.c.id)
        .where(deliveries.c.id.in_(chosen.scalar_subquery()), or_(due, lapsed), unkicked)
        .with_for_update(skip_locked=True)
    )
    return (
        update(deliveries)
        .where(deliveries.c.id.in_(ids.scalar_subquery()))
        .values(status="pending", kicked_at=func.now(), lease_expires_at=None)
        .returning(deliveries.c.prediction_id)
    )


def replay(delivery_id: str, tenant_id: str | None) -> Update:
    """Send a delivery again now, under the same `webhook-id` (a finished one, or a pending one early); scoped to
    a tenant unless an operator replays it."""
    statement = update(deliveries).where(deliveries.c.id == delivery_id, deliveries.c.status != "sending")
    if tenant_id is not None:
        statement = statement.where(deliveries.c.tenant_id == tenant_id)
    return statement.values(_AGAIN_NOW).returning(deliveries.c.id, deliveries.c.prediction_id)


def replay_finished(tenant_id: str, status: str, limit: int) -> Update:
    """Send again up to `limit` of the tenant's deliveries that ended `status` (failed or gone), newest first."""
    chosen = (
        select(deliveries.c.id)
        .where(deliveries.c.tenant_id == tenant_id, deliveries.c.status == status)
        .order_by(deliveries.c.created_at.desc())
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(deliveries)
        .where(deliveries.c.id.in_(chosen), deliveries.c.status == status)
        .values(_AGAIN_NOW)
        .returning(deliveries.c.id, deliveries.c.prediction_id)
    )


# A replayed delivery: due now, its task queued by the caller (kicked: the poller leaves it alone meanwhile).
_AGAIN_NOW = {"status": "pending", "next_attempt_at": func.now(), "kicked_at": func.now(), "finished_at": None}


def receiver(url: ColumnElement[str]) -> ColumnElement[str]:
    """The host a delivery's URL names, lower-cased (userinfo and port left out; an IPv6 address in its brackets):
    the receiver that the backlog metric and the operators' delivery filter name."""
    return func.lower(func.substring(url, RECEIVER_PATTERN))


RECEIVER_PATTERN = r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)"


def now() -> datetime:
    return datetime.now(UTC)


def ensure_secret(tenant_id: str) -> Any:
    """The tenant's first secret, unless it has a current one (the partial unique index decides a race)."""
    return (
        insert(webhook_secrets)
        .values(id=new_id(), tenant_id=tenant_id, secret=new_secret())
        .on_conflict_do_nothing(index_elements=["tenant_id"], index_where=webhook_secrets.c.retires_at.is_(None))
    )


def retire_current(tenant_id: str, overlap_s: int) -> Update:
    """The current secret keeps signing for `overlap_s` more; the one it replaced (if still signing) stops now,
    so that a delivery never carries more than two signatures."""
    return (
        update(webhook_secrets)
        .where(
            webhook_secrets.c.tenant_id == tenant_id,
            or_(webhook_secrets.c.retires_at.is_(None), webhook_secrets.c.retires_at > func.now()),
        )
        .values(
            retires_at=case(
                (webhook_secrets.c.retires_at.is_(None), func.now() + text(f"interval '{int(overlap_s)} seconds'")),
                else_=func.now(),
            )
        )
        .returning(webhook_secrets.c.retires_at)
    )
