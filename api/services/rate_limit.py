"""Rate limits and in-flight slots for the API (their keys and arithmetic in core.quota), plus their headers."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import OverCapacity, Unavailable
from api.services.principals import Principal
from core import quota

log = logging.getLogger(__name__)
UNDO_ATTEMPTS, UNDO_EVERY_S = 120, 0.5  # a minute of retries; after that the sweeper reconciles


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
            raise OverCapacity(
                f"too many predictions in flight: this tenant's limit of {self.cap} queued or processing is reached",
                retry_after=1,
            )

    def keep(self) -> None:
        self.settled = True

    async def give_back(self) -> None:
        if self.granted and not self.settled:
            self.settled = True
            await self.limiter.release_slot(self.tenant_id)


class Limiter:
    def __init__(self, redis: Redis, namespace: str) -> None:
        # Each script runs by its SHA1 (EVALSHA), loaded by redis-py when the server lacks it (a fresh or restarted
        # Redis, a promoted replica): one round trip per call, and never retried (a retry could count twice).
        self._admit_script = redis.register_script(quota.ADMIT_LUA)
        self._forget_script = redis.register_script(quota.FORGET_ADMISSION_LUA)
        self._release_script = redis.register_script(quota.RELEASE_SLOT_LUA)
        self._namespace = namespace
        self._undoing: set[asyncio.Task[None]] = set()

    async def hit(self, principal: Principal) -> quota.RateDecision:
        """Count one request against its key's and its tenant's per-minute limits. Fails closed: no Redis,
        no request."""
        decision, _ = await self._admit(principal, 0)
        return decision

    async def hit_and_take_slot(self, principal: Principal) -> tuple[quota.RateDecision, Slot]:
        """`hit` and `take_slot` in one round trip (a submit's). A request the rate limit refuses holds no
        slot; whether one was free, the caller asks the slot (`require`) where take_slot would have run."""
        decision, slot = await self._admit(principal, principal.max_in_flight)
        assert slot is not None
        return decision, slot

    async def take_slot(self, tenant_id: str, max_in_flight: int) -> Slot:
        """Reserve an in-flight slot, `granted` unless the tenant holds `max_in_flight` already."""
        _, slot = await self._run(tenant_id, ("", ""), (0, 0, max_in_flight))
        assert slot is not None
        return slot

    async def _admit(self, principal: Principal, max_in_flight: int) -> tuple[quota.RateDecision, Slot | None]:
        keys = quota.rate_keys(self._namespace, principal.tenant_id, principal.api_key_id)
        limits = (principal.rate_limit_per_minute, principal.tenant_rate_limit_per_minute, max_in_flight)
        return await self._run(principal.tenant_id, keys, limits)

    async def _run(
        self, tenant_id: str, rate_keys: tuple[str, str], limits: tuple[int, int, int]
    ) -> tuple[quota.RateDecision, Slot | None]:
        token = secrets.token_hex(8)
        keys = [*rate_keys, quota.in_flight_key(self._namespace, tenant_id)]
        keys.append(quota.admission_key(self._namespace, tenant_id, token))
        try:
            reply = await self._admit_script(keys, [*limits, quota.ADMISSION_TOKEN_TTL_MS])
        except RedisError as exc:
            if limits[2]:  # it may yet run, or have run, and taken a slot nobody will give back
                self._undo_later(tenant_id, token)
            raise Unavailable("rate limiter unavailable, try again shortly", retry_after=1) from exc
        decision = quota.RateDecision.from_script(reply, limits[0], limits[1])
        held, granted = reply[6:8]
        slot = Slot(self, tenant_id, held, limits[2], granted=bool(granted)) if limits[2] else None
        return decision, slot

    def _undo_later(self, tenant_id: str, token: str) -> None:
        """Give back the slot of an admission whose answer was lost, once Redis answers again (bounded)."""
        keys = [quota.in_flight_key(self._namespace, tenant_id), quota.admission_key(self._namespace, tenant_id, token)]

        async def undo() -> None:
            for _ in range(UNDO_ATTEMPTS):
                try:
                    await self._forget_script(keys, [quota.ADMISSION_TOKEN_TTL_MS])
                    return
                except RedisError:
                    await asyncio.sleep(UNDO_EVERY_S)
            log.warning("could not undo a lost admission of tenant %s; the sweeper will reconcile it", tenant_id)

        task = asyncio.create_task(undo())
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def release_slot(self, tenant_id: str) -> None:
        await self._release_script([quota.in_flight_key(self._namespace, tenant_id)], [])


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
