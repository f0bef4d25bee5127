"""Batch jobs (docs/batch.md): the feeder that turns a batch's lines into predictions when GPUs are idle, and the
batch's end (its counts and files), decided from the rows.

A batch's lines wait in `batch_requests` until fed. `feed` keeps at most `batch_feed_depth` batch predictions
queued (all tenants together) in their own broker list, priority 9 (core.queue.BATCH_PRIORITY), which a worker
takes only when every interactive list is empty: interactive work waits at most for the batch image already
running. Each feed goes to the tenant with the fewest batch predictions queued or running (its oldest batch
first), so tenants share the idle GPUs evenly among their batches. A batch whose window is about to end
(`batch_urgent_s`) queues in the lowest interactive class instead, so that it still finishes in time.

Who calls it: the API when it creates a batch, a worker after each batch prediction it finishes, and the
sweeper every pass (`tick`), which also expires batches past their window and ends those whose predictions are
all final. Everything is derived from rows, so a restart of every process loses nothing: a fed prediction is an
ordinary prediction (the sweeper requeues it in its class), an unfed line is still unfed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import Connection, Engine, exists, func, insert, literal, select, update

from core import lifecycle, quota
from core.ids import new_id
from core.lifecycle import Status
from core.queue import BATCH_PRIORITY, kick_webhooks, model_queue, queued_key, task_message
from core.settings import Settings
from core.tables import batch_requests as r
from core.tables import batches as b
from core.tables import files, webhook_deliveries
from core.tables import predictions as p

log = logging.getLogger(__name__)
FEED_LOCK = 0xBA7C4  # pg_advisory_xact_lock: one feeder at a time, so that the depth holds
OPEN = ("in_progress", "cancelling")
BATCH_EVENT = "batch"  # the webhook delivery of a native batch's end (its snapshot is the payload)
WINDOWS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_s(window: str) -> int | None:
    """Seconds of a completion window such as `24h` (also s, m, d); None if it is not one."""
    number, unit = window[:-1], window[-1:]
    if unit not in WINDOWS or not number.isdigit() or len(number) > 6:
        return None
    return int(number) * WINDOWS[unit]


@dataclass(frozen=True)
class Fed:
    prediction_id: str
    tenant_id: str
    model: str
    priority: int


@dataclass
class Ended:
    """What a tick changed that Redis must hear of (`announce`)."""

    fed: list[Fed]
    canceled: list[tuple[str, str]]  # (prediction id, tenant id) of queued predictions of expired batches
    webhooks: list[str]  # predictions whose batch's `batch` delivery was written

    def __bool__(self) -> bool:
        return bool(self.fed or self.canceled or self.webhooks)


def feed(conn: Connection, settings: Settings) -> list[Fed]:
    """Make predictions of waiting lines, up to the depth, fairly among tenants; the caller commits and then
    pushes them (`push`)."""
    conn.execute(select(func.pg_advisory_xact_lock(FEED_LOCK)))
    queued = conn.execute(select(func.count()).where(p.c.batch_id.is_not(None), p.c.status == Status.CREATED))
    room = settings.batch_feed_depth - queued.scalar_one()
    if room <= 0:
        return []
    unfed = exists().where(r.c.batch_id == b.c.id, r.c.prediction_id.is_(None), r.c.error.is_(None))
    open_batches = conn.execute(
        select(b.c.id, b.c.tenant_id, b.c.api_key_id, b.c.expires_at)
        .where(b.c.status == "in_progress", b.c.expired_at.is_(None), b.c.expires_at > func.now(), unfed)
        .order_by(b.c.created_at)
    ).all()
    if not open_batches:
        return []
    running: dict[str, int] = dict(
        conn.execute(
            select(p.c.tenant_id, func.count())
            .where(p.c.batch_id.is_not(None), p.c.status.in_([Status.CREATED, Status.PROCESSING]))
            .group_by(p.c.tenant_id)
        )
        .tuples()
        .all()
    )
    oldest: dict[str, Any] = {}  # each tenant's oldest open batch
    for batch in open_batches:
        oldest.setdefault(batch.tenant_id, batch)
    planned: dict[str, int] = {}
    for _ in range(room):  # one at a time to the tenant with the fewest in flight; ties: the oldest batch
        tenant = min(oldest, key=lambda t: running.get(t, 0))
        running[tenant] = running.get(tenant, 0) + 1
        planned[oldest[tenant].id] = planned.get(oldest[tenant].id, 0) + 1
    now = conn.execute(select(func.now())).scalar_one()
    fed: list[Fed] = []
    for batch in open_batches:
        if batch.id not in planned:
            continue
        lines = conn.execute(
            select(r.c.line, r.c.model, r.c.input, r.c.params)
            .where(r.c.batch_id == batch.id, r.c.prediction_id.is_(None), r.c.error.is_(None))
            .order_by(r.c.line)
            .limit(planned[batch.id])
            .with_for_update(skip_locked=True)
        ).all()
        urgent = batch.expires_at - now < timedelta(seconds=settings.batch_urgent_s)
        priority = quota.LOWEST_PRIORITY if urgent else BATCH_PRIORITY
        for line in lines:
            prediction_id = new_id()
            conn.execute(
                insert(p).values(
                    id=prediction_id,
                    tenant_id=batch.tenant_id,
                    api_key_id=batch.api_key_id,
                    model=line.model,
                    input=line.input,
                    params=line.params,
                    status=Status.CREATED,
                    priority=priority,
                    batch_id=batch.id,
                )
            )
            conn.execute(
                update(r).where(r.c.batch_id == batch.id, r.c.line == line.line).values(prediction_id=prediction_id)
            )
            fed.append(Fed(prediction_id, batch.tenant_id, line.model, priority))
    return fed


def push(pipe: Any, settings: Settings, fed: list[Fed]) -> None:
    """The fed predictions' messages, marks for the sweeper and in-flight slots (a worker's finish gives each
    back). `pipe`: a redis-py pipeline, sync or async, that the caller executes."""
    for one in fed:
        key, message = task_message(model_queue(settings.queue_name, one.model), one.prediction_id, one.priority)
        pipe.sadd(queued_key(settings), one.prediction_id)
        pipe.lpush(key, message)
        pipe.incr(quota.in_flight_key(settings.queue_name, one.tenant_id))


def queued_of(batch_ids: list[str]) -> Any:
    """The queued (not started) predictions of these batches: what a cancel or an expiry stops."""
    return select(p.c.id, p.c.tenant_id).where(p.c.batch_id.in_(batch_ids), p.c.status == Status.CREATED)


def expire(conn: Connection) -> list[tuple[str, str]]:
    """Batches past their window: marked expired (their unfed lines never run) and their queued predictions
    canceled; the running ones finish. Returns the canceled predictions (id, tenant)."""
    conn.execute(select(func.pg_advisory_xact_lock(FEED_LOCK)))  # no feed of these between the mark and the cancel
    due = (
        select(b.c.id)
        .where(b.c.status == "in_progress", b.c.expired_at.is_(None), b.c.expires_at <= func.now())
        .with_for_update(skip_locked=True)
    )
    expired = conn.execute(
        update(b).where(b.c.id.in_(due.scalar_subquery())).values(expired_at=func.now()).returning(b.c.id)
    )
    ids = list(expired.scalars())
    return cancel_queued(conn, ids) if ids else []


def cancel_queued(conn: Connection, batch_ids: list[str]) -> list[tuple[str, str]]:
    canceled = []
    for prediction_id, tenant_id in conn.execute(queued_of(batch_ids)).all():
        row = conn.execute(lifecycle.cancel(prediction_id, tenant_id)).first()
        if row is not None:
            canceled.append((prediction_id, tenant_id))
    return canceled


def counts(batch_id: str) -> Any:
    """(completed, failed) of a batch now: failed counts refused lines and predictions that failed or were
    canceled, and, once it ended cancelled or expired, the lines that never ran."""
    finished = (
        select(
            func.count().filter(p.c.status == Status.COMPLETED).label("completed"),
            func.count().filter(p.c.status.in_([Status.FAILED, Status.CANCELED])).label("failed"),
        )
        .where(p.c.batch_id == batch_id)
        .subquery()
    )
    refused = select(func.count()).where(r.c.batch_id == batch_id, r.c.error.is_not(None)).scalar_subquery()
    return select(finished.c.completed, finished.c.failed + refused)


def finalize(conn: Connection, settings: Settings, batch_id: str | None = None) -> list[str]:
    """End the open batches (or only `batch_id`) with nothing left to run: completed, cancelled or expired, with
    their request counts, output and error files (rendered from the rows when downloaded) and, for a native batch
    with a webhook, its delivery. Returns the predictions whose deliveries were written, to kick."""
    unfed = exists().where(r.c.batch_id == b.c.id, r.c.prediction_id.is_(None), r.c.error.is_(None))
    running = exists().where(p.c.batch_id == b.c.id, p.c.status.in_([Status.CREATED, Status.PROCESSING]))
    stopped = b.c.status == "cancelling"
    ready = select(b).where(b.c.status.in_(OPEN), ~running, stopped | b.c.expired_at.is_not(None) | ~unfed)
    if batch_id is not None:
        ready = ready.where(b.c.id == batch_id)
    kicks = []
    for batch in conn.execute(ready.with_for_update(of=b, skip_locked=True)).mappings().all():
        completed, failed = conn.execute(counts(batch["id"])).one()
        failed = batch["total"] - completed  # lines never run (cancelled, expired) failed too
        status = "cancelled" if batch["status"] == "cancelling" else "expired" if batch["expired_at"] else "completed"
        output_id = _result_file(conn, settings, batch, "output") if completed else None
        error_id = _result_file(conn, settings, batch, "error") if failed else None
        ended = (
            conn.execute(
                update(b)
                .where(b.c.id == batch["id"], b.c.status.in_(OPEN))
                .values(
                    status=status,
                    completed=completed,
                    failed=failed,
                    output_file_id=output_id,
                    error_file_id=error_id,
                    finished_at=func.now(),
                )
                .returning(b)
            )
            .mappings()
            .one()
        )
        log.info("batch %s %s: %d completed, %d failed", batch["id"], status, completed, failed)
        if ended["webhook"] is not None and (anchor := _anchor(conn, batch["id"])) is not None:
            conn.execute(
                insert(webhook_deliveries).values(
                    id=new_id(),
                    tenant_id=ended["tenant_id"],
                    prediction_id=anchor,
                    event=BATCH_EVENT,
                    url=ended["webhook"]["url"],
                    snapshot=batch_object(dict(ended), (completed, failed), ended["webhook"].get("base_url")),
                )
            )
            kicks.append(anchor)
    return kicks


def _anchor(conn: Connection, batch_id: str) -> str | None:
    """The prediction a batch's delivery hangs on in the outbox (keyed by prediction): its first one; None if
    none of its lines ever ran (then there is no delivery)."""
    first = select(p.c.id).where(p.c.batch_id == batch_id).order_by(p.c.created_at, p.c.id).limit(1)
    return conn.execute(first).scalar()


def _result_file(conn: Connection, settings: Settings, batch: Any, kind: str) -> str:
    file_id = new_id()
    conn.execute(
        insert(files).values(
            id=file_id,
            tenant_id=batch["tenant_id"],
            key="",  # nothing stored: rendered from the batch's rows on download (fresh links, current state)
            content_type="application/jsonl",
            bytes=0,
            purpose="batch_output",
            filename=f"batch_{batch['id']}_{kind}.jsonl",
            batch_id=batch["id"],
            expires_at=func.now() + timedelta(seconds=settings.upload_ttl_s),
        )
    )
    return file_id


def tick(engine: Engine, client: redis.Redis, settings: Settings, batch_id: str | None = None) -> Ended:
    """Expire, feed, end: the sweeper's pass (all batches) and a worker's after a batch prediction (`batch_id`:
    only that batch is checked for its end). Never raises: a failed tick is the next one's work."""
    ended = Ended([], [], [])
    try:
        if batch_id is None:
            with engine.begin() as conn:
                ended.canceled = expire(conn)
        with engine.begin() as conn:
            ended.fed = feed(conn, settings)
        with engine.begin() as conn:
            ended.webhooks = finalize(conn, settings, batch_id)
        if ended:
            pipe = client.pipeline(transaction=False)
            announce(pipe, settings, ended)
            pipe.execute()
    except Exception:
        log.warning("batch tick failed; the sweeper's next pass retries it", exc_info=True)
    return ended


