"""A worker's announcement on real Redis (core/workers.py through worker/leases.py's heartbeat thread): idle, busy
while it holds predictions, draining once `klein drain-worker` names it, with its own gauges to match."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import redis
from sqlalchemy import Engine

from core import progress, workers
from core.settings import Settings
from ops.embedded import wait_until
from worker import metrics
from worker.leases import Heartbeat


def announced(client: redis.Redis, settings: Settings, worker_id: str) -> workers.Worker | None:
    found, _ = workers.read(client.hgetall(workers.registry_key(settings)))
    return next((worker for worker in found if worker.worker == worker_id), None)


def state_of(client: redis.Redis, settings: Settings, worker_id: str) -> str | None:
    worker = announced(client, settings, worker_id)
    return worker.state if worker else None


def klein(settings_env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=settings_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_heartbeat_announces_idle_busy_and_draining_and_the_cli_drains(
    settings: Settings, settings_env: dict[str, str], engine: Engine
) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    worker_id, node = f"registry-test:{time.time_ns()}", f"registry-test-{time.time_ns()}@nowhere"
    stopping = threading.Event()
    heartbeat = Heartbeat(settings, client, worker_id, engine, stopping, node)
    live, draining = (
        progress.workers_key(settings, settings.model_id),
        workers.draining_key(settings, settings.model_id),
    )
    try:
        wait_until(lambda: announced(client, settings, worker_id) is not None, 10, "the first announcement")
        first = announced(client, settings, worker_id)
        assert first is not None and (first.state, first.node, first.model) == ("idle", node, settings.model_id)
        assert client.zscore(live, worker_id) is not None

        with heartbeat.hold(["p1", "p2"]):
            assert metrics.BUSY._value.get() == 2
            wait_until(lambda: state_of(client, settings, worker_id) == "busy", 10, "busy")
        assert metrics.BUSY._value.get() == 0

        listed = json.loads(klein(settings_env, "workers"))
        assert [entry["node"] for entry in listed if entry["worker"] == worker_id] == [node]
        assert "draining" in klein(settings_env, "drain-worker", node)
        wait_until(heartbeat.draining.is_set, 10, "the drain seen by the worker")
        assert metrics.DRAINING._value.get() == 1
        wait_until(lambda: state_of(client, settings, worker_id) == "draining", 10, "draining")
        assert client.zscore(live, worker_id) is None and client.zscore(draining, worker_id) is not None

        unknown = subprocess.run(
            [sys.executable, "-m", "ops.cli", "drain-worker", "nobody@nowhere"],
            env=settings_env,
            capture_output=True,
            text=True,
        )
        assert unknown.returncode != 0 and "nobody@nowhere" in unknown.stderr
    finally:
        stopping.set()
        pipe = client.pipeline(transaction=False)
        workers.forget(pipe, settings, [worker_id])
        pipe.zrem(live, worker_id)
        pipe.zrem(draining, worker_id)
        pipe.execute()
        metrics.DRAINING.set(0)
