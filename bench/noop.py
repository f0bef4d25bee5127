"""The floor of figure 2: a bare Celery no-op round trip over the platform's broker.

* `celery -A bench.noop:noop_app worker`, configured by core.queue exactly as the platform's workers are;
* `python -m bench.noop --samples N --out PATH`, its client: send → worker → result, timed one at a time.

Settings come from the environment: KLEIN_REDIS_URL, BENCH_NOOP_QUEUE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from celery import Celery

from core.queue import make_celery
from core.settings import Settings

NOOP_TASK = "bench.noop"


def make_noop_app() -> Celery:
    """The platform's own Celery configuration (core.queue.make_celery: broker options, priorities, solo pool,
    acks late, no prefetch), with a Redis result backend so that the client can await the answer."""
    redis_url = os.environ.get("KLEIN_REDIS_URL", "redis://127.0.0.1:6379/14")
    queue = os.environ.get("BENCH_NOOP_QUEUE", "bench-noop")
    app = make_celery(Settings(redis_url=redis_url, queue_name=queue))
    app.conf.update(result_backend=redis_url, task_ignore_result=False, result_serializer="json", result_expires=600)

    @app.task(name=NOOP_TASK)
    def noop() -> None:
        return None

    return app


noop_app = make_noop_app()


def noop_client(samples: int, warmup: int, out: Path) -> None:
    latencies: list[float] = []
    for i in range(warmup + samples):
        started = time.perf_counter()
        result = noop_app.send_task(NOOP_TASK)
        result.get(timeout=30)
        if i >= warmup:
            latencies.append((time.perf_counter() - started) * 1000)
        result.forget()  # after the clock: the floor is the round trip only
    out.write_text(json.dumps({"latencies_ms": latencies}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.noop", description="time Celery no-op round trips")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    noop_client(args.samples, args.warmup, args.out)
    sys.exit(0)