def announce(pipe: Any, settings: Settings, ended: Ended) -> None:
    """What Redis must hear of a tick: fed predictions pushed, canceled ones' slots and marks released, webhook
    deliveries kicked."""
    push(pipe, settings, ended.fed)
    for prediction_id, tenant_id in ended.canceled:
        pipe.srem(queued_key(settings), prediction_id)
        pipe.eval(quota.RELEASE_SLOT_LUA, 1, quota.in_flight_key(settings.queue_name, tenant_id))
        pipe.publish(settings.events_channel, prediction_id)
    for prediction_id in ended.webhooks:
        kick_webhooks(pipe, settings, prediction_id)


def _epoch(value: datetime | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return int(value.astimezone(UTC).timestamp())


def batch_object(row: dict[str, Any], done: tuple[int, int], base_url: str | None = None) -> dict[str, Any]:
    """A batch as OpenAI's Batch API shows it (openai.types.Batch); a native batch also links its files' content
    (`base_url`: where the API answers). `done`: (completed, failed) now."""
    status, finished = row["status"], _epoch(row["finished_at"])
    ended = status in ("completed", "cancelled", "expired", "failed")
    body: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": status,
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": _epoch(row["created_at"]),
        "in_progress_at": _epoch(row["created_at"]),
        "expires_at": _epoch(row["expires_at"]),
        "finalizing_at": finished if ended else None,
        "completed_at": finished if status == "completed" else None,
        "failed_at": finished if status == "failed" else None,
        "expired_at": _epoch(row["expired_at"]) if status == "expired" else None,
        "cancelling_at": _epoch(row["cancelling_at"]),
        "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": {"total": row["total"], "completed": done[0], "failed": done[1]},
        "metadata": row["metadata"],
    }
    if row["dialect"] == "pruna" and base_url is not None:
        for kind in ("output", "error"):
            file_id = row[f"{kind}_file_id"]
            body[f"{kind}_url"] = f"{base_url}/v1/files/{file_id}/content" if file_id else None
    return body


def open_count(tenant_id: str) -> Any:
    """How many of the tenant's batches have not ended (bounded by `batch_max_in_flight`)."""
    return select(func.count()).where(b.c.tenant_id == tenant_id, b.c.status.in_(OPEN))


def with_lock(tenant_id: str) -> Any:
    """The tenant's batch creations, one at a time (so that two cannot both squeeze under the bound)."""
    return select(func.pg_advisory_xact_lock(literal(FEED_LOCK + 1), func.hashtext(tenant_id)))
