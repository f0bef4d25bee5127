"""api/pg.py: statements compiled once by SQLAlchemy, run by asyncpg: the API's own, on the real schema."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from api.errors import unstorable_value
from api.pg import make_pool
from api.predictions import CREATE, READ
from core import lifecycle
from core.ids import new_id
from core.settings import Settings
from core.tables import metadata
from core.tenants import IssuedKey


def test_insert_and_read_round_trip_json_and_another_tenant_reads_nothing(
    settings: Settings, tenant: IssuedKey
) -> None:
    prediction_id = new_id()
    document: dict[str, Any] = {"prompt": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}

    async def scenario() -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
        pool = await make_pool(settings)
        try:
            created = await CREATE.one(
                pool,
                id=prediction_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input=document,
                params={"seed": 7, "reference_keys": ("a", "b")},
            )
            read = await READ.one(pool, id=prediction_id, tenant_id=tenant.tenant_id)
            return created, read, await READ.one(pool, id=prediction_id, tenant_id=new_id())
        finally:
            await pool.close()

    created, read, absent = asyncio.run(scenario())
    assert created is not None and read is not None
    # The insert returns every column but the two JSON documents, which the API already holds.
    assert created == {name: value for name, value in read.items() if name not in ("input", "params")}
    assert read["status"] == lifecycle.Status.CREATED  # carried by the statement, not given by the caller
    assert read["input"] == document
    assert read["params"] == {"seed": 7, "reference_keys": ["a", "b"]}
    assert read["outputs"] == [] and read["timings"] == {}
    assert read["created_at"].tzinfo is not None
    assert absent is None


def test_a_missing_value_is_an_error_not_a_null() -> None:
    with pytest.raises(KeyError, match="tenant_id"):
        CREATE.args({"id": "x", "api_key_id": None, "model": "m", "input": {}, "params": {}})
    assert CREATE.args({"id": "x", "tenant_id": "t", "api_key_id": None, "model": "m", "input": {}, "params": {}}) == [
        "x",
        "t",
        None,
        "m",
        {},
        {},
        lifecycle.Status.CREATED,
    ]


def test_asyncpg_errors_map_like_sqlalchemys() -> None:
    """The hot statements raise asyncpg's own exceptions: data errors are the client's (422), others 503."""
    assert unstorable_value(asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be converted")) is not None
    assert unstorable_value(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")) is None
    assert unstorable_value(OSError("refused")) is None


def test_the_migrations_build_exactly_the_schema_of_core_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
