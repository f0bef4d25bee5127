"""Rate limits and in-flight slots for the API (scripts in core.quota), plus their response headers."""

from __future__ import annotations

import secrets
import time

from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from api.redis_mux import RedisMux, Script
from core import quota


class Limiter:
    _RATE = Script(quota.RATE_LIMIT_LUA)
    _TAKE = Script(quota.TAKE_SLOT_LUA)
    _RELEASE = Script(quota.RELEASE_SLOT_LUA)

    def __init__(self, redis: RedisMux, namespace: str) -> None:
        self._redis = redis
        self._namespace = namespace

    async def hit(self, tenant_id: str, api_key_id: str, limit: int) -> quota.RateDecision:
        """Count one request against the key's per-minute limit. Fails closed: no Redis, no request."""
        key = quota.rate_key(self._namespace, tenant_id, api_key_id)
        now_ms = int(time.time() * 1000)
        try:
            allowed, remaining, reset_s = await self._redis.run(
                self._RATE, [key], [now_ms, quota.WINDOW_MS, limit, f"{now_ms}-{secrets.token_hex(4)}"]
            )
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        return quota.RateDecision(bool(allowed), limit, int(remaining), int(reset_s))

    async def take_slot(self, tenant_id: str, max_in_flight: int) -> int:
        """Reserve an in-flight slot; returns how many the tenant held before. 429 when none is free."""
        try:
            taken, held = await self._redis.run(
                self._TAKE, [quota.in_flight_key(self._namespace, tenant_id)], [max_in_flight]
            )
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        if not taken:
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
            decision = scope.get("state", {}).get("rate_limit")
            if message["type"] == "http.response.start" and decision is not None:
                headers = MutableHeaders(scope=message)
                for name, value in decision.headers().items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
