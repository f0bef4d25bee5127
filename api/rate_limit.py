"""Rate limits and in-flight slots for the API (their keys and arithmetic in core.quota), plus their headers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from api.redis_mux import RedisMux, Script
from core import quota


@dataclass
class Slot:
    """A tenant's in-flight slot, taken for one submit. Its prediction keeps it once stored (the worker or a
    cancel gives it back); every other way out of the request gives it back here, once."""

    limiter: Limiter
    tenant_id: str
    held: int  # the tenant's slots in use before this request
    cap: int
    granted: bool
    settled: bool = False  # kept by its prediction, or given back

    def require(self) -> None:
        if not self.granted:
            raise ApiError(
                429,
                f"too many predictions in flight: this tenant has {self.held} queued or processing (limit {self.cap})",
                retry_after=1,
            )

    def keep(self) -> None:
        self.settled = True

    async def give_back(self) -> None:
        if self.granted and not self.settled:
            self.settled = True
            await self.limiter.release_slot(self.tenant_id)


class Limiter:
    _RELEASE = Script(quota.RELEASE_SLOT_LUA)

    def __init__(self, redis: RedisMux, namespace: str, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._namespace = namespace
        self._clock = clock  # wall-clock seconds: replicas agree on the windows as far as their clocks do

    async def hit(self, tenant_id: str, api_key_id: str, limit: int) -> quota.RateDecision:
        """Count one request against the key's per-minute limit. Fails closed: no Redis, no request."""
        decision, _ = await self._admit(tenant_id, api_key_id, limit, None)
        return decision

    async def hit_and_take_slot(
        self, tenant_id: str, api_key_id: str, limit: int, max_in_flight: int
    ) -> tuple[quota.RateDecision, Slot]:
        """`hit` and `take_slot` in one round trip (a submit's). A request the rate limit refuses holds no
        slot; whether one was free, the caller asks the slot (`require`) where take_slot would have run."""
        decision, slot = await self._admit(tenant_id, api_key_id, limit, max_in_flight)
        assert slot is not None
        return decision, slot

    async def take_slot(self, tenant_id: str, max_in_flight: int) -> Slot:
        """Reserve an in-flight slot, `granted` unless the tenant holds `max_in_flight` already.

        One INCR, given back at once when it went past the cap: concurrent requests for the last slot
        get one each from Redis's order, as a script would give them, without the script's cost."""
        key = quota.in_flight_key(self._namespace, tenant_id)
        try:
            held = int(await self._redis.execute("INCR", key)) - 1
            if held >= max_in_flight:
                await self._redis.execute("DECR", key)
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        return Slot(self, tenant_id, held, max_in_flight, granted=held < max_in_flight)

    async def _admit(
        self, tenant_id: str, api_key_id: str, limit: int, max_in_flight: int | None
    ) -> tuple[quota.RateDecision, Slot | None]:
        now_ms = int(self._clock() * 1000)
        current, previous = quota.rate_keys(self._namespace, tenant_id, api_key_id, now_ms)
        slot_key = quota.in_flight_key(self._namespace, tenant_id)
        commands: list[tuple[str | int, ...]] = [
            ("INCR", current),
            ("PEXPIRE", current, 2 * quota.WINDOW_MS),
            ("GET", previous),
        ]
        if max_in_flight is not None:
            commands.append(("INCR", slot_key))
        try:
            counted, _, before, *slots = await self._redis.pipeline(*commands)
            decision = quota.rate_decision(limit, int(counted), int(before or 0), now_ms)
            slot = None
            if max_in_flight is not None:
                held = int(slots[0]) - 1
                slot = Slot(self, tenant_id, held, max_in_flight, granted=decision.allowed and held < max_in_flight)
            # Until this undo lands (one round trip), a refused request still counts against the window and the
            # tenant's slots, as the INCR-then-DECR slot always did past its cap: a concurrent submit of the same
            # tenant at its cap may be refused 429 (Retry-After: 1) for a slot that is about to be free.
            undo = [] if decision.allowed else [("DECR", current)]
            if slot is not None and not slot.granted:
                undo.append(("DECR", slot_key))
            if undo:
                await self._redis.pipeline(*undo)
        except RedisError as exc:
            raise ApiError(503, "rate limiter unavailable, try again shortly", retry_after=1) from exc
        return decision, slot

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
