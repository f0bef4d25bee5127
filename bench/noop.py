"""The floor of figure 2: a bare Celery no-op round trip over the platform's broker.

* `celery -A bench.noop:noop_app worker`, configured as core.queue configures the platform's workers;
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

NOOP_TASK = "bench.noop"


def make_noop_app() -> Celery:
    """Celery configured as core.queue configures the platform's (same broker, solo pool, acks late)."""
    redis_url = os.environ.get("KLEIN_REDIS_URL", "redis://127.0.0.1:6379/14")
    app = Celery("bench-noop", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=os.environ.get("BENCH_NOOP_QUEUE", "bench-noop"),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )

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
