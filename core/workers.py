"""The GPU workers as the platform knows them, in Redis: each worker process announces itself with its heartbeat
(every ~2 s, worker/leases.py): its model, its Celery node name, busy or idle, and whether it is draining.

- `<model queue>:workers` (core/progress.py): the model's live workers by last announcement, counted for queue
  ETAs and `klein_live_workers`; a draining worker leaves it for `<model queue>:draining`.
- `<queue>:worker-registry`: one entry per worker (JSON), read by `GET /admin/v1/workers` and `klein workers`.
- `<queue>:drain`: the workers an operator drained (`mark_draining`, `stop_consuming`). A drained worker stops
  consuming its model's queue (Celery's `cancel_consumer`, sent to its node), finishes what it holds, and hands
  back any message it still receives (worker/app.py); it stays draining until it exits.

Entries of a worker not heard of for `FORGET_S` are dropped by the next reader.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
import redis

from core.progress import LIVE_WORKER_S, workers_key
from core.queue import model_queue, publisher
from core.settings import Settings

FORGET_S = 10 * LIVE_WORKER_S
State = Literal["idle", "busy", "draining", "lost"]  # lost: no announcement for LIVE_WORKER_S


def registry_key(settings: Settings) -> str:
    return f"{settings.queue_name}:worker-registry"


def drain_key(settings: Settings) -> str:
    return f"{settings.queue_name}:drain"


def draining_key(settings: Settings, model: str) -> str:
    """The model's draining workers by last announcement (`klein_draining_workers`)."""
    return f"{model_queue(settings.queue_name, model)}:draining"


@dataclass
class Worker:
    worker: str  # the worker's id, as its log lines and the predictions it ran name it
    node: str  # its Celery node name (`celery inspect`, `celery control ... -d NODE`)
    model: str
    queue: str  # the model's queue, which it consumes
    state: State
    busy: bool  # running predictions now (a draining worker may still be)
    seen: float  # its last announcement, seconds since the epoch

    def view(self) -> dict[str, Any]:
        return asdict(self) | {"seen_s_ago": round(max(time.time() - self.seen, 0.0), 1)}


def announce(client: redis.Redis, settings: Settings, worker_id: str, node: str, busy: bool) -> bool:
    """The worker serving settings.model_id is alive, busy or not; whether it is to drain (the answer)."""
    draining = bool(client.hexists(drain_key(settings), worker_id))
    now, model = time.time(), settings.model_id
    state: State = "draining" if draining else "busy" if busy else "idle"
    entry = Worker(worker_id, node, model, model_queue(settings.queue_name, model), state, busy, now)
    counted, other = workers_key(settings, model), draining_key(settings, model)
    if draining:
        counted, other = other, counted
    pipe = client.pipeline(transaction=False)
    pipe.zadd(counted, {worker_id: now})
    pipe.zrem(other, worker_id)
    pipe.hset(registry_key(settings), worker_id, orjson.dumps(asdict(entry)))
    for key in (counted, other):
        pipe.zremrangebyscore(key, "-inf", now - FORGET_S)
    pipe.execute()
    return draining


def read(entries: Mapping[Any, Any], now: float | None = None) -> tuple[list[Worker], list[Any]]:
    """The registry's entries (HGETALL) as workers heard of within FORGET_S, by model and node, and the ids of the
    older ones, for the reader to drop (`forget`)."""
    now = time.time() if now is None else now
    found, forgotten = [], []
    for worker_id, raw in entries.items():
        entry = Worker(**orjson.loads(raw))
        if now - entry.seen > FORGET_S:
            forgotten.append(worker_id)
            continue
        if now - entry.seen > LIVE_WORKER_S:
            entry.state = "lost"
        found.append(entry)
    return sorted(found, key=lambda entry: (entry.model, entry.node, entry.worker)), forgotten


def forget(pipe: Any, settings: Settings, worker_ids: list[Any]) -> None:
    """Queue on `pipe` (a redis-py pipeline, sync or async) the removal of these workers' entries."""
    pipe.hdel(registry_key(settings), *worker_ids)
    pipe.hdel(drain_key(settings), *worker_ids)


def named(workers: list[Worker], name: str) -> Worker | None:
    """The worker with this node name (as `celery inspect` shows it) or id; the latest heard of, if several."""
    matches = [entry for entry in workers if name in (entry.node, entry.worker)]
    return max(matches, key=lambda entry: entry.seen) if matches else None


def mark_draining(pipe: Any, settings: Settings, worker: Worker) -> None:
    """Queue on `pipe` the drain mark: the worker's next announcement says it is draining, and until its node has
    stopped consuming (`stop_consuming`; a worker running a prediction reads Celery's commands only once that run
    ends) the mark makes it hand back any message it receives (worker/app.py)."""
    pipe.hset(drain_key(settings), worker.worker, time.time())


def stop_consuming(settings: Settings, queue: str, node: str) -> None:
    """Celery's `cancel_consumer` of `queue` (a worker's model queue), sent to its node; no reply awaited: a busy
    solo-pool worker reads it only after its run."""
    if node:
        publisher(settings).control.cancel_consumer(queue, destination=[node], reply=False)
