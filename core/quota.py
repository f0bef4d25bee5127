"""Per-key request rate limits and per-tenant in-flight slots, atomic in Redis.

Both hold across any number of API replicas: each check counts with one atomic INCR, so N
concurrent requests against a limit of L let exactly L through. Keys carry the tenant in a hash
tag so a tenant's keys live on one Redis Cluster slot.

The rate limit is a sliding window estimated from two fixed-window counts (a sliding-window
counter): this minute's, plus the previous minute's weighted by how much of it the last 60 s still
cover, as if its requests had been spread evenly. Exact for a burst; over some 60 s it can let
through more than L only when the previous minute's requests were bunched at its end. O(1) time
and memory per key however high the limit, and no Lua: the exact sliding log it replaced (a Lua
script over a sorted set, one member per request) cost Redis 10× the CPU (docs/performance.md).

A slot is taken when a prediction is accepted and given back exactly once, by whoever wins
the compare-and-set that ends it (worker finish, cancel, or the API's failed enqueue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_MS = 60_000

# Gives a slot back, never below zero.
RELEASE_SLOT_LUA = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


def rate_keys(namespace: str, tenant_id: str, api_key_id: str, now_ms: int) -> tuple[str, str]:
    """The counters of the key's current and previous one-minute windows."""
    window = now_ms // WINDOW_MS
    base = f"{namespace}:{{{tenant_id}}}:rate:{api_key_id}"
    return f"{base}:{window}", f"{base}:{window - 1}"


def rate_decision(limit: int, counted: int, previous: int, now_ms: int) -> RateDecision:
    """Whether the request that made this window's count `counted` is allowed, given the previous
    window's count. A denied request is not counted (the caller gives its increment back)."""
    window = WINDOW_MS
    elapsed = now_ms % window
    used = counted + -(-previous * (window - elapsed) // window)  # the carried part rounds up
    if used <= limit:
        return RateDecision(True, limit, limit - used, -(-(window - elapsed) // 1000))
    # How long until one more fits: the previous window's weight must decay enough, or, when this one
    # is full, the next window must begin and this one's count decay in turn.
    this = min(counted - 1, limit)  # concurrent denials not yet given back are in `counted`: never allowed more
    if this >= limit:
        wait = window - elapsed + window - (limit - 1) * window / this
    else:
        wait = window - (limit - this - 1) * window / previous - elapsed
    return RateDecision(False, limit, 0, max(1, math.ceil(wait / 1000)))


def in_flight_key(namespace: str, tenant_id: str) -> str:
    return f"{namespace}:{{{tenant_id}}}:in-flight"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """IETF draft-ietf-httpapi-ratelimit-headers, the policy and the current state, as raw ASGI headers."""
        return [
            (b"ratelimit-policy", b'"per-key";q=%d;w=%d' % (self.limit, WINDOW_MS // 1000)),
            (b"ratelimit", b'"per-key";r=%d;t=%d' % (max(self.remaining, 0), self.reset_s)),
        ]


def queue_priority(slots_held: int) -> int:
    """Celery/Redis priority (0 runs first) from the tenant's backlog when it submits.

    A tenant with nothing in flight goes ahead of every deep backlog, so one tenant's
    10,000 queued predictions delay a quiet tenant by at most the predictions already running.
    """
    if slots_held == 0:
        return 0
    if slots_held < 4:
        return 3
    if slots_held < 16:
        return 6
    return 9
