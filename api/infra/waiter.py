"""Try-Sync waiting: one Redis pub/sub subscription per API process wakes every waiter.

The same subscription carries the process's other notices (`also`: channel → handler, e.g. "API keys
changed"); each handler is also called after a (re)subscription, when notices may have been missed.

Workers publish a prediction's id on `settings.events_channel` once its row is final, with the
final row when they finished it (core/events.py): a waiter woken with it need not read the row. A
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
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import events

log = logging.getLogger(__name__)


class Completion(asyncio.Event):
    """Set when the prediction's row may have become final; `final_row` holds the row (less input and
    params) when the event carried it."""

    final_row: dict[str, Any] | None = None


class CompletionWaiter:
    def __init__(self, redis: Redis, channel: str, also: dict[str, Callable[[str], None]] | None = None) -> None:
        self._redis = redis
        self._channel = channel
        self._also = also or {}
        self._events: dict[str, set[Completion]] = defaultdict(set)
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
    def watch(self, prediction_id: str, tenant_id: str = "") -> Iterator[Completion]:
        event = Completion()
        self._events[prediction_id].add(event)
        self._per_tenant[tenant_id] += 1
        try:
            yield event
        finally:
            self._per_tenant[tenant_id] -= 1
            if not self._per_tenant[tenant_id]:
                del self._per_tenant[tenant_id]
            waiting = self._events.get(prediction_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[prediction_id]

    def _wake(self, data: bytes) -> None:
        prediction_id, encoded = events.parse(data)
        waiting = self._events.get(prediction_id)
        if not waiting:  # every API process hears every completion; most are someone else's
            return
        final_row = None
        if encoded:
            try:
                final_row = events.final_row(encoded)
            except ValueError:
                log.warning("unreadable completion event for %s; its waiters read the row", prediction_id)
        for event in waiting:
            event.final_row = final_row
            event.set()

    def _wake_all(self) -> None:
        for waiting in self._events.values():
            for event in waiting:
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
                    channel, data = _text(message["channel"]), message["data"]
                    if channel == self._channel:
                        self._wake(data if isinstance(data, bytes) else str(data).encode())
                    elif channel in self._also:
                        self._also[channel](_text(data))
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


class Notices:
    """Events by key, set by a notice naming the key (or, with "", all of them: a resubscription may have
    missed some). The event streams' wake-ups: a worker's progress entries (core/progress.py)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events[key].add(event)
        try:
            yield event
        finally:
            watching = self._events.get(key)
            if watching is not None:
                watching.discard(event)
                if not watching:
                    del self._events[key]

    def notify(self, key: str) -> None:
        for event in self._events.get(key, ()) if key else (e for es in self._events.values() for e in es):
            event.set()
