"""Provisioning of the machine's PostgreSQL for one test session (a fresh database each run)."""

from __future__ import annotations

import os

import psycopg

PG_ADMIN_URL = os.environ.get("KLEIN_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _redis_url() -> str:
    """A Redis db per test session, which flushes it at its start (tests/conftest.py): with pytest-xdist each
    worker runs a session, so worker gwN > 0 takes the db N + 1 below the first (14 stays the benchmarks')."""
    url = os.environ.get("KLEIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    base, db = url.rsplit("/", 1)
    return url if worker == 0 else f"{base}/{int(db) - worker - 1}"


REDIS_URL = _redis_url()


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
