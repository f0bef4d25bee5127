"""Try-Sync's completion waiter against the real Redis."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import redis
from redis.asyncio import Redis

from api.infra.waiter import CompletionWaiter
from core import events
from tests.stack import REDIS_URL


async def _wait(event: asyncio.Event, seconds: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


def test_a_published_completion_wakes_only_its_waiters() -> None:
    async def scenario() -> None:
        client = Redis.from_url(REDIS_URL)
        waiter = CompletionWaiter(client, "waiter-test:done")
        await waiter.start()
        assert waiter.subscribed.is_set()
        with waiter.watch("a") as a1, waiter.watch("a") as a2, waiter.watch("b") as b:
            assert waiter.waiting == 3
            await client.publish("waiter-test:done", "a")
            assert await _wait(a1) and await _wait(a2)
            assert not await _wait(b, 0.3)
            assert a1.final_row is None  # the id alone: the waiter reads the row itself
        assert waiter.waiting == 0
        await waiter.stop()
        await client.aclose()

    asyncio.run(scenario())


def test_waiters_are_woken_after_the_subscription_is_lost_and_restored() -> None:
    async def scenario() -> None:
        name = f"waiter-test-{secrets.token_hex(4)}"
        client = Redis.from_url(REDIS_URL, client_name=name)
        waiter = CompletionWaiter(client, "waiter-test-2:done")
        await waiter.start()
        with waiter.watch("c") as c:
            # Drop the pub/sub connection server-side: a completion published meanwhile would be missed,
            # so every waiter is woken to re-read its row once the subscription is back. Only this waiter's:
            # other test sessions' APIs share the server.
            admin = redis.Redis.from_url(REDIS_URL)
            (ours,) = [conn for conn in admin.client_list(_type="pubsub") if conn["name"] == name]
            admin.client_kill_filter(_id=ours["id"])
            assert await _wait(c, 5.0)
        assert waiter.subscribed.is_set()
        await waiter.stop()
        await client.aclose()

    asyncio.run(scenario())


def test_a_completion_with_the_final_row_hands_it_to_the_waiters() -> None:
    finished_at = datetime(2026, 12, 2, 4, 5, 6, 789012, tzinfo=timezone(timedelta(hours=1)))
    final: dict[str, Any] = {"id": "d", "tenant_id": "t", "status": "completed", "outputs": [{"filename": "o.png"}]}
    final |= {"completed_at": finished_at, "started_at": None, "error": None}

    async def scenario() -> None:
        client = Redis.from_url(REDIS_URL)
        waiter = CompletionWaiter(client, "waiter-test-3:done")
        await waiter.start()
        with waiter.watch("d") as d:
            await client.publish("waiter-test-3:done", events.completion("d", final))
            assert await _wait(d)
        assert d.final_row == final
        assert d.final_row is not None and d.final_row["completed_at"].tzinfo == UTC  # as the API's reads give it
        await waiter.stop()
        await client.aclose()

    asyncio.run(scenario())
