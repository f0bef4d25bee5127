"""The sweeper: nothing accepted is lost, nothing stays stuck.

Every `sweep_interval_s`, one sweeper at a time (a Redis lock; every worker process runs one):
1. Predictions whose worker's lease lapsed (the worker died) go back to the queue while attempts
   are left, else fail with the reason.
2. Queued predictions past their start deadline (core/deadlines.py) are canceled, "deadline exceeded": never
   run, never billed, even while no worker takes anything from the queue.
3. Predictions `created` for longer than `requeue_grace_s` that are not in the broker — Redis lost
   them (restart without persistence) or the API died between its commit and the enqueue — are
   enqueued again. The API adds each id to a Redis set as it enqueues; it leaves the set only once a
   worker has taken its message (core.queue.queued_key), so for a `created` row "not in the set" means
   "not in the broker". A pass checks the rows that
   came due since the previous one; every `FULL_CHECK_EVERY_S`, and after Redis lost its data, all.
4. Each tenant's in-flight counter is reconciled with its rows in PostgreSQL (after a stalled or lost
   Redis answer, or data Redis lost).
5. With storage given, every `REAP_EVERY_S` the retention reaper runs (core/retention.py): expired
   predictions' objects and expired uploads are deleted.
5. Batch jobs (core/batches.py): batches past their window expire, idle GPUs are fed, finished batches end.
Re-enqueueing is always safe: a worker's claim is a compare-and-set, so duplicates do nothing.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

import redis
from sqlalchemy import Engine, func, select

from core import batches, lifecycle, quota, retention
from core.lifecycle import Status
from core.queue import enqueue, kick_webhooks, queued_key
from core.settings import Settings
from core.tables import predictions as p
from core.tables import tenants

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
LOST_CHECK_PAGE = 1000  # ids asked of Redis at a time
FULL_CHECK_EVERY_S = 300.0  # between full checks, a pass looks only at what came due since the last one
REAP_EVERY_S = 60.0  # between retention passes of one sweeper


@dataclass
class SweepReport:
    requeued_lapsed: int = 0
    failed_lapsed: int = 0
    requeued_lost: int = 0
    deadline_canceled: int = 0
    counters_reconciled: int = 0
    expired_predictions: int = 0
    deleted_files: int = 0
    deleted_loras: int = 0
    retention: str = ""  # the retention pass: "" (not due, or no storage), "ok", "failed"
    seconds: float = 0.0


@dataclass
class Sweeper:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    s3: S3Client | None = None  # without it, no retention passes
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    reaped_at: float = float("-inf")  # time.monotonic() of the last retention pass

    def sweep(self) -> SweepReport | None:
        """One pass, if no other sweeper holds the lock; None when another one does."""
        lock = f"{self.settings.queue_name}:sweeper-lock"
        # Held a few intervals at most, so a sweeper that died holding it delays the next one only briefly.
        ttl_ms = int(max(self.settings.sweep_interval_s * 3, 5) * 1000)
        if not self.redis.set(lock, self.token, nx=True, px=ttl_ms):
            return None
        started = time.perf_counter()
        try:
            report = SweepReport()
            self._reconcile_counters(report)
            self._lapsed(report)
            self._deadlines(report)  # before _lost: what it cancels needs no enqueue
            self._lost(report)
            batches.tick(self.engine, self.redis, self.settings)
            self._reap(report)
            report.seconds = time.perf_counter() - started
            return report
        finally:
            if self.redis.get(lock) == self.token.encode():
                self.redis.delete(lock)

    def _reap(self, report: SweepReport) -> None:
        """A retention pass, at most every REAP_EVERY_S; its failure (storage down) fails nothing else."""
        if self.s3 is None or time.monotonic() - self.reaped_at < REAP_EVERY_S:
            return
        self.reaped_at = time.monotonic()
        try:
            reaped = retention.reap(self.settings, self.engine, self.s3)
        except Exception:
            log.warning("retention pass failed; retrying in %.0f s", REAP_EVERY_S, exc_info=True)
            report.retention = "failed"
            return
        report.retention = "ok"
        report.expired_predictions, report.deleted_files, report.deleted_loras = (
            reaped.predictions,
            reaped.files,
            reaped.loras,
        )

    def _lapsed(self, report: SweepReport) -> None:
        with self.engine.connect() as conn:
            lapsed = conn.execute(
                select(p.c.id, p.c.attempts, p.c.model, p.c.priority, p.c.batch_id).where(
                    p.c.status == Status.PROCESSING, p.c.lease_expires_at < func.now()
                )
            ).all()
        for prediction_id, attempts, model, priority, batch_id in lapsed:
            if attempts >= self.settings.max_attempts:
                error = f"the worker was lost {attempts} times while running this prediction; giving up"
                with self.engine.begin() as conn:
                    row = conn.execute(lifecycle.give_up(prediction_id, error)).first()
                if row is not None:
                    self._release_slot(row.tenant_id)
                    self.redis.srem(queued_key(self.settings), prediction_id)  # its worker died before doing so
                    self.redis.publish(self.settings.events_channel, prediction_id)
                    report.failed_lapsed += 1
                continue
            with self.engine.begin() as conn:
                row = conn.execute(lifecycle.requeue_lapsed(prediction_id)).first()
            if row is not None:
                self._enqueue(prediction_id, model, priority if batch_id else 0)
                report.requeued_lapsed += 1

    def _lost(self, report: SweepReport) -> None:
        """Check the `created` rows that came due since the last pass (all of them every FULL_CHECK_EVERY_S,
        and whenever Redis lost the sweeper's state with its data): each pass costs what arrived, not the
        whole backlog (docs/performance.md, figure 5)."""
        grace = timedelta(seconds=self.settings.requeue_grace_s)
        state = f"{self.settings.queue_name}:sweeper-checked"
        checked = {str(k, "ascii"): float(v) for k, v in cast(dict[bytes, bytes], self.redis.hgetall(state)).items()}
        with self.engine.connect() as conn:
            due = conn.execute(select(func.now() - grace)).scalar_one()  # the database's clock, as created_at's
            query = select(p.c.id, p.c.model, p.c.priority, p.c.batch_id).where(
                p.c.status == Status.CREATED, p.c.created_at < due
            )
            full = "to" not in checked or due.timestamp() - checked.get("full", 0.0) >= FULL_CHECK_EVERY_S
            if not full:  # from one grace period before the last boundary: a slow commit is still seen
                query = query.where(p.c.created_at >= datetime.fromtimestamp(checked["to"], UTC) - grace)
            waiting = {row.id: row for row in conn.execute(query)}
        # In pages: one SMISMEMBER of a deep backlog's 100,000 ids would hold Redis, and every API request
        # behind it, for tens of milliseconds (docs/performance.md, figure 5).
        ids = list(waiting)
        for start in range(0, len(ids), LOST_CHECK_PAGE):
            page = ids[start : start + LOST_CHECK_PAGE]
            in_broker = self.redis.smismember(queued_key(self.settings), page)
            for prediction_id, queued in zip(page, in_broker, strict=True):
                if not queued:
                    row = waiting[prediction_id]
                    self._enqueue(prediction_id, row.model, row.priority if row.batch_id else 0)
                    report.requeued_lost += 1
        self.redis.hset(state, "to", due.timestamp())
        if full:
            self.redis.hset(state, "full", due.timestamp())

    def _deadlines(self, report: SweepReport) -> None:
        """Cancel the queued predictions whose start deadline passed, a page at a time; each announced as a cancel
        (the tenant's slot back, out of the queued set, the event, its webhook's sending)."""
        while True:
            with self.engine.begin() as conn:
                expired = conn.execute(lifecycle.expire_unstarted(limit=LOST_CHECK_PAGE)).all()
            if expired:
                pipe = self.redis.pipeline(transaction=False)
                for row in expired:
                    pipe.eval(quota.RELEASE_SLOT_LUA, 1, quota.in_flight_key(self.settings.queue_name, row.tenant_id))
                    pipe.srem(queued_key(self.settings), row.id)
                    pipe.publish(self.settings.events_channel, row.id)
                    if row.webhook is not None:
                        kick_webhooks(pipe, self.settings, row.id)
                pipe.execute()
                report.deadline_canceled += len(expired)
            if len(expired) < LOST_CHECK_PAGE:
                return

    def _reconcile_counters(self, report: SweepReport) -> None:
        """Set each tenant's in-flight counter to its `created` + `processing` rows where the two disagree: a
        submit whose answer Redis never sent (a stall, a dropped connection) or data Redis lost. The counter is
        read before the rows are counted and set only if it is still what was read, so a slot taken or given
        back meanwhile is not overwritten; a submit between its slot and its insert at that instant can put it
        one off until the next pass."""
        namespace = self.settings.queue_name
        with self.engine.connect() as conn:
            tenant_ids = conn.execute(select(tenants.c.id)).scalars().all()
            if not tenant_ids:
                return
            keys = [quota.in_flight_key(namespace, tenant_id) for tenant_id in tenant_ids]
            before = cast(list[bytes | None], self.redis.mget(keys))
            counts: dict[str, int] = dict(
                conn.execute(
                    select(p.c.tenant_id, func.count())
                    .where(p.c.status.in_([Status.CREATED, Status.PROCESSING]))
                    .group_by(p.c.tenant_id)
                ).all()
            )
        for tenant_id, key, held in zip(tenant_ids, keys, before, strict=True):
            read, count = int(held or 0), counts.get(tenant_id, 0)
            if read != count and self.redis.eval(quota.RECONCILE_SLOTS_LUA, 1, key, str(read), count):
                log.warning(
                    "in-flight counter of tenant %s was %d, its rows say %d: reconciled", tenant_id, read, count
                )
                report.counters_reconciled += 1

    def _enqueue(self, prediction_id: str, model: str, priority: int = 0) -> None:
        """Interactive work has waited longest: first in line (0). A batch's stays in its class (core/batches.py)."""
        enqueue(self.redis, self.settings, prediction_id, model, priority=priority)

    def _release_slot(self, tenant_id: str) -> None:
        self.redis.eval(quota.RELEASE_SLOT_LUA, 1, quota.in_flight_key(self.settings.queue_name, tenant_id))


Observer = Callable[[str, SweepReport | None, float], None]


def run_forever(sweeper: Sweeper, stop: threading.Event, observe: Observer | None = None) -> None:
    """The worker's sweeper thread: survives database and Redis outages, logs what it did. `observe` hears of each
    pass: its outcome ("swept", "skipped": another sweeper held the lock, "failed"), its report and how many
    seconds late it started against its schedule (one interval after the previous pass ended)."""
    interval = sweeper.settings.sweep_interval_s
    due = time.monotonic() + interval
    while not stop.wait(max(due - time.monotonic(), 0.0)):
        lag = time.monotonic() - due
        try:
            report = sweeper.sweep()
            outcome = "skipped" if report is None else "swept"
        except Exception:
            log.warning("sweep failed; retrying in %.0f s", interval, exc_info=True)
            report, outcome = None, "failed"
        due = time.monotonic() + interval
        if observe is not None:
            observe(outcome, report, lag)
        if report and any(
            (
                report.requeued_lapsed,
                report.failed_lapsed,
                report.requeued_lost,
                report.deadline_canceled,
                report.counters_reconciled,
                report.expired_predictions,
                report.deleted_files,
                report.deleted_loras,
            )
        ):
            log.info("sweep: %s", report)
