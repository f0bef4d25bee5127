"""api/infra/pg.py and api/infra/rows.py: statements compiled once by SQLAlchemy, run by asyncpg on the real schema."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from api.errors import answer
from api.infra.pg import make_pool
from api.infra.rows import NewPrediction, Row, Rows
from core import lifecycle
from core.ids import new_id
from core.settings import Settings
from core.tables import metadata
from core.tenants import IssuedKey
from tests.conftest import make_tenant


def _new(tenant: IssuedKey, document: dict[str, Any], params: dict[str, Any] | None = None) -> NewPrediction:
    return NewPrediction(
        new_id(),
        tenant.tenant_id,
        tenant.key_id,
        "flux-klein-4b",
        orjson.dumps(document).decode(),
        orjson.dumps(params or {"seed": 7}).decode(),
    )


def test_insert_and_read_round_trip_json_and_another_tenant_reads_nothing(
    settings: Settings, tenant: IssuedKey
) -> None:
    document: dict[str, Any] = {"prompt": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    new = _new(tenant, document, {"seed": 7, "reference_keys": ["a", "b"]})

    async def scenario() -> tuple[dict[str, Any], Row | None, Row | None]:
        pool = await make_pool(settings)
        try:
            rows = Rows(pool, concurrency=1)
            created = await rows.insert(new)
            read = await rows.read((new.id, tenant.tenant_id))
            return created, read, await rows.read((new.id, new_id()))
        finally:
            await pool.close()

    created, read, absent = asyncio.run(scenario())
    assert read is not None
    # The insert returns every column but the two JSON documents, which the API already holds.
    assert created == {name: value for name, value in read.items() if name not in ("input", "params", "webhook")}
    assert read["status"] == lifecycle.Status.CREATED  # carried by the statement, not given by the caller
    assert read["input"] == document
    assert read["params"] == {"seed": 7, "reference_keys": ["a", "b"]}
    assert read["outputs"] == [] and read["timings"] == {}
    assert read["created_at"].tzinfo is not None
    assert absent is None


def test_concurrent_inserts_and_reads_share_statements_and_a_bad_row_fails_alone(
    settings: Settings, tenant: IssuedKey, engine: Engine
) -> None:
    """Concurrent submits' rows go in few statements; a row PostgreSQL refuses (a NUL character in its JSON, a
    tenant that does not exist) fails only its own caller, and every other row of its batch is stored."""
    other = make_tenant(engine)
    news = [_new(tenant if i % 2 else other, {"prompt": f"p{i}"}) for i in range(40)]
    refused = [_new(tenant, {"prompt": "nul \u0000 here"}), _new(tenant, {})._replace(tenant_id=new_id())]
    batches: list[int] = []

    async def scenario() -> tuple[list[Any], list[Row | None]]:
        pool = await make_pool(settings)
        try:
            rows = Rows(pool, concurrency=2)
            run = rows._insert

            async def counted(batch: Any) -> Any:
                batches.append(len(batch))
                return await run(batch)

            rows.insert._run = counted
            submitted = [*news[:20], *refused, *news[20:]]
            created = await asyncio.gather(*(rows.insert(new) for new in submitted), return_exceptions=True)
            keys = [(new.id, new.tenant_id) for new in news]
            keys += [(news[1].id, other.tenant_id), (news[1].id, tenant.tenant_id)]
            return created, await asyncio.gather(*(rows.read(key) for key in keys))
        finally:
            await pool.close()

    created, read = asyncio.run(scenario())
    inserted, failed = [*created[:20], *created[22:]], created[20:22]
    assert [row["id"] for row in inserted] == [new.id for new in news]
    assert isinstance(failed[0], asyncpg.exceptions.UntranslatableCharacterError)
    assert (error := answer(failed[0])) is not None and error.status == 422  # as without batches
    assert isinstance(failed[1], asyncpg.exceptions.ForeignKeyViolationError)
    # All 42 rows in one statement, refused; then each row alone.
    assert batches == [42, *[1] * 42]
    assert [row and row["input"] for row in read[:40]] == [{"prompt": f"p{i}"} for i in range(40)]
    assert [row and row["tenant_id"] for row in read[:40]] == [new.tenant_id for new in news]
    assert read[40] is None  # news[1] is `tenant`'s: `other` reads nothing
    assert read[41] is not None and read[41]["id"] == news[1].id


def test_a_missing_value_is_an_error_not_a_null() -> None:
    with pytest.raises(KeyError, match="tenant_id"):
        Rows._CREATE.args({"id": ["x"], "api_key_id": [None], "model": ["m"], "input": ["{}"], "params": ["{}"]})


def test_asyncpg_errors_map_like_sqlalchemys() -> None:
    """The hot statements raise asyncpg's own exceptions: data errors are the client's (422), others 503."""
    nul = asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be converted")
    assert (error := answer(nul)) is not None and error.status == 422
    closed = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    assert (error := answer(closed)) is not None and error.status == 503
    assert answer(OSError("refused")) is None  # not from a client of ours: a fault, 500, not "database unavailable"


def test_the_migrations_build_exactly_the_schema_of_core_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
