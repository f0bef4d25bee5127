"""The message the API publishes is the message Celery itself would publish; the sweeper finds what the broker lost."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import orjson
import redis
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, update

from core.ids import new_id
from core.lifecycle import Status
from core.queue import PREDICT_TASK, enqueue, list_key, make_celery, queued_key, task_message
from core.settings import Settings
from core.sweeper import Sweeper
from core.tables import predictions
from core.tenants import IssuedKey
from tests.stack import REDIS_URL
from worker import sweep_metrics


def test_task_message_matches_what_celery_publishes() -> None:
    settings = Settings(redis_url=REDIS_URL, queue_name="contract-test")
    client = redis.Redis.from_url(REDIS_URL)
    for priority in (0, 6, 8, 9):  # 8: the lowest interactive class, 9: batch work (core/batches.py)
        client.delete(list_key(settings.queue_name, priority))
        make_celery(settings).send_task(PREDICT_TASK, args=["p1"], priority=priority)
        (published,) = client.lrange(list_key(settings.queue_name, priority), 0, -1)
        client.delete(list_key(settings.queue_name, priority))
        celery_message = orjson.loads(published)
        key, ours = task_message(settings.queue_name, "p1", priority)
        our_message = orjson.loads(ours)
        assert key == list_key(settings.queue_name, priority)

        def shape(message: dict) -> dict:  # everything but per-message ids and the origin
            headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "origin")}
            properties = {
                k: v
                for k, v in message["properties"].items()
                if k not in ("correlation_id", "reply_to", "delivery_tag")
            }
            top = {k: v for k, v in message.items() if k not in ("headers", "properties", "body")}
            return {"top": top, "headers": headers, "properties": properties, "body": base64.b64decode(message["body"])}

        celery_shape, our_shape = shape(celery_message), shape(our_message)
        assert orjson.loads(celery_shape.pop("body")) == orjson.loads(our_shape.pop("body"))
        assert our_shape == celery_shape
        assert our_message["headers"]["id"] == our_message["headers"]["root_id"]
        assert our_message["properties"]["correlation_id"] == our_message["headers"]["id"]


def test_each_message_has_its_own_version_4_uuids() -> None:
    seen = set()
    for _ in range(1000):
        message = orjson.loads(task_message("q", "p", 0)[1])
        for text in (message["headers"]["id"], message["properties"]["delivery_tag"]):
            parsed = uuid.UUID(text)
            assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
            seen.add(text)
    assert len(seen) == 2000


def test_enqueue_marks_the_id_for_the_sweeper_and_pushes_one_message() -> None:
    settings = Settings(redis_url=REDIS_URL, queue_name="enqueue-test")
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queued_key(settings), list_key(settings.queue_name, 3))
    enqueue(client, settings, "p2", "flux-klein-4b", priority=3)
    assert client.sismember(queued_key(settings), "p2")
    assert client.llen(list_key(settings.queue_name, 3)) == 1
    client.delete(queued_key(settings), list_key(settings.queue_name, 3))


def test_the_sweeper_checks_what_came_due_and_everything_at_each_full_check(
    settings: Settings, engine: Engine, tenant: IssuedKey
) -> None:
    """Lost predictions (created, not in the broker) are enqueued again: every one at a full check (the
    first pass, then every FULL_CHECK_EVERY_S); in between, only those that came due since the last pass."""
    client = redis.Redis.from_url(settings.redis_url)
    own = settings.model_copy(update={"queue_name": f"sweep-test-{secrets.token_hex(4)}"})
    platform_lock = hold_platform_sweeper_lock(client, settings)
    sweeper = Sweeper(own, engine, client)

    def lost(age_s: float) -> str:
        return insert_prediction(engine, tenant, created_at=func.now() - timedelta(seconds=age_s))

    def requeued(pid: str) -> bool:
        return bool(client.sismember(queued_key(own), pid))

    grace = own.requeue_grace_s
    try:
        old = lost(3600)
        assert sweeper.sweep() is not None and requeued(old)  # the first pass is a full check
        older, newly_due, not_yet = lost(7200), lost(grace + 1), lost(grace / 2)
        sweeper.sweep()
        assert requeued(newly_due) and not requeued(older) and not requeued(not_yet)
        client.hset(f"{own.queue_name}:sweeper-checked", "full", 0)  # five minutes on
        sweeper.sweep()
        assert requeued(older) and not requeued(not_yet)
    finally:
        with engine.begin() as conn:  # nothing left for the platform's sweepers
            mine = predictions.c.tenant_id == tenant.tenant_id
            conn.execute(update(predictions).where(mine).values(status=Status.CANCELED))
        client.delete(platform_lock, *client.keys(f"{own.queue_name}*"))  # the set, lists and sweeper state
        client.close()


def test_a_prediction_the_sweeper_gives_up_on_leaves_the_queued_set(
    settings: Settings, engine: Engine, tenant: IssuedKey
) -> None:
    """Its last worker died before its last round trip, which would have taken the id out of the set."""
    client = redis.Redis.from_url(settings.redis_url)
    own = settings.model_copy(update={"queue_name": f"give-up-test-{secrets.token_hex(4)}"})
    platform_lock = hold_platform_sweeper_lock(client, settings)
    lapsed = func.now() - timedelta(seconds=1)
    pid = insert_prediction(
        engine, tenant, status=Status.PROCESSING, attempts=own.max_attempts, worker_id="gone", lease_expires_at=lapsed
    )
    client.sadd(queued_key(own), pid)
    try:
        failed = {"outcome": "failed"}
        before = REGISTRY.get_sample_value("klein_sweeper_leases_lapsed_total", failed) or 0.0
        report = Sweeper(own, engine, client).sweep()
        assert report is not None and report.failed_lapsed == 1
        assert not client.sismember(queued_key(own), pid)
        sweep_metrics.observe("swept", report, 0.0)  # as the worker's sweeper thread does with its report
        assert REGISTRY.get_sample_value("klein_sweeper_leases_lapsed_total", failed) == before + 1
    finally:
        client.delete(platform_lock, *client.keys(f"{own.queue_name}*"))
        client.close()


def hold_platform_sweeper_lock(client: redis.Redis, settings: Settings) -> str:
    """Keep the running workers' sweepers out while a test sweeps the shared database itself."""
    lock = f"{settings.queue_name}:sweeper-lock"
    deadline = time.monotonic() + 30
    while not client.set(lock, "test", nx=True, px=60_000):
        assert time.monotonic() < deadline, "the platform's sweeper lock was never free"
        time.sleep(0.1)
    return lock


def insert_prediction(engine: Engine, tenant: IssuedKey, **values: Any) -> str:
    pid = new_id()
    with engine.begin() as conn:
        row = {"id": pid, "tenant_id": tenant.tenant_id, "model": "flux-klein-4b", "input": {}, "params": {}}
        conn.execute(predictions.insert().values(**row, **values))
    return pid
