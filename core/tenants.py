"""Tenants and their API keys (used by the CLI and tests; the API only reads keys)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, insert, select

from core.ids import display_prefix, hash_api_key, new_api_key, new_id
from core.tables import api_keys, tenants


@dataclass(frozen=True)
class IssuedKey:
    tenant_id: str
    key_id: str
    key: str  # shown once, never stored

    @property
    def prefix(self) -> str:
        return display_prefix(self.key)


def create_tenant(conn: Connection, name: str) -> str:
    tenant_id = new_id()
    conn.execute(insert(tenants).values(id=tenant_id, name=name))
    return tenant_id


def find_tenant(conn: Connection, name: str) -> str | None:
    return conn.execute(select(tenants.c.id).where(tenants.c.name == name)).scalar_one_or_none()


def issue_key(conn: Connection, tenant_id: str, name: str = "") -> IssuedKey:
    key, key_id = new_api_key(), new_id()
    conn.execute(
        insert(api_keys).values(
            id=key_id, tenant_id=tenant_id, name=name, prefix=display_prefix(key), key_hash=hash_api_key(key)
        )
    )
    return IssuedKey(tenant_id=tenant_id, key_id=key_id, key=key)
