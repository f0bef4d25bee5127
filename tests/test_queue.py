"""The message the API publishes is the message Celery itself would publish."""

from __future__ import annotations

import base64

import orjson
import redis

from core.queue import PREDICT_TASK, enqueue, list_key, make_celery, queued_key, task_message
from core.settings import Settings
from tests.stack import REDIS_URL


def test_task_message_matches_what_celery_publishes() -> None:
    settings = Settings(redis_url=REDIS_URL, queue_name="contract-test")
    client = redis.Redis.from_url(REDIS_URL)
    for priority in (0, 6):
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


def test_enqueue_marks_the_id_for_the_sweeper_and_pushes_one_message() -> None:
    settings = Settings(redis_url=REDIS_URL, queue_name="enqueue-test")
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queued_key(settings), list_key(settings.queue_name, 3))
    enqueue(client, settings, "p2", priority=3)
    assert client.sismember(queued_key(settings), "p2")
    assert client.llen(list_key(settings.queue_name, 3)) == 1
    client.delete(queued_key(settings), list_key(settings.queue_name, 3))
