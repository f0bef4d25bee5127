"""The queue contract between API and workers: one Celery app config, one task, an id as payload.

The API's submit does not go through Celery's producer: `task_message` builds the exact message Celery
(protocol 2) and kombu's Redis transport would write, so the API can add the id to the sweeper's set
and push the message in one pipelined round trip, without a thread hop (docs/performance.md says what
that is worth). Everything else publishes with Celery's `send_task` (`enqueue`). tests/integration/test_queue.py checks
the message against one published by Celery itself, and every end-to-end test has the real worker
consume it.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from typing import Any

import orjson
import redis
from celery import Celery

from core import redis_connection, tracing
from core.settings import Settings
from models.registry import DEFAULT_MODEL

PREDICT_TASK = "klein.predict"
DELIVER_TASK = "klein.webhooks.deliver"  # worker/webhooks.py, on `webhooks_queue(settings)`
# A submit's X-Request-ID, in its task's message headers: the worker logs the prediction's lines under it.
REQUEST_ID_HEADER = "klein_request_id"
# Interactive work runs in classes 0 … 8 (core.quota.queue_priority); 9 is batch work's alone (core/batches.py):
# a worker takes a batch's prediction only when every interactive list is empty.
PRIORITY_STEPS = (0, 3, 6, 8, 9)
BATCH_PRIORITY = 9
_KOMBU_SEPARATOR = "\x06\x16"  # kombu's Redis transport: "<queue><sep><priority>" for priorities > 0
_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
_REPLY_TO = str(uuid.uuid4())  # Celery's producer sends one id per app and thread here (its `thread_oid`)


def make_celery(settings: Settings) -> Celery:
    url, transport_options, use_ssl = redis_connection.broker(settings)  # TLS, ACL user, Sentinel as the settings say
    app = Celery("klein", broker=url, set_as_current=False)
    app.conf.update(
        broker_use_ssl=use_ssl,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in PostgreSQL
        # At-least-once: ack after the task ran; the task itself is idempotent (core.lifecycle.claim).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # one prediction in flight per GPU worker process…
        worker_disable_prefetch=True,  # …and none reserved behind it: the next one is chosen when the GPU is free
        worker_concurrency=1,
        worker_pool="solo",
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # An unacked message is redelivered after this; keep it above the task time limit.
            "visibility_timeout": int(settings.task_time_limit_s * 2 + settings.lease_s),
            "socket_timeout": 5,
            # Priorities 0 (first) … 9 map onto lists consumed in that order: see core.quota.queue_priority.
            "priority_steps": list(PRIORITY_STEPS),
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 5,
            **transport_options,
        },
        broker_pool_limit=10,
    )
    return app


def queued_key(settings: Settings) -> str:
    """Redis set of the ids handed to the broker whose run has not ended (see core/sweeper.py): the worker that
    finishes a prediction removes its id in its last round trip, a worker that finds it not claimable at
    once, and a cancel or the sweeper when they end it."""
    return f"{settings.queue_name}:queued"


def model_queue(queue_name: str, model_id: str) -> str:
    """The Celery queue of one model's predictions, which only that model's workers consume: the default model's
    is `queue_name` itself, another's `<queue_name>.<model id>`. Everything else stays namespaced by `queue_name`."""
    return queue_name if model_id == DEFAULT_MODEL.id else f"{queue_name}.{model_id}"


def webhooks_queue(settings: Settings) -> str:
    """The webhook worker's queue: CPU only, so that no GPU worker ever waits on a receiver."""
    return f"{settings.queue_name}.webhooks"


def kick_webhooks(pipe: Any, settings: Settings, prediction_id: str) -> None:
    """Queue the sending of the prediction's due webhook deliveries (the rows are the truth; this is the
    prompt; the webhook worker's poller catches any kick that is lost). `pipe`: a redis-py pipeline, sync or
    async, that the caller executes."""
    key, message = task_message(webhooks_queue(settings), prediction_id, 0, DELIVER_TASK)
    pipe.lpush(key, message)


def list_key(queue: str, priority: int) -> str:
    return queue if priority == 0 else f"{queue}{_KOMBU_SEPARATOR}{priority}"


def task_message(
    queue: str, prediction_id: str, priority: int, task: str = PREDICT_TASK, request_id: str | None = None
) -> tuple[str, bytes]:
    """(Redis list, message) of a task taking a prediction's id (`klein.predict` unless told otherwise), as
    Celery's producer would LPUSH it; `request_id` in its headers (REQUEST_ID_HEADER) if given."""
    if priority not in PRIORITY_STEPS:
        raise ValueError(f"priority must be one of {PRIORITY_STEPS}")
    task_id = _uuid4()
    body = [[prediction_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    message: dict[str, Any] = {
        "body": base64.b64encode(orjson.dumps(body)).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr([prediction_id]),
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": _REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": _uuid4(),
        },
    }
    if request_id is not None:
        message["headers"][REQUEST_ID_HEADER] = request_id
    if tracing.enabled:  # the trace goes on in the worker, whose Celery instrumentation reads these headers
        tracing.inject(message["headers"])
    return list_key(queue, priority), orjson.dumps(message)


def _uuid4() -> str:
    """str(uuid.uuid4()) in two thirds of its time: uuid.UUID's constructor and str() are the cost."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def enqueue(client: redis.Redis, settings: Settings, prediction_id: str, model: str, priority: int = 0) -> None:
    """Mark the id as in the broker (for the sweeper), then publish its task on its model's queue with Celery's own
    producer: the sweeper's and the worker's requeues. Only the API's submit builds the message itself
    (task_message)."""
    client.sadd(queued_key(settings), prediction_id)
    queue = model_queue(settings.queue_name, model)
    publisher(settings).send_task(PREDICT_TASK, args=[prediction_id], queue=queue, priority=priority)


_publishers: dict[int, tuple[Settings, Celery]] = {}  # by the settings' identity, which the entry keeps alive


def publisher(settings: Settings) -> Celery:
    """One Celery app per settings, for publishing tasks and control commands from outside a worker."""
    if id(settings) not in _publishers:
        _publishers[id(settings)] = (settings, make_celery(settings))
    return _publishers[id(settings)][1]
