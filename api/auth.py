"""API-key authentication: `apikey`, `API-KEY` or `Authorization: Bearer` → tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import func, or_, select

from api.context import AppContext, get_ctx
from api.errors import ApiError
from core.ids import hash_api_key
from core.tables import api_keys

MISSING = "missing API key: send it in the `apikey` header or as `Authorization: Bearer <key>`"
INVALID = "invalid, revoked or expired API key"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    api_key_id: str


def presented_key(request: Request) -> str | None:
    key = request.headers.get("apikey") or request.headers.get("api-key")
    if key:
        return key.strip()
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


async def authenticate(request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]) -> Principal:
    key = presented_key(request)
    if not key:
        raise ApiError(401, MISSING)
    statement = select(api_keys.c.id, api_keys.c.tenant_id).where(
        api_keys.c.key_hash == hash_api_key(key),
        api_keys.c.revoked_at.is_(None),
        or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > func.now()),
    )
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(statement)).first()
    if row is None:
        raise ApiError(401, INVALID)
    return Principal(tenant_id=row.tenant_id, api_key_id=row.id)


Authenticated = Annotated[Principal, Depends(authenticate)]
