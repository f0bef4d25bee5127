"""The platform's state as operators read it (the API's /metrics and the console's `GET /admin/v1/queue`):
the broker's depth and the oldest wait per priority, live GPU workers, the webhook backlog; per tenant on
request (a row per tenant)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, text

from core import progress
from core.lifecycle import Status
from core.queue import PRIORITY_STEPS, list_key, model_queue
from core.tables import predictions as p
from core.tables import usage_records as u
from core.tables import webhook_deliveries as d

if TYPE_CHECKING:
    from api.context import AppContext

_OLDEST_QUEUED = (
    select(p.c.priority, func.extract("epoch", func.now() - func.min(p.c.created_at)))
    .where(p.c.status == Status.CREATED)
    .group_by(p.c.priority)
)
_BACKLOG = select(func.count(), func.extract("epoch", func.now() - func.min(d.c.created_at))).where(
    d.c.status.in_(("pending", "sending"))
)
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
class Fleet:
    depth: dict[int, int]  # messages in the broker, by priority
    oldest_age_s: dict[int, float]  # the oldest queued prediction's wait, by priority (0: none)
    live_workers: int
    webhook_backlog: int
    webhook_oldest_age_s: float
    in_flight: dict[str, int] = field(default_factory=dict)  # per tenant, when asked
    images_24h: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {
            "depth": {str(k): v for k, v in self.depth.items()},
            "oldest_age_s": {str(k): round(v, 3) for k, v in self.oldest_age_s.items()},
            "live_workers": self.live_workers,
            "webhook_backlog": self.webhook_backlog,
            "webhook_oldest_age_s": round(self.webhook_oldest_age_s, 3),
        }


async def read(ctx: AppContext, per_tenant: bool = False) -> Fleet:
    settings = ctx.settings
    models = settings.served_models
    async with ctx.redis.pipeline(transaction=False) as pipe:  # every served model's queue and workers, summed
        for model in models:
            for priority in PRIORITY_STEPS:
                pipe.llen(list_key(model_queue(settings.queue_name, model), priority))
        for model in models:
            pipe.zcount(progress.workers_key(settings, model), time.time() - progress.LIVE_WORKER_S, "+inf")
        answers = await pipe.execute()
    queues, live = answers[: -len(models)], answers[-len(models) :]
    depths = [
        sum(int(queues[m * len(PRIORITY_STEPS) + i]) for m in range(len(models))) for i in range(len(PRIORITY_STEPS))
    ]
    workers = sum(int(n) for n in live)
    async with ctx.engine.connect() as conn:
        ages = {int(priority): float(age) for priority, age in await conn.execute(_OLDEST_QUEUED)}
        waiting, age = (await conn.execute(_BACKLOG)).one()
        fleet = Fleet(
            depth=dict(zip(PRIORITY_STEPS, (int(depth) for depth in depths), strict=True)),
            oldest_age_s={priority: ages.get(priority, 0.0) for priority in PRIORITY_STEPS},
            live_workers=int(workers),
            webhook_backlog=int(waiting),
            webhook_oldest_age_s=float(age or 0.0),
        )
        if per_tenant:
            fleet.in_flight = {tenant: int(count) for tenant, count in await conn.execute(_IN_FLIGHT)}
            fleet.images_24h = {tenant: float(total) for tenant, total in await conn.execute(_IMAGES_24H)}
    return fleet
