"""Who is calling: the principal behind an API key, and the per-process cache of key lookups."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    api_key_id: str
    rate_limit_per_minute: int  # per key
    tenant_rate_limit_per_minute: int  # all the tenant's keys together
    max_in_flight: int
    key_expires_at: datetime | None = None
    retention_s: int | None = None  # the tenant's, default applied (core/retention.py); None: not looked up
    suspended: bool = False  # an operator suspended the tenant: its submits are refused (api/services/predictions.py)
    safety_policy: str | None = None  # block, blur, flag (core/safety.py); None: block
    allow_disable_safety_checker: bool = False
    blocked_terms: tuple[str, ...] = ()  # the tenant's additions to the prompt blocklist


class KeyCache:
    """Principals by key hash, for `ttl_s` at most (and never past the key's expiry).

    Saves a database read per request. Every replica clears it the moment a key is revoked or a
    tenant's limits or suspension change (Redis pub/sub, `settings.keys_channel`, see api/infra/waiter.py) and whenever
    its subscription was interrupted; `ttl_s` bounds staleness should an invalidation be lost.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        principal, valid_until = entry
        if time.monotonic() >= valid_until or (
            principal.key_expires_at is not None and principal.key_expires_at <= datetime.now(UTC)
        ):
            self._entries.pop(key_hash, None)
            return None
        return principal

    def put(self, key_hash: str, principal: Principal) -> None:
        if self.ttl_s > 0:
            self._entries[key_hash] = (principal, time.monotonic() + self.ttl_s)

    def clear(self, _: str = "") -> None:
        self._entries.clear()
