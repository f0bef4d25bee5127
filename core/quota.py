"""Request rate limits (per key and per tenant) and per-tenant in-flight slots, atomic in Redis.

Both hold across any number of API replicas: one Lua script (ADMIT_LUA) decides a request against its
key's and its tenant's rate and, for a submit, takes an in-flight slot, reading the time from Redis
itself, so replicas' clocks and the order in which their commands arrive cannot disagree. Keys carry
the tenant in a hash tag so a tenant's keys live on one Redis Cluster slot.

The rate is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp per key): a
limit of L per minute admits a burst of at most L, and then one request every 60/L s as the bucket
refills; a changed limit applies at once to the requests already counted. Exact in any interval: at
most L + ⌊t·L/60⌋ requests in any t seconds, and exactly L of any burst that arrives within 60/L s.
There are no windows, so no boundary to straddle. O(1) time and one key per limit; the script costs
Redis about 33 µs of CPU per admission where the minute counters it replaced cost 3–4 µs
(bench/rate_limit.py).

A slot is taken when a prediction is accepted and given back exactly once, by whoever wins the
compare-and-set that ends it (worker finish, cancel, the API's failed enqueue, or the API itself
when the request fails before storing). A slot taken by a request whose answer never came back (Redis
stalled, the connection dropped) is given back by `FORGET_ADMISSION_LUA` through the admission's
token, and whatever still drifts is reconciled with PostgreSQL by the sweeper (core/sweeper.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_MS = 60_000
ADMISSION_TOKEN_TTL_MS = 60_000  # long enough for an undo sent once Redis answers again

# KEYS: the key's rate state, the tenant's rate state, the tenant's in-flight count, the admission's token.
# ARGV: key limit per minute, tenant limit per minute (0: no rate check), in-flight cap (0: no slot wanted).
# Returns {refused (0 no, 1 key rate, 2 tenant rate), wait µs, key remaining, key reset µs, tenant remaining,
# tenant reset µs, slots held before, slot granted (0/1)}.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local function gcra(key, limit)
  local interval = math.max(math.floor(window / limit), 1)
  local tat = now
  local at, was = string.match(redis.call('GET', key) or '', '^(%d+):(%d+)$')
  if at then  -- the debt in requests carries over a changed limit
    tat = math.max(now + (tonumber(at) - now) * interval / tonumber(was), now)
  end
  return tat + interval, interval
end
local refused, wait = 0, 0
local key_limit, tenant_limit, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local key_tat, key_interval, tenant_tat, tenant_interval = now, 1, now, 1
if key_limit > 0 then
  key_tat, key_interval = gcra(KEYS[1], key_limit)
  tenant_tat, tenant_interval = gcra(KEYS[2], tenant_limit)
  if key_tat - now > window then refused, wait = 1, key_tat - now - window end
  if tenant_tat - now > window and tenant_tat - now - window > wait then
    refused, wait = 2, tenant_tat - now - window
  end
  if refused == 0 then
    for i, state in ipairs({{key_tat, key_interval}, {tenant_tat, tenant_interval}}) do
      local value = string.format('%d:%d', state[1], state[2])
      redis.call('SET', KEYS[i], value, 'PX', math.ceil((state[1] - now) / 1000) + 1)
    end
  else
    key_tat, tenant_tat = key_tat - key_interval, tenant_tat - tenant_interval
  end
end
local held, granted = 0, 0
if cap > 0 and refused == 0 then
  held = tonumber(redis.call('GET', KEYS[3]) or '0')
  if held < cap and redis.call('GET', KEYS[4]) ~= 'void' then
    redis.call('INCR', KEYS[3])
    redis.call('SET', KEYS[4], 'taken', 'PX', ARGV[4])
    granted = 1
  end
end
local function remaining(tat, interval)
  if refused ~= 0 then return 0 end
  return math.floor((window - (tat - now)) / interval)
end
return {refused, wait, remaining(key_tat, key_interval), key_tat - now,
        remaining(tenant_tat, tenant_interval), tenant_tat - now, held, granted}
"""

# KEYS: the tenant's in-flight count, the admission's token. Gives back the slot of an admission whose
# answer was lost if it ran; if it has not run yet, voids the token so that it takes nothing when it does.
FORGET_ADMISSION_LUA = """
local state = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], 'void', 'PX', ARGV[1])
if state == 'taken' then
  local held = tonumber(redis.call('GET', KEYS[1]) or '0')
  if held > 0 then redis.call('DECR', KEYS[1]) end
  return 1
end
return 0
"""

# Gives a slot back, never below zero.
RELEASE_SLOT_LUA = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""

# KEYS: a tenant's in-flight count. ARGV: the value read before counting rows, the rows' count.
# Sets the count only if nothing changed the counter since it was read (the sweeper's reconciliation).
RECONCILE_SLOTS_LUA = """
if (redis.call('GET', KEYS[1]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def tenant_prefix(namespace: str, tenant_id: str) -> str:
    return f"{namespace}:{{{tenant_id}}}"


def rate_keys(namespace: str, tenant_id: str, api_key_id: str) -> tuple[str, str]:
    """The GCRA states (theoretical arrival times) of the key's and the tenant's limits."""
    base = tenant_prefix(namespace, tenant_id)
    return f"{base}:rate:key:{api_key_id}", f"{base}:rate:tenant"


def in_flight_key(namespace: str, tenant_id: str) -> str:
    return f"{tenant_prefix(namespace, tenant_id)}:in-flight"


def admission_key(namespace: str, tenant_id: str, token: str) -> str:
    return f"{tenant_prefix(namespace, tenant_id)}:admission:{token}"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int  # per key
    tenant_limit: int
    remaining: int
    reset_s: int  # until the key's allowance is whole again
    tenant_remaining: int
    tenant_reset_s: int
    retry_after_s: int = 0  # when refused: until one more request fits
    refused_by: str = ""  # "key" or "tenant"

    @classmethod
    def from_script(cls, reply: list[int], limit: int, tenant_limit: int) -> RateDecision:
        refused, wait_us, remaining, reset_us, tenant_remaining, tenant_reset_us = reply[:6]
        return cls(
            allowed=refused == 0,
            limit=limit,
            tenant_limit=tenant_limit,
            remaining=remaining,
            reset_s=_seconds(reset_us),
            tenant_remaining=tenant_remaining,
            tenant_reset_s=_seconds(tenant_reset_us),
            retry_after_s=max(1, _seconds(wait_us)) if refused else 0,
            refused_by={0: "", 1: "key", 2: "tenant"}[refused],
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        """IETF draft-ietf-httpapi-ratelimit-headers: both policies and their current state, as raw ASGI headers."""
        window = WINDOW_MS // 1000
        return [
            (
                b"ratelimit-policy",
                b'"per-key";q=%d;w=%d, "per-tenant";q=%d;w=%d' % (self.limit, window, self.tenant_limit, window),
            ),
            (
                b"ratelimit",
                b'"per-key";r=%d;t=%d, "per-tenant";r=%d;t=%d'
                % (self.remaining, self.reset_s, self.tenant_remaining, self.tenant_reset_s),
            ),
        ]


def _seconds(microseconds: int) -> int:
    return math.ceil(max(microseconds, 0) / 1_000_000)


LOWEST_PRIORITY = 8  # what a request that asks to go last gets (fal's `X-Fal-Queue-Priority: low`); 9 is batches'


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
    return LOWEST_PRIORITY
