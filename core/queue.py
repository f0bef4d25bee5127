"""The queue contract between API and workers: one Celery app config, one task, an id as payload."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

PREDICT_TASK = "klein.predict"


def make_celery(settings: Settings) -> Celery:
    app = Celery("klein", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in PostgreSQL
        # At-least-once: ack after the task ran; the task itself is idempotent (core.lifecycle.claim).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one prediction in flight per GPU worker process
        worker_concurrency=1,
        worker_pool="solo",
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # An unacked message is redelivered after this; keep it above the task time limit.
            "visibility_timeout": int(settings.task_time_limit_s * 2 + settings.lease_s),
            "socket_timeout": 5,
            # Priorities 0 (first) … 9 map onto lists consumed in that order: see core.quota.queue_priority.
            "priority_steps": [0, 3, 6, 9],
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 5,
        },
        broker_pool_limit=10,
    )
    return app


def queued_key(settings: Settings) -> str:
    """Redis set of the ids handed to the broker and not yet claimed (see core/sweeper.py)."""
    return f"{settings.queue_name}:queued"


def enqueue(app: Celery, prediction_id: str, priority: int = 0) -> None:
    """Publish the task. Callers first add the id to `queued_key`, so that a lost message can be found."""
    app.send_task(PREDICT_TASK, args=[prediction_id], priority=priority)
