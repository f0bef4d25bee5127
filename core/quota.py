"""Per-key request rate limits and per-tenant in-flight slots, atomic in Redis.

Both hold across any number of API replicas: each check is one atomic Redis operation (a Lua
script for the rate limit, an INCR for a slot), so N concurrent requests against a limit of L
let exactly L through. Keys carry the tenant in a hash tag so a tenant's keys live on one Redis
Cluster slot.

A slot is taken when a prediction is accepted and given back exactly once, by whoever wins
the compare-and-set that ends it (worker finish, cancel, or the API's failed enqueue).
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_MS = 60_000

# Sliding-window log: one sorted-set member per request in the last minute.
# Returns {allowed (0|1), remaining, seconds until the oldest request leaves the window}.
RATE_LIMIT_LUA = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
local allowed = 0
if used < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  used = used + 1
  allowed = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = window
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {allowed, limit - used, math.ceil(reset / 1000)}
"""

# Gives a slot back, never below zero.
RELEASE_SLOT_LUA = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


def rate_key(namespace: str, tenant_id: str, api_key_id: str) -> str:
    return f"{namespace}:{{{tenant_id}}}:rate:{api_key_id}"


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
