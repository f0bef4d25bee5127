"""Tenants, their limits and price plans, and their API keys.

Functions build statements (and the values a caller must see, such as a new key) so the CLI
(sync) and the admin HTTP API (async) run the same code on their own connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Select, Update, func, insert, select, update

from core.ids import display_prefix, hash_api_key, new_api_key, new_id
from core.tables import api_keys, tenants

LIMIT_FIELDS = (
    "rate_limit_per_minute",
    "tenant_rate_limit_per_minute",
    "max_in_flight",
    "price_per_image",
    "price_per_enhancement",  # the prompt enhancer's (docs/enhancer.md)
    "batch_price_per_image",  # batch work's (docs/batch.md)
    "retention_s",  # seconds a finished prediction's objects are kept (core/retention.py)
    "safety_policy",  # block, blur or flag (core/safety.py)
    "allow_disable_safety_checker",
    "blocked_terms",  # the tenant's additions to the prompt blocklist (core/prompt_policy.py)
    "result_cache",  # false: the operator opted the tenant out of the result cache (docs/cache.md)
    "cache_price_per_image",
)
MAX_RETENTION_S = 3650 * 86400  # ten years


@dataclass(frozen=True)
class IssuedKey:
    tenant_id: str
    key_id: str
    key: str  # shown once, never stored
    name: str = ""
    expires_at: datetime | None = None

    @property
    def prefix(self) -> str:
        return display_prefix(self.key)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "tenant_id": self.tenant_id,
            "key": self.key,
            "prefix": self.prefix,
            "name": self.name,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


def create_tenant(name: str, **limits: Any) -> tuple[str, Insert]:
    tenant_id = new_id()
    return tenant_id, insert(tenants).values(id=tenant_id, name=name, **_limits(limits))


def set_limits(tenant_id: str, **limits: Any) -> Update:
    """Set (or, with None, reset to the platform default) a tenant's limits and price per image."""
    return update(tenants).where(tenants.c.id == tenant_id).values(**_limits(limits)).returning(tenants)


def set_suspended(tenant_id: str, suspended: bool) -> Update:
    """Suspend a tenant (its submits refused: api/services/predictions.py) or resume it; suspending a suspended
    tenant keeps the first suspension's time."""
    when = func.coalesce(tenants.c.suspended_at, func.now()) if suspended else None
    return update(tenants).where(tenants.c.id == tenant_id).values(suspended_at=when).returning(tenants)


def find_tenant(name_or_id: str) -> Select[Any]:
    return select(tenants).where((tenants.c.name == name_or_id) | (tenants.c.id == name_or_id))


def list_tenants() -> Select[Any]:
    return select(tenants).order_by(tenants.c.created_at)


def issue_key(tenant_id: str, name: str = "", expires_at: datetime | None = None) -> tuple[IssuedKey, Insert]:
    key, key_id = new_api_key(), new_id()
    statement = insert(api_keys).values(
        id=key_id,
        tenant_id=tenant_id,
        name=name,
        prefix=display_prefix(key),
        key_hash=hash_api_key(key),
        expires_at=expires_at,
    )
    return IssuedKey(tenant_id, key_id, key, name, expires_at), statement


def lock_tenant(tenant_id: str) -> Select[Any]:
    """The tenant's row, locked until the transaction ends: concurrent key creations take turns at the cap."""
    return select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update()


def active_keys(tenant_id: str) -> Select[Any]:
    """How many of the tenant's keys still work."""
    return select(func.count()).where(
        api_keys.c.tenant_id == tenant_id,
        api_keys.c.revoked_at.is_(None),
        (api_keys.c.expires_at.is_(None)) | (api_keys.c.expires_at > func.now()),
    )


def list_keys(tenant_id: str) -> Select[Any]:
    """Keys as users may see them: never the key or its hash."""
    columns = [api_keys.c[name] for name in ("id", "prefix", "name", "created_at", "last_used_at", "expires_at")]
    return (
        select(*columns, api_keys.c.revoked_at).where(api_keys.c.tenant_id == tenant_id).order_by(api_keys.c.created_at)
    )


def revoke_key(key_id: str, tenant_id: str | None = None) -> Update:
    """Revoke a key (scoped to a tenant unless an operator does it); effective on the next request anywhere."""
    statement = update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
    if tenant_id is not None:
        statement = statement.where(api_keys.c.tenant_id == tenant_id)
    return statement.values(revoked_at=func.now()).returning(api_keys.c.id)


def _limits(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown tenant settings: {sorted(unknown)}")
    return values
