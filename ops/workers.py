"""`klein workers` and `klein drain-worker NAME`: the GPU workers as they announce themselves, and a drain, through
Redis and Celery's remote control directly (the same as `GET /admin/v1/workers` and its drain: core/workers.py)."""

from __future__ import annotations

import json

from core import workers
from core.redis_connection import sync_client
from core.settings import get_settings


def list_workers() -> int:
    settings = get_settings()
    client = sync_client(settings)
    found, forgotten = workers.read(client.hgetall(workers.registry_key(settings)))
    if forgotten:
        pipe = client.pipeline(transaction=False)
        workers.forget(pipe, settings, forgotten)
        pipe.execute()
    print(json.dumps([worker.view() for worker in found], indent=2))
    return 0


def drain(name: str) -> int:
    settings = get_settings()
    client = sync_client(settings)
    worker = workers.named(workers.read(client.hgetall(workers.registry_key(settings)))[0], name)
    if worker is None:
        raise SystemExit(f"no GPU worker named {name!r} has announced itself lately (klein workers)")
    if worker.state == "lost":
        raise SystemExit(f"worker {name!r} has not announced itself for {worker.view()['seen_s_ago']} s")
    pipe = client.pipeline(transaction=False)
    workers.mark_draining(pipe, settings, worker)
    pipe.execute()
    workers.stop_consuming(settings, worker.queue, worker.node)
    print(f"draining {worker.node or worker.worker}: it finishes what it holds and takes no new predictions")
    return 0
