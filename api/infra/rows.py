"""The predictions table's two hot statements: a submit's insert and the read by id and tenant.

Both run on the raw asyncpg pool (api/infra/pg.py), and concurrent requests' ones run together, one statement
a batch (api/infra/coalesce.py): under submit load that is the difference between a round trip and a commit
per prediction and one per batch (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY

from api.infra.coalesce import Coalescer
from api.infra.pg import Statement
from core import lifecycle
from core.tables import predictions

Row = Mapping[str, Any]  # a predictions row by column name


class NewPrediction(NamedTuple):
    id: str
    tenant_id: str
    api_key_id: str | None
    model: str
    input: str  # JSON
    params: str  # JSON
    webhook: str | None = None  # JSON (api/services/webhooks.py)
    priority: str = "0"  # the queue's (core.quota.queue_priority), as text like every column of the batch
    start_deadline_s: str | None = None  # seconds from now (core/deadlines.py), as text; None: no deadline
    deadline_s: str | None = None


class Rows:
    """`await rows.insert(NewPrediction(...))` → the stored row but `input`, `params` and `webhook`;
    `await rows.read((id, tenant_id))` → the row, or None (also for another tenant's id)."""

    _CREATE = Statement(
        lifecycle.create_many().returning(*(c for c in predictions.c if c.name not in ("input", "params", "webhook")))
    )
    _READ = Statement(select(predictions).where(predictions.c.id == func.any(bindparam("ids", type_=ARRAY(Text)))))

    def __init__(self, pool: asyncpg.Pool, concurrency: int, max_batch: int = 256) -> None:
        self._pool = pool
        self.insert = Coalescer(self._insert, concurrency=concurrency, max_batch=max_batch, retry_alone=_a_rows_fault)
        self.read = Coalescer(self._read, concurrency=concurrency, max_batch=max_batch, retry_alone=_a_rows_fault)

    async def _insert(self, new: Sequence[NewPrediction]) -> list[dict[str, Any]]:
        columns = {name: [getattr(row, name) for row in new] for name in NewPrediction._fields}
        created = {record["id"]: record for record in await self._CREATE.all(self._pool, **columns)}
        return [dict(created[row.id].items()) for row in new]

    async def _read(self, keys: Sequence[tuple[str, str]]) -> list[Row | None]:
        """Rows by (id, tenant): another tenant's id reads as absent."""
        ids = list({prediction_id for prediction_id, _ in keys})  # two reads of one id: one row
        found = {record["id"]: record for record in await self._READ.all(self._pool, ids=ids)}
        return [
            dict(record.items()) if (record := found.get(prediction_id)) and record["tenant_id"] == tenant else None
            for prediction_id, tenant in keys
        ]


def _a_rows_fault(exc: Exception) -> bool:
    """PostgreSQL refused a value (SQLSTATE class 22, e.g. a NUL character in JSON) or a constraint (class 23,
    e.g. a tenant deleted meanwhile): one row's doing, so each row of the batch is tried again alone."""
    return str(getattr(exc, "sqlstate", "")).startswith(("22", "23"))
