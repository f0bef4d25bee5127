"""What a status view adds to a prediction's row: `queue_position`, `eta_s` and `live_workers` (0: no worker of
its model is online, it waits for one) while it waits, `progress`,
`eta_s` and `logs` while it runs (from its worker's stream, core/progress.py), `logs` once it is done (kept
with the result).

The queue position counts the predictions that run first: those queued at a better priority, and those at
its own queued before it, from a view of the queue at most a second old that every API replica shares. The ETA
is that work spread over the live workers at the recent time per image.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import bindparam, select

from api.context import AppContext
from api.infra.pg import Statement
from api.infra.rows import Row
from core import progress
from core.lifecycle import Status
from core.queue import model_queue
from core.tables import predictions as p

# One view of each model's queue and pace, shared by every API replica through Redis (a hash that lives VIEW_TTL_S):
# the first replica to find it gone reads it (PostgreSQL: the queue's order at most QUEUE_DEPTH_READ deep; Redis:
# live workers and recent times per image) and offers it; a replica reads the view's stamp on each status read and
# the view itself only when the stamp moved. Snapshots per replica would disagree: a client polling through a load
# balancer saw its position go 1 → 2 and its ETA jump. A status read places its prediction by bisection, without a
# query of its own (docs/performance.md, "Events").
VIEW_TTL_S = 1.0
QUEUE_DEPTH_READ = 5000
_QUEUED = Statement(
    select(p.c.priority, p.c.created_at)
    .where(p.c.status == Status.CREATED, p.c.model == bindparam("model"))
    .order_by(p.c.priority, p.c.created_at)
    .limit(QUEUE_DEPTH_READ)
)
_OFFER = (  # the first offer of a view stands until it expires
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end "
    "redis.call('HSET', KEYS[1], 'stamp', ARGV[1], 'view', ARGV[2]) redis.call('PEXPIRE', KEYS[1], ARGV[3]) return 1"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class View:
    stamp: bytes
    workers: int  # live workers of the model
    per_image_ms: float | None  # the median of their last runs
    queue: list[tuple[int, int]]  # (priority, created_at in µs) of the queued, in the order they run


_views: dict[str, View] = {}  # the last view this process read, per model
_view_lock = asyncio.Lock()


def _view_key(ctx: AppContext, model: str) -> str:
    return f"{model_queue(ctx.settings.queue_name, model)}:view"


async def view(ctx: AppContext, model: str) -> View:
    key = _view_key(ctx, model)
    stamp = cast(bytes | None, await ctx.redis.hget(key, "stamp"))
    known = _views.get(model)
    if stamp is not None and known is not None and known.stamp == stamp:
        return known
    async with _view_lock:  # one read per process however many ask at once
        shared = cast(list[bytes | None], await ctx.redis.hmget(key, ["stamp", "view"]))
        if shared[0] is None or shared[1] is None:
            fresh = await _read(ctx, model)
            offered = orjson.dumps([fresh.workers, fresh.per_image_ms, fresh.queue])
            await ctx.redis.eval(_OFFER, 1, key, fresh.stamp, offered, int(VIEW_TTL_S * 1000))
            shared = cast(list[bytes | None], await ctx.redis.hmget(key, ["stamp", "view"]))
            if shared[0] is None or shared[1] is None:  # expired at once (a stalled process): ours stands alone
                return fresh
        known = _views.get(model)
        if known is None or known.stamp != shared[0]:
            workers, per_image_ms, queue = orjson.loads(cast(bytes, shared[1]))
            known = _views[model] = View(cast(bytes, shared[0]), workers, per_image_ms, [tuple(q) for q in queue])
        return known


async def _read(ctx: AppContext, model: str) -> View:
    rows = await _QUEUED.all(ctx.pg, model=model)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.zcount(progress.workers_key(ctx.settings, model), time.time() - ctx.settings.live_worker_s, "+inf")
        pipe.lrange(progress.recent_key(ctx.settings, model), 0, -1)
        workers, recent = await pipe.execute()
    per_image = statistics.median(int(ms) for ms in recent) if recent else None
    queue = [(r["priority"], _micros(r["created_at"])) for r in rows]
    return View(uuid.uuid4().hex.encode(), int(workers), per_image, queue)


def queued_ahead(shared: View, priority: int, created_at: datetime) -> int:
    """How many queued predictions run before one queued at `priority` and `created_at` (at most the depth read:
    past it, the position is "at least" that). Celery takes its priority lists in order, each first in, first out."""
    return bisect.bisect_left(shared.queue, (priority, _micros(created_at)))


def of_final(row: Row) -> dict[str, Any]:
    """A finished prediction's: no reading needed."""
    return {"logs": row["logs"]}


async def extras(ctx: AppContext, row: Row) -> dict[str, Any]:
    status = Status(row["status"])
    if status.terminal:
        return of_final(row)
    queued = progress.log_line("queued", row["created_at"])
    images = row["params"].get("num_outputs", 1)
    shared = await view(ctx, row["model"])
    workers, per_image_ms = shared.workers, shared.per_image_ms
    if status is Status.CREATED:
        ahead = queued_ahead(shared, row["priority"], row["created_at"])
        eta = None
        if workers and per_image_ms is not None:
            eta = round((ahead // workers + 1) * per_image_ms * images / 1000, 1)
        return {"queue_position": ahead, "eta_s": eta, "live_workers": workers, "logs": [queued]}
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
