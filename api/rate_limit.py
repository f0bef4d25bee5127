"""Rate limits and in-flight slots for the API (their keys and arithmetic in core.quota), plus their headers."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from api.redis_mux import RedisMux, Script
from core import quota


class Limiter:
    _RELEASE = Script(quota.RELEASE_SLOT_LUA)

    def __init__(self, redis: RedisMux, namespace: str, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._namespace = namespace
        self._clock = clock  # wall-clock seconds: replicas agree on the windows as far as their clocks do

    async def hit(self, tenant_id: str, api_key_id: str, limit: int) -> quota.RateDecision:
        """Count one request against the key's per-minute limit. Fails closed: no Redis, no request."""
        now_ms = int(self._clock() * 1000)
        current, previous = quota.rate_keys(self._namespace, tenant_id, api_key_id, now_ms)
        try:
            counted, _, before = await self._redis.pipeline(
                ("INCR", current), ("PEXPIRE", current, 2 * quota.WINDOW_MS), ("GET", previous)
            )
            decision = quota.rate_decision(limit, int(counted), int(before or 0), now_ms)
            if not decision.allowed:
                await self._redis.execute("DECR", current)
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        return decision

    async def take_slot(self, tenant_id: str, max_in_flight: int) -> int:
        """Reserve an in-flight slot; returns how many the tenant held before. 429 when none is free.

        One INCR, given back at once when it went past the cap: concurrent requests for the last slot
        get one each from Redis's order, as a script would give them, without the script's cost."""
        key = quota.in_flight_key(self._namespace, tenant_id)
        try:
            held = int(await self._redis.execute("INCR", key)) - 1
            if held >= max_in_flight:
                await self._redis.execute("DECR", key)
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        if held >= max_in_flight:
            raise ApiError(
                429,
                f"too many predictions in flight: this tenant has {held} queued or processing (limit {max_in_flight})",
                retry_after=1,
            )
        return int(held)

    async def release_slot(self, tenant_id: str) -> None:
        await self._redis.run(self._RELEASE, [quota.in_flight_key(self._namespace, tenant_id)], [])


class RateLimitHeaders:
    """Adds the `RateLimit` headers of the request's decision (request.state.rate_limit) to its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                decision = scope.get("state", {}).get("rate_limit")
                if decision is not None:
                    message["headers"] = [*message.get("headers", ()), *decision.headers()]
            await send(message)

        await self.app(scope, receive, send_with_headers)
