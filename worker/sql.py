"""The worker's statements on the prediction's path (claim, finish-and-bill) run by psycopg, prepared.

SQLAlchemy still builds each statement once (core/lifecycle.py, core/usage.py keep their one
definition) and compiles it once; psycopg then runs the SQL as a prepared statement on the pooled
connection's driver connection. SQLAlchemy's execution and result layers cost each statement
0.4–0.5 ms of the worker's CPU more than psycopg alone, after the idle of a render (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Engine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)  # what a lost connection raises here


class Statement:
    """A statement compiled once; its `bindparam()`s are given by name at each call. A dict or list value is
    bound as JSONB (the statements' only dicts and lists are JSONB columns)."""

    def __init__(self, statement: ClauseElement, engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        # Values the statement carries itself (the status a claim writes); a bindparam() without one must be
        # given at each call (psycopg raises otherwise, never a silent NULL).
        self._literals = {name: bind.value for bind, name in compiled.bind_names.items() if not bind.required}

    def first(self, conn: Connection, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row by column name, or None, on an autocommit connection (SQLAlchemy would roll back a
        transaction it did not open). A lost connection invalidates `conn`, so that the pool drops it, and
        raises one of ERRORS."""
        params = self._literals | {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in values.items()}
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        if not driver.autocommit:
            raise RuntimeError("worker statements run on autocommit connections (engine.execution_options)")
        try:
            with driver.cursor() as cursor:
                cursor.execute(self.sql, params, prepare=True)
                row = cursor.fetchone()
                names = [column.name for column in cursor.description or ()]
        except ERRORS:
            conn.invalidate()
            raise
        return None if row is None else dict(zip(names, row, strict=True))
