"""The API's hot single statements (key lookup; prediction insert and read, batched in api/infra/rows.py) on a raw
asyncpg pool.

SQLAlchemy still builds each statement, once at import, so the tables and the state machine keep
one definition; asyncpg then runs it as a prepared statement (cached per connection), or, with
`db_prepared_statements` off (a PgBouncer in transaction mode, docs/scaling.md), as an unnamed one. Profiling
showed SQLAlchemy's per-request execution layer costing as much CPU as the rest of a submit
(docs/performance.md). Everything else, transactions included, stays on the SQLAlchemy engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from core.settings import Settings

_DIALECT = asyncpg_dialect.dialect()


class Statement:
    """A statement compiled once; its `bindparam()`s are filled by name at each call."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        self._names = tuple(compiled.positiontup or ())
        # Values the statement carries itself (the status an insert writes); a bindparam() without one
        # must be given at each call (KeyError otherwise, never a silent NULL).
        self._literals = {name: bind.value for bind, name in compiled.bind_names.items() if not bind.required}

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] if name in values else self._literals[name] for name in self._names]

    async def one(self, pool: asyncpg.Pool, **values: Any) -> dict[str, Any] | None:
        record = await pool.fetchrow(self.sql, *self.args(values))
        return None if record is None else dict(record.items())

    async def all(self, pool: asyncpg.Pool, **values: Any) -> list[asyncpg.Record]:
        records: list[asyncpg.Record] = await pool.fetch(self.sql, *self.args(values))
        return records


async def make_pool(settings: Settings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        settings.libpq_database_url,
        min_size=0,  # connect on first use: an API started while PostgreSQL is down answers 503, not fails to start
        max_size=settings.db_pool_size,
        # 0: no named statement is prepared or cached; asyncpg parses each one unnamed, right before running it.
        statement_cache_size=100 if settings.db_prepared_statements else 0,
        init=_json_codecs,
        # Only single autocommit statements run here, so a returned connection carries no session state
        # to reset (asyncpg still rolls back a transaction left open): no reset round trip per request.
        reset=_nothing_to_reset,
    )


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, schema="pg_catalog", encoder=lambda value: orjson.dumps(value).decode(), decoder=orjson.loads
        )


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    return None
