"""What a status view adds to a prediction's row: `queue_position` and `eta_s` while it waits, `progress`,
`eta_s` and `logs` while it runs (from its worker's stream, core/progress.py), `logs` once it is done (kept
with the result).

The queue position counts the predictions that run first: those queued at a better priority, and those at
its own queued before it (Celery takes its priority lists in order, each first in, first out), from a
snapshot of the queue's order at most a second old. The ETA is
that work spread over the live workers at the recent time per image.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select

from api.context import AppContext
from api.infra.pg import Statement
from api.infra.rows import Row
from core import progress
from core.lifecycle import Status
from core.queue import model_queue
from core.tables import predictions as p

# The queue's order, read at most every QUEUE_TTL_S per process and at most QUEUE_DEPTH_READ deep: a status
# read then places its prediction by bisection, without a query of its own (a count per read cost each status
# of a queued prediction about a millisecond behind a deep queue: docs/performance.md, "Events").
QUEUE_TTL_S = 1.0
QUEUE_DEPTH_READ = 5000
_QUEUED = Statement(
    select(p.c.priority, p.c.created_at)
    .where(p.c.status == Status.CREATED, p.c.model == bindparam("model"))
    .order_by(p.c.priority, p.c.created_at)
    .limit(QUEUE_DEPTH_READ)
)
_queue: dict[str, tuple[float, list[tuple[int, datetime]]]] = {}  # model's queue → (read at, ordered keys)
_queue_lock = asyncio.Lock()


async def queued_ahead(ctx: AppContext, model: str, priority: int, created_at: datetime) -> int:
    """How many queued predictions of `model` run before one queued at `priority` and `created_at` (at most the
    depth read: past it, the position is "at least" that)."""
    name = model_queue(ctx.settings.queue_name, model)
    cached = _queue.get(name)
    if cached is None or time.monotonic() - cached[0] >= QUEUE_TTL_S:
        async with _queue_lock:  # one read per process however many ask at once
            cached = _queue.get(name)
            if cached is None or time.monotonic() - cached[0] >= QUEUE_TTL_S:
                rows = await _QUEUED.all(ctx.pg, model=model)
                cached = _queue[name] = (time.monotonic(), [(r["priority"], r["created_at"]) for r in rows])
    return bisect.bisect_left(cached[1], (priority, created_at))


PACE_TTL_S = 2.0
_pace: dict[str, tuple[float, int, float | None]] = {}  # queue → (read at, live workers, ms per image)


async def pace(ctx: AppContext, model: str) -> tuple[int, float | None]:
    """(live workers of `model`, median ms per image of their last runs), read at most every PACE_TTL_S per
    process."""
    name = model_queue(ctx.settings.queue_name, model)
    cached = _pace.get(name)
    if cached is not None and time.monotonic() - cached[0] < PACE_TTL_S:
        return cached[1], cached[2]
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.zcount(progress.workers_key(ctx.settings, model), time.time() - progress.LIVE_WORKER_S, "+inf")
        pipe.lrange(progress.recent_key(ctx.settings, model), 0, -1)
        workers, recent = await pipe.execute()
    per_image = statistics.median(int(ms) for ms in recent) if recent else None
    _pace[name] = (time.monotonic(), int(workers), per_image)
    return int(workers), per_image


def of_final(row: Row) -> dict[str, Any]:
    """A finished prediction's: no reading needed."""
    return {"logs": row["logs"]}


async def extras(ctx: AppContext, row: Row) -> dict[str, Any]:
    status = Status(row["status"])
    if status.terminal:
        return of_final(row)
    queued = progress.log_line("queued", row["created_at"])
    images = row["params"].get("num_outputs", 1)
    workers, per_image_ms = await pace(ctx, row["model"])
    if status is Status.CREATED:
        ahead = await queued_ahead(ctx, row["model"], row["priority"], row["created_at"])
        eta = None
        if workers and per_image_ms is not None:
            eta = round((ahead // workers + 1) * per_image_ms * images / 1000, 1)
        return {"queue_position": ahead, "eta_s": eta, "logs": [queued]}
    entries = progress.entries(await ctx.redis.xrange(progress.stream_key(ctx.settings, row["id"])))
    steps = row["params"]["num_inference_steps"]
    done = {"step": 0, "total": steps, "percent": 0}
    logs = [queued]
    for _, kind, data in entries:
        if kind == "progress":
            done = data
        elif kind == "log":
            logs.append(data)
    eta = None if per_image_ms is None else round(per_image_ms * images * (1 - done["percent"] / 100) / 1000, 1)
    return {"progress": done, "eta_s": eta, "logs": logs}
