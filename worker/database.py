"""How a worker talks to PostgreSQL: one statement at a time in autocommit, retried through outages
(`Database.run`), and the helpers that read a statement's result."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Executable
from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")
DB_ERRORS = (OperationalError, InterfaceError)  # what a lost connection raises (SQLAlchemy drops it from the pool)


def first(conn: Connection, statement: Executable, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The statement's first row by column name, or None. A lost connection raises one of DB_ERRORS and is
    invalidated, so that the pool drops it."""
    row = conn.execute(statement, values).mappings().first()
    return None if row is None else dict(row)


def scalar(conn: Connection, statement: Executable) -> Any:
    return conn.execute(statement).scalar()


class Database:
    """The worker's two engines in autocommit: `autocommit` (results, billing: every commit durable) and
    `lease_autocommit` (the claim and its renewals, committed without waiting for the disk)."""

    def __init__(self, engine: Engine, leases: Engine, retry_s: float) -> None:
        self.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.lease_autocommit = leases.execution_options(isolation_level="AUTOCOMMIT")
        self.retry_s = retry_s

    def run(self, work: Callable[[Connection], T], durable: bool = True) -> T:
        """Run `work`, one statement, retrying through database outages for up to `retry_s` (`db_retry_s`).

        Each of the worker's statements is atomic on its own (claim, finish-and-bill, renew), so they run
        in autocommit: no BEGIN and COMMIT round trips on a prediction's path. `durable=False` (the claim)
        does not wait for the disk, a flush less on the path (docs/performance.md): a database crash can
        take back only a claim (the runtime then queues the prediction again), never a result, since the
        finish's durable commit flushes the claim before it."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            try:
                with (self.autocommit if durable else self.lease_autocommit).connect() as conn:
                    return work(conn)
            except DB_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
