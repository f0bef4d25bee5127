"""The platform's state as operators read it (the API's /metrics and the console's `GET /admin/v1/queue`): per
served model, the broker's depth and the oldest wait per priority and its live and draining GPU workers; the
webhook backlog; per tenant on request (a row per tenant). The GPU workers one by one: `workers`."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text

from core import progress, workers
from core.lifecycle import Status
from core.queue import PRIORITY_STEPS, list_key, model_queue
from core.tables import predictions as p
from core.tables import usage_records as u
from core.tables import webhook_deliveries as d
from core.webhooks import receiver

if TYPE_CHECKING:
    from api.context import AppContext

_OLDEST_QUEUED = (
    select(p.c.model, p.c.priority, func.extract("epoch", func.now() - func.min(p.c.created_at)))
    .where(p.c.status == Status.CREATED)
    .group_by(p.c.model, p.c.priority)
)
_RECEIVER = receiver(d.c.url)
_BACKLOG = (
    select(_RECEIVER, func.count(), func.extract("epoch", func.now() - func.min(d.c.created_at)))
    .where(d.c.status.in_(("pending", "sending")))
    .group_by(_RECEIVER)
)
OTHER_RECEIVERS = "other"  # the backlog of every receiver beyond the top N, as one
_IN_FLIGHT = (
    select(p.c.tenant_id, func.count())
    .where(p.c.status.in_((Status.CREATED, Status.PROCESSING)))
    .group_by(p.c.tenant_id)
)
_IMAGES_24H = (
    select(u.c.tenant_id, func.sum(u.c.images))
    .where(u.c.created_at > func.now() - text("interval '24 hours'"))
    .group_by(u.c.tenant_id)
)


@dataclass
class ModelQueue:
    depth: dict[int, int]  # messages in the broker, by priority
    oldest_age_s: dict[int, float]  # the oldest queued prediction's wait, by priority (0: none)
    live_workers: int  # announced lately and not draining
    draining_workers: int

    def view(self) -> dict[str, Any]:
        return {
            "depth": {str(k): v for k, v in self.depth.items()},
            "oldest_age_s": {str(k): round(v, 3) for k, v in self.oldest_age_s.items()},
            "live_workers": self.live_workers,
            "draining_workers": self.draining_workers,
        }


@dataclass
class Fleet:
    models: dict[str, ModelQueue]  # by served model
    webhook_backlog: dict[str, int]  # deliveries pending or being sent, by receiver host (top N, then "other")
    webhook_oldest_age_s: dict[str, float]  # the oldest undelivered event's age, by receiver as above
    in_flight: dict[str, int] = field(default_factory=dict)  # per tenant, when asked
    images_24h: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        """Every model together (depths and workers summed, the oldest wait), then each model."""
        queues = self.models.values()
        return {
            "depth": {str(k): sum(q.depth[k] for q in queues) for k in PRIORITY_STEPS},
            "oldest_age_s": {str(k): round(max(q.oldest_age_s[k] for q in queues), 3) for k in PRIORITY_STEPS},
            "live_workers": sum(q.live_workers for q in queues),
            "draining_workers": sum(q.draining_workers for q in queues),
            "webhook_backlog": sum(self.webhook_backlog.values()),
            "webhook_oldest_age_s": round(max(self.webhook_oldest_age_s.values(), default=0.0), 3),
            "webhook_receivers": [
                {"receiver": name, "backlog": count, "oldest_age_s": round(self.webhook_oldest_age_s[name], 3)}
                for name, count in self.webhook_backlog.items()
            ],
            "models": {model: queue.view() for model, queue in self.models.items()},
        }


async def read(ctx: AppContext, per_tenant: bool = False) -> Fleet:
    settings = ctx.settings
    models = settings.served_models
    since = time.time() - settings.live_worker_s
    async with ctx.redis.pipeline(transaction=False) as pipe:  # every served model's queue and workers
        for model in models:
            for priority in PRIORITY_STEPS:
                pipe.llen(list_key(model_queue(settings.queue_name, model), priority))
            pipe.zcount(progress.workers_key(settings, model), since, "+inf")
            pipe.zcount(workers.draining_key(settings, model), since, "+inf")
        answers = [int(answer) for answer in await pipe.execute()]
    per_model = len(PRIORITY_STEPS) + 2
    async with ctx.engine.connect() as conn:
        ages = {(model, int(priority)): float(age) for model, priority, age in await conn.execute(_OLDEST_QUEUED)}
        backlog, backlog_age = _by_receiver(await conn.execute(_BACKLOG), settings.metrics_webhook_receivers)
        queues = {}
        for m, model in enumerate(models):
            *depths, live, draining = answers[m * per_model : (m + 1) * per_model]
            queues[model] = ModelQueue(
                depth=dict(zip(PRIORITY_STEPS, depths, strict=True)),
                oldest_age_s={priority: ages.get((model, priority), 0.0) for priority in PRIORITY_STEPS},
                live_workers=live,
                draining_workers=draining,
            )
        fleet = Fleet(models=queues, webhook_backlog=backlog, webhook_oldest_age_s=backlog_age)
        if per_tenant:
            fleet.in_flight = {tenant: int(count) for tenant, count in await conn.execute(_IN_FLIGHT)}
            fleet.images_24h = {tenant: float(total) for tenant, total in await conn.execute(_IMAGES_24H)}
    return fleet


async def worker_list(ctx: AppContext) -> list[workers.Worker]:
    """The GPU workers heard of lately (core/workers.py); the entries of those long gone are dropped."""
    found, forgotten = workers.read(await ctx.redis.hgetall(workers.registry_key(ctx.settings)))
    if forgotten:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            workers.forget(pipe, ctx.settings, forgotten)
            await pipe.execute()
    return found


def _by_receiver(rows: Iterable[Any], top: int) -> tuple[dict[str, int], dict[str, float]]:
    """The `top` receivers with the most deliveries waiting by name, the rest summed as "other" (always present,
    0 when nothing waits: the series stays, and its alerts resolve): a bounded label whatever the tenants send."""
    ranked = sorted(((str(name or ""), int(count), float(age)) for name, count, age in rows), key=lambda r: -r[1])
    backlog, ages = {OTHER_RECEIVERS: 0}, {OTHER_RECEIVERS: 0.0}
    for rank, (name, count, age) in enumerate(ranked):
        shown = name if rank < top and name not in ("", OTHER_RECEIVERS) else OTHER_RECEIVERS
        backlog[shown] = backlog.get(shown, 0) + count
        ages[shown] = max(ages.get(shown, 0.0), age)
    return backlog, ages
