"""Try-Sync waiting: one Redis pub/sub subscription per API process wakes every waiter.

The same subscription carries the process's other notices (`also`: channel → handler, e.g. "API keys
changed"); each handler is also called after a (re)subscription, when notices may have been missed.

Workers publish a prediction's id on `settings.events_channel` once its row is final. A
request registers its interest *before* the prediction is enqueued, so a completion can
never slip between enqueueing and starting to wait. After a (re)subscription every waiter
is woken once to re-read its row, covering messages published while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class CompletionWaiter:
    def __init__(self, redis: Redis, channel: str, also: dict[str, Callable[[str], None]] | None = None) -> None:
        self._redis = redis
        self._channel = channel
        self._also = also or {}
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._per_tenant: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return sum(len(events) for events in self._events.values())

    def waiting_for(self, tenant_id: str) -> int:
        return self._per_tenant[tenant_id]

    async def start(self, ready_timeout: float = 5.0) -> None:
        self._task = asyncio.create_task(self._listen(), name="completion-waiter")
        with contextlib.suppress(TimeoutError):  # without Redis the API still serves; waits time out
            await asyncio.wait_for(self.subscribed.wait(), ready_timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, prediction_id: str, tenant_id: str = "") -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events[prediction_id].add(event)
        self._per_tenant[tenant_id] += 1
        try:
            yield event
        finally:
            self._per_tenant[tenant_id] -= 1
            if not self._per_tenant[tenant_id]:
                del self._per_tenant[tenant_id]
            events = self._events.get(prediction_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[prediction_id]

    def _wake(self, prediction_id: str) -> None:
        for event in self._events.get(prediction_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel, *self._also)
                self.subscribed.set()
                self._wake_all()
                for handler in self._also.values():
                    handler("")
                backoff = 0.1
                async for message in pubsub.listen():
                    channel, data = (_text(message["channel"]), _text(message["data"]))
                    if channel == self._channel:
                        self._wake(data)
                    elif channel in self._also:
                        self._also[channel](data)
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("event subscription lost (%s); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
